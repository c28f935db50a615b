"""Rewards off the critical path: an epoch's prompts rolled out in groups (`sampling.rollout_groups`), each group's
leaves scored in a background thread while the next group rolls out (`sampling.overlap_scoring`).

Why a thread and not a process: scoring is either a remote call (waits on the network), a reward model on its own
device, or torch work that releases the GIL; a thread shares the reward models already loaded (no second copy, no
pickling of images), and the main thread keeps every collective (FSDP's all-gathers in the rollout, the scoring
failure check), so processes never disagree on the order of collectives. The groups' records are joined by
`diffusers_tree.record.concat_records` into the record one rollout gives, so advantages, edge selection and the
update are those of one group; each tree draws from its own slot-keyed generator, so its noise does not depend on
the grouping either (the latents differ only by the float rounding of other batch-mates in a forward)."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from diffusers_tree.record import RolloutRecord, concat_records
from treegrpo.errors import TrainingError
from treegrpo.train.epoch_outputs import leaf_frames, score_frames

if TYPE_CHECKING:
    from diffusers_tree.adapters.base import Conditioning
    from treegrpo.run.setup import Run


@dataclass
class ScoredRollout:
    """An epoch's rollout and its leaves' scores: `record` (all groups joined), `images` (leaves in record order),
    `scores` `[num_rewards, num_leaves]` and `extras` (as `score_leaves`), or `failure` (the
    reward's error, raised by the caller after every process has seen it). `rollout_end` is the `perf_counter` when
    the last group finished rolling out; `scoring_s` the seconds spent scoring in all (hidden or not)."""

    record: RolloutRecord
    images: torch.Tensor
    scores: torch.Tensor | None
    extras: dict[str, float]
    failure: TrainingError | None
    rollout_end: float
    scoring_s: float

    @property
    def rows(self) -> int:
        """Denoiser rows of all groups (the joined record sums them)."""
        return self.record.rows


def prompt_groups(num_prompts: int, groups: int) -> list[tuple[int, int]]:
    """`[start, stop)` of each group: at most one group per prompt, sizes differing by at most one, in order."""
    count = max(1, min(groups, num_prompts))
    bounds = [i * num_prompts // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def rollout_and_score(run: Run, prompts: list[str], metadata: list[dict] | None, conditioning: Conditioning,
                      generators: list[torch.Generator], window_start: int, before_scoring=lambda: None
                      ) -> ScoredRollout:
    """Roll out `prompts` (with their per-prompt `metadata`) group by group and score every group's leaves: in a
    background thread during the next group's rollout when `overlap_scoring`, else after the whole rollout.
    `before_scoring` runs between the rollout and the scoring when they do not overlap (the trainer's stop check)."""
    s = run.recipe.sampling
    trees = run.recipe.tree.num_trees
    bounds = prompt_groups(len(prompts), s.rollout_groups)
    overlap = s.overlap_scoring and len(bounds) > 1
    records, images, pending = [], [], []
    # overlapped, the rewards score during the rollout: with `model.offload_rewards` they stay on the accelerator
    # for the whole rollout (they still leave before training)
    with run.rewards_ready() if overlap else nullcontext(), ThreadPoolExecutor(1, "treegrpo-scoring") as worker:
        for start, stop in bounds:
            out = run.rollout(prompts[start:stop], num_trees=trees, num_inference_steps=s.num_inference_steps,
                              window_start=window_start, conditioning=conditioning.select(start, stop),
                              height=run.sampling.height, width=run.sampling.width,
                              generator=generators[start * trees:stop * trees], max_batch_size=s.max_batch_size,
                              output_type="pt")
            records.append(out.record)
            images.append(out.images)
            # the leaves become CPU images here, on the main thread: the worker never touches the rollout's device
            leaf_prompts = [start + int(p) for p in out.record.leaf_prompt_index]
            job = (leaf_frames(out.images), [prompts[p] for p in leaf_prompts],
                   None if metadata is None else [metadata[p] for p in leaf_prompts])
            pending.append(worker.submit(_score_group, run.rewards, *job) if overlap else job)
        rollout_end = time.perf_counter()
        if not overlap:
            before_scoring()
            run.reporter.phase("scoring")
            with run.rewards_ready():
                pending = [_done(_score_group, run.rewards, *job) for job in pending]
        scores, extras, failure, scoring_s = _collect(pending)
    record = concat_records(records)
    return ScoredRollout(record, torch.cat(images), scores, extras, failure, rollout_end, scoring_s)


def _score_group(rewards: list, frames, prompts: list[str], metadata: list[dict] | None):
    started = time.perf_counter()
    with torch.no_grad():  # grad mode is per thread: a fresh thread has it on
        scores, extras = score_frames(rewards, frames, prompts, metadata)
    return scores, extras, frames.count, time.perf_counter() - started


def _done(function, *args) -> Future:
    """`function(*args)` run now, as a finished future (the sequential path shares `_collect` with the overlap)."""
    future: Future = Future()
    try:
        future.set_result(function(*args))
    except TrainingError as err:
        future.set_exception(err)
    return future


def _collect(futures: list[Future]) -> tuple[torch.Tensor | None, dict[str, float], TrainingError | None, float]:
    """Every group's scores joined in leaf order; extras (leaf means) weighted by each group's leaves, so they equal
    the whole epoch's means; the first group's failure, after every group has finished (no thread left running)."""
    results, failure = [], None
    for future in futures:
        try:
            results.append(future.result())
        except TrainingError as err:
            failure = failure or err
    if failure is not None:
        return None, {}, failure, sum(r[3] for r in results)
    names = {name for r in results for name in r[1]}
    extras = {}
    for name in sorted(names):
        counted = [(r[1][name], r[2]) for r in results if name in r[1]]
        extras[name] = sum(value * count for value, count in counted) / sum(count for _, count in counted)
    return torch.cat([r[0] for r in results], dim=1), extras, None, sum(r[3] for r in results)
