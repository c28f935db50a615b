"""The command-line arguments of `sample` and `eval` that can be judged before any heavy import (prompts, dtype,
the MODEL argument), and the settings every computing command shares (CPU threads, quiet libraries). Raises
`UsageError`; imports no torch until a function that needs it runs."""

from __future__ import annotations

from pathlib import Path

from treegrpo.dtypes import DTYPE_NAMES
from treegrpo.errors import UsageError
from treegrpo.recipe.preflight import check_pretrained, pipeline_config, prompt_records
from treegrpo.sources import SOURCE_KEY, check_sources_for, resolve_source


def judge_sampling_arguments(model: str, prompt: list[str] | None, prompts_file: Path | None,
                             dtype: str, image: Path | None = None) -> tuple[list[str], list[dict]]:
    """The prompts of `sample` / `eval` (`--prompt` and `--prompts`) and each one's metadata (a `.jsonl` file's
    fields, e.g. GenEval's; `{}` for the others), after checking `--dtype` and the MODEL argument as far as that is
    possible without loading (a local folder's files, a built-in name, an uncached Hub id on an offline machine).
    Editing models: `image` (`--image`) is the source of every prompt whose line names none, and the sources are
    judged against the model when its class is known here. Messages name the arguments, not recipe keys."""
    found = list(prompt or [])
    metadata: list[dict] = [{} for _ in found]
    if prompts_file is not None:
        from_file, file_metadata = prompt_records(str(prompts_file), "--prompts")
        found += from_file
        metadata += file_metadata
    if not found:
        raise UsageError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE.")
    if dtype not in DTYPE_NAMES:
        raise UsageError(f"--dtype {dtype!r}: choose fp32, bf16 or fp16.")
    check_pretrained(model, key="MODEL", about_to_load=True)
    if image is not None:
        path = resolve_source(str(image), Path.cwd(), "--image", None)
        metadata = [m if SOURCE_KEY in m else {**m, SOURCE_KEY: path} for m in metadata]
    config = pipeline_config(model)
    if config and config.get("_class_name"):
        check_sources_for(metadata, str(config["_class_name"]), "--prompts / --image")
    return found, metadata


def use_free_cpu_threads() -> None:
    """`sample` and `eval` on a CPU take their threads as `run` does: the free cores (see treegrpo.run.threads)."""
    import torch

    if not torch.cuda.is_available():
        from treegrpo.run.threads import apply_cpu_threads

        apply_cpu_threads(None)


def quiet_libraries(*, verbose: bool) -> None:
    """Our own progress and messages replace the libraries' loading bars and import chatter; `--verbose` keeps
    their warnings (e.g. an ignored dtype), which are then what the user wants to see."""
    import diffusers
    import transformers

    if verbose:
        diffusers.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        return
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def compute_device() -> str:
    """Where `sample`, `eval` and the reward server compute: the first GPU when there is one (`CUDA_VISIBLE_DEVICES`
    picks which), else the CPU. Training's device is accelerate's, not this."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
