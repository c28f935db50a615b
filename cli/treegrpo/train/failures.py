"""Failures that end a run with one line instead of a traceback: the accelerator out of memory (naming the phase, its
batch sizes and what to lower) and another process of a multi-process run gone (a crashed or lost node)."""

from __future__ import annotations

from pathlib import Path

import torch

from treegrpo.recipe.schema import Recipe
from treegrpo.run.checkpoint import describe_newest

# what to lower when a phase runs out of accelerator memory
_OOM_KNOBS = {"rollout": "sampling.max_batch_size", "evaluation": "sampling.max_batch_size or "
              "evaluation.images_per_prompt", "scoring": "the reward's batch_size, or set model.offload_rewards",
              "training": "train.micro_batch_size, or set model.gradient_checkpointing"}


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` is the accelerator (or the host) running out of memory."""
    return isinstance(err, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)) or \
        "out of memory" in str(err).lower()


def out_of_memory_message(recipe: Recipe, phase: str, err: BaseException) -> str:
    """One line: the phase, its batch sizes, what to lower, and the memory plan's advice for this card."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")[:160]
    sizes = (f"train.micro_batch_size = {recipe.train.micro_batch_size}, sampling.max_batch_size = "
             f"{recipe.sampling.max_batch_size}")
    advice = ""
    if torch.cuda.is_available():
        from treegrpo.recipe.memory import recipe_memory_plan

        try:
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
            plan = recipe_memory_plan(recipe, total)
            if not isinstance(plan, str) and plan.suggestions:
                advice = f" The plan for this {total:.0f} GiB card suggests: {'; '.join(plan.suggestions)}."
        except Exception:  # noqa: BLE001 (advice only: the error itself must come out)
            advice = ""
    return (f"out of memory during {phase} ({sizes}): {first} Lower {_OOM_KNOBS.get(phase, 'the batch sizes')} "
            f"(`treegrpo check RECIPE --gpu-memory <GiB>` plans it before loading).{advice} The run: "
            f"{describe_newest(Path(recipe.output.dir))}.")


_LOST_PEER = ("closed by peer", "reset by peer", "remote worker", "broken pipe", "communicator was aborted")


def lost_peer(err: BaseException) -> bool:
    """Whether `err` is a collective failing because another process of a multi-process run went away (gloo:
    "Connection closed by peer"; NCCL: an aborted communicator), rather than a bug to show with its traceback."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    text = str(err).lower()
    return isinstance(err, getattr(dist, "DistNetworkError", ())) or any(marker in text for marker in _LOST_PEER)
