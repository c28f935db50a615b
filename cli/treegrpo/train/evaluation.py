"""Judging the policy during training, not its rollouts: the [[eval_reward]] rewards on `data.eval_prompts`, sampled
the way users sample (the stock pipeline with its own ODE scheduler and the weights that would be exported), the
best evaluation's weights kept as `best/`, and the collapse check (training reward up while the evaluation reward
or the within-prompt diversity goes down).

Rollout rewards mislead in two ways (docs/training.md, "Rollout reward and evaluation reward"): they score SDE
rollouts whose window start changes every epoch, and they score with the reward the policy is optimised against,
which it learns to fool. An independent judge on ODE samples shows both."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from treegrpo.errors import TrainingError
from treegrpo.model.loading import stock_call
from treegrpo.run.seeds import evaluation_generators
from treegrpo.sources import source_argument, source_paths
from treegrpo.train.diagnostics import leaf_diversity
from treegrpo.train.epoch_outputs import reduced_over_processes, score_leaves
from treegrpo.train.grpo import stop_together

if TYPE_CHECKING:
    from treegrpo.run.setup import Run



@dataclass(frozen=True)
class EvalPoint:
    """One evaluation as the collapse check sees it (kept in the trainer state, so a resumed run sees the same)."""

    epochs_done: int
    score: float  # the mean of the `best_by` evaluation reward
    diversity: float  # mean within-prompt RMS distance of the evaluation images
    train_reward: float | None  # mean `reward/mean` over the epochs since the previous evaluation (None: before)

    @classmethod
    def from_dict(cls, data: dict) -> EvalPoint:
        return cls(int(data["epochs_done"]), float(data["score"]), float(data["diversity"]),
                   None if data.get("train_reward") is None else float(data["train_reward"]))

    def to_dict(self) -> dict:
        return asdict(self)


def best_by_name(recipe) -> str:
    """The evaluation reward whose mean picks `best/`: `evaluation.best_by`, else the first evaluation reward."""
    first = (recipe.eval_reward or recipe.reward)[0]
    return recipe.evaluation.best_by or first.name or first.kind


def is_evaluation_epoch(epochs_done: int, every: int, epochs: int) -> bool:
    """Evaluate the untrained model, every `every` epochs, and the last epoch."""
    return epochs_done % every == 0 or epochs_done == epochs


def process_prompts(num_prompts: int, rank: int, world_size: int) -> list[int | None]:
    """This process's evaluation prompts: whole prompts (a prompt's images stay together for the diversity),
    contiguous, padded with None so that every process samples as many images (FSDP needs every process in each
    forward)."""
    per_rank = -(-num_prompts // world_size)
    share: list[int | None] = list(range(rank * per_rank, min((rank + 1) * per_rank, num_prompts)))
    return share + [None] * (per_rank - len(share))


def collapsing(history: list[EvalPoint], patience: int, tolerance: float) -> bool:
    """Over the last `patience` evaluations (the latest against the one `patience` before it, so that one noisy
    evaluation neither raises nor hides it): the training reward rose while the evaluation reward fell by more than
    `tolerance` × |its earlier value|, or the diversity fell by more than `tolerance` of its earlier value for no
    gain the evaluation reward sees (a model that learns to follow its prompts draws each one less variously; that is
    not a collapse while the judge approves)."""
    if len(history) <= patience:
        return False
    then, now = history[-1 - patience], history[-1]
    if then.train_reward is None or now.train_reward is None:
        return False
    judged_down = now.score < then.score - tolerance * abs(then.score)
    judged_up = now.score > then.score + tolerance * abs(then.score)
    diversity_down = now.diversity < then.diversity * (1 - tolerance)
    return now.train_reward > then.train_reward and (judged_down or (diversity_down and not judged_up))


def sample_evaluation_images(run: Run, prompts: list[str], share: list[int | None], images_per_prompt: int,
                             seed: int, sources: list[str] | None = None) -> torch.Tensor:
    """Float images in [0, 1] `[len(share) · images_per_prompt, ...]` from the stock pipeline (its own scheduler,
    the current weights); image j of prompt p draws its noise from (seed, p, j), the same at every evaluation, so
    the curve compares the weights, not the noise. Padding slots sample prompt 0 and are dropped by the caller.
    Editing models edit each prompt's source image (`sources`, paths)."""
    items = [(p if p is not None else 0, j) for p in share for j in range(images_per_prompt)]
    pipe, kwargs = run.pipe, run.sampling.as_kwargs()
    pipe.set_progress_bar_config(disable=True)
    # images per call: CFG doubles the rows; editing models one at a time (`source_argument`)
    chunks, chunk = [], 1 if sources is not None else max(1, run.recipe.sampling.max_batch_size // 2)
    with torch.no_grad(), run.text_encoders_ready():
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            call = stock_call(pipe, {**kwargs, "prompt": [prompts[p] for p, _ in part],
                                     **source_argument(None if sources is None else sources[part[0][0]])})
            result = pipe(num_inference_steps=run.recipe.sampling.num_inference_steps, output_type="pt",
                          generator=evaluation_generators(seed, part), **call)
            chunks.append(result.images if hasattr(result, "images") else result.frames)
    return torch.cat([torch.as_tensor(chunk).float() for chunk in chunks])


def evaluate_policy(run: Run, prompts: list[str], metadata: list[dict] | None) -> dict[str, float]:
    """`eval/<name>/mean` (and `eval/<name>/accuracy` for rewards that judge right/wrong, `eval/<name>/<sub-score>`
    for the sub-scores a reward declares, e.g. geneval's `with_extra`) of every evaluation reward, and
    `eval/diversity`, over every evaluation image of every process."""
    acc, settings = run.accelerator, run.recipe.evaluation
    share = process_prompts(len(prompts), acc.process_index, acc.num_processes)
    images = sample_evaluation_images(run, prompts, share, settings.images_per_prompt, run.recipe.train.seed,
                                      source_paths(metadata))
    real = [p for p in share for _ in range(settings.images_per_prompt)]
    keep = torch.tensor([p is not None for p in real])
    images, owners = images[keep], torch.tensor([p for p in real if p is not None], dtype=torch.long)
    totals, scores, extras, failure = {}, None, {}, None
    try:  # a failing reward stops every process at the same point (as scoring does), not one of them
        if len(owners):
            item_prompts = [prompts[int(p)] for p in owners]
            item_metadata = [metadata[int(p)] for p in owners] if metadata else None
            with run.rewards_ready():
                scores, extras = score_leaves(run.eval_rewards, images, item_prompts, item_metadata)
    except TrainingError as err:
        failure = TrainingError(f"evaluation: {err}")
    stop_together(acc, failure, "evaluation")
    for index, reward in enumerate(run.eval_rewards):
        count = len(owners)
        accuracy = extras.get(f"{reward.name}/accuracy") if count else None
        totals[f"{reward.name}/sum"] = float(scores[index].double().sum()) if count else 0.0
        totals[f"{reward.name}/accuracy_sum"] = accuracy * count if accuracy is not None else 0.0
        totals[f"{reward.name}/accuracy_count"] = count if accuracy is not None else 0
        for sub in reward.subscore_names:  # declared, so every process reduces the same keys (even with no images)
            totals[f"{reward.name}/{sub}_sum"] = extras.get(f"{reward.name}/{sub}", 0.0) * count
    diversity, groups = leaf_diversity(images, owners) if len(owners) else (0.0, 0)
    totals |= {"images": len(owners), "diversity": diversity, "groups": groups}
    tags = prompt_tags(metadata)
    totals |= tag_totals(run.eval_rewards, scores, [tags[int(p)] for p in owners] if tags else [], tags)
    sums = reduced_over_processes(acc, "sum", totals)
    metrics = {}
    for reward in run.eval_rewards:
        metrics[f"eval/{reward.name}/mean"] = sums[f"{reward.name}/sum"] / max(sums["images"], 1)
        if sums[f"{reward.name}/accuracy_count"]:
            metrics[f"eval/{reward.name}/accuracy"] = (sums[f"{reward.name}/accuracy_sum"]
                                                       / sums[f"{reward.name}/accuracy_count"])
        for sub in reward.subscore_names:
            metrics[f"eval/{reward.name}/{sub}"] = sums[f"{reward.name}/{sub}_sum"] / max(sums["images"], 1)
        metrics |= tag_means(reward.name, sums, tags)
    metrics["eval/diversity"] = sums["diversity"] / max(sums["groups"], 1)
    return metrics


def prompt_tags(metadata: list[dict] | None) -> list[str] | None:
    """Every evaluation prompt's `tag` (GenEval's category: single_object, counting, ...), or None unless every
    prompt has one. The full prompt list on every process, so every process reduces the same keys."""
    if not metadata or not all(isinstance(m.get("tag"), str) for m in metadata):
        return None
    return [m["tag"] for m in metadata]


def tag_totals(rewards: list, scores: torch.Tensor | None, image_tags: list[str], tags: list[str] | None
               ) -> dict[str, float]:
    """Per tag: the images and each reward's score sum (this process's share), for `tag_means`."""
    totals: dict[str, float] = {}
    for tag in sorted(set(tags or ())):
        mask = torch.tensor([t == tag for t in image_tags], dtype=torch.bool)
        totals[f"tag/{tag}/images"] = float(mask.sum())
        for index, reward in enumerate(rewards):
            totals[f"{reward.name}/tag/{tag}/sum"] = float(scores[index][mask].double().sum()) if mask.any() else 0.0
    return totals


def tag_means(name: str, sums: dict[str, float], tags: list[str] | None) -> dict[str, float]:
    """`eval/<name>/tag/<tag>`: the reward's mean per tag; `eval/<name>/tag_mean`: the unweighted mean over tags,
    GenEval's "overall" (each category counts once, however many prompts it has)."""
    if not tags:
        return {}
    means = {tag: sums[f"{name}/tag/{tag}/sum"] / sums[f"tag/{tag}/images"] for tag in sorted(set(tags))
             if sums[f"tag/{tag}/images"]}
    return {**{f"eval/{name}/tag/{tag}": value for tag, value in means.items()},
            f"eval/{name}/tag_mean": sum(means.values()) / len(means)}
