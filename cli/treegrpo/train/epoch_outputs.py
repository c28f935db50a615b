"""What an epoch leaves behind besides the update: the leaves' scores, the epoch's metrics (global over processes)
and sample grids. Split from `trainer.py`, which drives the run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from treegrpo.errors import TrainingError
from treegrpo.model.loading import stock_call
from treegrpo.run.metrics import image_grid
from treegrpo.run.seeds import seeded
from treegrpo.sources import source_argument
from treegrpo.train.diagnostics import leaf_diversity, no_signal_groups

if TYPE_CHECKING:
    from treegrpo.run.setup import Run


def score_leaves(rewards: list, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """Every reward on every leaf: float32 `[num_rewards, num_leaves]` (non-finite scores stop the run), and
    per-reward extras to log: the leaf accuracy of rewards that can judge right/wrong (`score_and_accuracy`, as
    `<name>/accuracy`) and the mean of each sub-score a remote reward returned (`last_subscores`, as
    `<name>/<sub-score>`). Leaves are images `[N, 3, H, W]` or videos `[N, F, 3, H, W]` (see `score_reward`);
    `metadata` is each leaf's prompt metadata. The leaves become PIL images once, for all rewards."""
    return score_frames(rewards, leaf_frames(images), prompts, metadata)


def score_frames(rewards: list, frames: LeafFrames, prompts: list[str], metadata: list[dict] | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """`score_leaves` on leaves already made PIL images (`leaf_frames`)."""
    rows, extras = [], {}
    for reward in rewards:
        try:
            values, accuracy = score_reward(reward, frames, prompts, metadata)
        except (Exception, SystemExit) as err:  # noqa: BLE001  (user code: any failure, even sys.exit, stops here)
            reason = str(err).rstrip(".")  # one full stop, not "..", after a message that ends in one
            raise TrainingError(f"reward {reward.name!r} failed: {type(err).__name__}: {reason}. Stopping.") from None
        if values.numel() != frames.count:
            raise TrainingError(f"reward {reward.name!r} returned {values.numel()} scores for {frames.count} "
                                f"{'videos' if frames.num_frames else 'images'}.")
        if not torch.isfinite(values).all():
            raise TrainingError(f"reward {reward.name!r} returned NaN/Inf for {int((~torch.isfinite(values)).sum())} "
                                "images; stopping.")
        rows.append(values)
        if accuracy is not None:
            extras[f"{reward.name}/accuracy"] = float(accuracy)
        for sub, sub_values in reward.last_subscores.items():
            extras[f"{reward.name}/{sub}"] = float(sub_values.float().mean())
    return torch.stack(rows), extras


@dataclass
class LeafFrames:
    """Leaves as 8-bit PIL images: `images` (one per image leaf, or every frame of every video, video-major),
    `count` leaves, and `num_frames` per video (None for image leaves)."""

    images: list
    count: int
    num_frames: int | None = None

    def videos(self) -> list[list]:
        return [self.images[i * self.num_frames:(i + 1) * self.num_frames] for i in range(self.count)]


def leaf_frames(images: torch.Tensor) -> LeafFrames:
    """Float leaves in [0, 1], images `[N, 3, H, W]` or videos `[N, F, 3, H, W]`, as `LeafFrames`."""
    from treegrpo.rewards import to_pil

    if images.ndim == 5:
        return LeafFrames(to_pil(images.flatten(0, 1)), images.shape[0], images.shape[1])
    return LeafFrames(to_pil(images), images.shape[0])


def score_reward(reward, frames: LeafFrames, prompts: list[str], metadata: list[dict] | None = None
                 ) -> tuple[torch.Tensor, float | None]:
    """One reward's scores `[N]`. The video contract: a reward's `frame_reduction` (`[[reward]] frame_reduction`)
    says how it sees a video. "mean" (default), "min" or "max": every frame is scored as an image with the video's
    prompt, and the frame scores are reduced per video, so every image reward works on video unchanged. "whole": the
    reward is called with the videos themselves, each a list of its frames as PIL images (python rewards that judge
    motion or consistency)."""
    from treegrpo.rewards.base import score_with_accuracy

    if frames.num_frames is None:
        return score_with_accuracy(reward, frames.images, prompts, metadata)
    reduction = reward.frame_reduction
    if reduction == "whole":
        return score_with_accuracy(reward, frames.videos(), prompts, metadata)
    per_video = frames.num_frames
    frame_prompts = [prompt for prompt in prompts for _ in range(per_video)]
    frame_metadata = None if metadata is None else [meta for meta in metadata for _ in range(per_video)]
    values, accuracy = score_with_accuracy(reward, frames.images, frame_prompts, frame_metadata)
    if values.numel() != frames.count * per_video:
        raise ValueError(f"returned {values.numel()} scores for {frames.count * per_video} frames "
                         f"({frames.count} videos × {per_video})")
    per_frame = values.reshape(frames.count, per_video)
    reduced = {"mean": per_frame.mean(1), "min": per_frame.amin(1), "max": per_frame.amax(1)}[reduction]
    return reduced, accuracy


def epoch_metrics(run: Run, epoch, window_start, scores, adv, stats, rollout_rows, times,
                  leaves: torch.Tensor, leaf_group: torch.Tensor) -> dict:
    """The epoch's metrics, global over processes: rewards, the update's diagnostics (means over processes), row
    counts and the collapse signs (`diagnostics.py`: sums over processes). `leaves` are this process's decoded
    leaves in [0, 1], `leaf_group` their Eq. 9 group (prompt slot)."""
    acc, r = run.accelerator, run.recipe
    weights = torch.tensor([spec.weight for spec in r.reward]).unsqueeze(1)
    all_scores = acc.gather(scores.T.contiguous().to(acc.device)).T.cpu()  # [R, global leaves]
    total = (weights * all_scores).sum(0)
    flat_groups, groups = no_signal_groups((weights * scores.cpu()).sum(0), leaf_group.cpu(), r.advantage.eps)
    diversity, diverse_groups = leaf_diversity(leaves, leaf_group)
    sums = reduced_over_processes(acc, "sum", {
        "model/rollout_rows": rollout_rows, "model/train_rows": stats.train_rows,
        "model/trained_edges": stats.trained_edges, "model/trained_parents": stats.trained_parents,
        "flat": flat_groups, "groups": groups, "diversity": diversity, "diverse_groups": diverse_groups})
    means = reduced_over_processes(acc, "mean", {
        "tree/ess_mean": adv.ess_mean, "policy/ratio_mean": stats.ratio_mean, "policy/ratio_drift": stats.ratio_drift,
        "policy/clip_frac": stats.clip_frac,
        "policy/approx_kl": stats.approx_kl, "policy/first_ratio_error": stats.first_ratio_error,
        "policy/kl_ref": stats.kl, "train/loss": stats.loss, "train/grad_norm": stats.grad_norm})
    t0, t1, t2, t3 = times
    metrics = {
        "epoch": epoch, "reward/mean": float(total.mean()), "reward/std": float(total.std(unbiased=False)),
        "tree/window_start": window_start, **means, "train/lr": run.optimizer.param_groups[0]["lr"],
        "tree/no_signal_frac": sums.pop("flat") / max(sums.pop("groups"), 1),
        "tree/leaf_diversity": sums.pop("diversity") / max(sums.pop("diverse_groups"), 1),
        "time/rollout_s": t1 - t0, "time/score_s": t2 - t1, "time/train_s": t3 - t2, "time/epoch_s": t3 - t0,
        **{name: int(value) for name, value in sums.items()},
    }
    for spec, values in zip(r.reward, all_scores, strict=True):
        name = spec.name or spec.kind
        metrics[f"reward/{name}/mean"] = float(values.mean())
        metrics[f"reward/{name}/std"] = float(values.std(unbiased=False))
    if stats.first_ratio_error > r.train.max_ratio_error:
        run.reporter.warn(
            f"epoch {epoch}: the first micro-batch's ratio differs from 1 by {stats.first_ratio_error:.2e} "
            f"(> {r.train.max_ratio_error}). Sampling and training disagree: likely a dtype mismatch (bf16 latents "
            "re-scored in another precision), CFG applied differently, or a stochastic layer (dropout) in train mode.")
    return metrics


def reduced_over_processes(acc, reduction: str, values: dict[str, float]) -> dict[str, float]:
    """`values` reduced over processes in one collective (the same names, in the same order, on every process)."""
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=acc.device)
    return dict(zip(values, map(float, acc.reduce(tensor, reduction=reduction).cpu()), strict=True))


def is_sharded(run: Run) -> bool:
    return str(run.accelerator.distributed_type).endswith("FSDP")


def save_samples(run: Run, path: Path, prompts: list[str], seed: int, sources: list[str] | None = None
                 ) -> Path | None:
    """A grid of ODE samples from the stock pipeline (its own scheduler) with the current weights; editing models
    edit each prompt's source image (`sources`, paths)."""
    # sharded weights need every process in the forward; otherwise only the main process samples
    if not run.recipe.output.samples or not (run.accelerator.is_main_process or is_sharded(run)):
        return None
    pipe, kwargs = run.pipe, run.sampling.as_kwargs()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad(), run.text_encoders_ready():
        # Qwen-Image: true_cfg_scale; SANA: no resolution binning; FLUX.2 klein: the negative prompt's embeddings.
        # The prompt by keyword (FLUX.2 takes `image` first), in a copy (Z-Image writes its templated prompts into
        # the list); one image per prompt (Qwen-Image's and SANA's encode_prompt mis-tile mixed-length prompts
        # that ask for several).
        # Editing models: one prompt per call, each with its source (`source_argument`).
        calls = [stock_call(pipe, {**kwargs, "prompt": list(prompts)})] if sources is None else \
            [stock_call(pipe, {**kwargs, "prompt": [prompt], **source_argument(source)})
             for prompt, source in zip(prompts, sources, strict=True)]
        results = [pipe(num_inference_steps=run.recipe.sampling.num_inference_steps, generator=seeded(seed),
                        output_type="pil", **call) for call in calls]
    # video pipelines (Wan) return `frames`: one strip of evenly spaced frames per video
    images = [image for result in results for image in (
        result.images if hasattr(result, "images") else [frame_strip(video) for video in result.frames])]
    if not run.accelerator.is_main_process:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, 96 // images[0].size[0])
    image_grid(images, columns=min(10, len(images)), labels=prompts, scale=scale).save(path)
    return path


def frame_strip(frames, count: int = 4):
    """Up to `count` evenly spaced frames of a video (PIL images), side by side: a video's preview in a grid."""
    from PIL import Image

    picks = sorted({round(i * (len(frames) - 1) / max(count - 1, 1)) for i in range(min(count, len(frames)))})
    width, height = frames[0].size
    strip = Image.new("RGB", (width * len(picks), height), "white")
    for slot, index in enumerate(picks):
        strip.paste(frames[index].convert("RGB"), (slot * width, 0))
    return strip
