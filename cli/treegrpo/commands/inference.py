"""`treegrpo sample` and `treegrpo eval`: inference with a base model, optionally with a trained LoRA (local folder or
hub repo), plain ODE sampling or best-of-tree / pruned tree search with any reward as scorer."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffusers_tree import TreeRolloutPipeline, TreeSDEScheduler
from diffusers_tree.adapters import adapter_for, makes_videos
from treegrpo.commands.arguments import compute_device
from treegrpo.errors import UsageError
from treegrpo.model.loading import ModelLoadError, load_pipeline, stock_call
from treegrpo.rewards.base import score_with_accuracy
from treegrpo.run.metrics import image_grid
from treegrpo.run.seeds import sample_generators
from treegrpo.sources import load_source_images, source_argument, source_paths


class InferenceError(UsageError):
    """Bad inference input (reward spec, prompts, LoRA); exit code 2."""


@dataclass
class Settings:
    """Sampling settings; `None` fields take the model's stored defaults, then the family's."""

    steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None
    seed: int = 0
    auto_resize: bool | None = None  # editing models: the source resized to the family's preferred resolution
    # (the stock default), or kept; None: the shipped model's setting, else resized


def parse_reward_spec(spec: str) -> tuple[str, dict]:
    """`kind` or `kind:key=value,key=value` (values parsed as numbers/booleans when they look like one)."""
    kind, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        if "=" not in item:
            raise InferenceError(f"--reward {spec!r}: options must look like key=value (e.g. pickscore:scale=raw).")
        key, value = item.split("=", 1)
        options[key.strip()] = _literal(value.strip())
    return kind.strip(), options


def _literal(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def build_rewards(specs: list[str], device, dtype) -> list:
    from treegrpo.rewards import build_reward
    from treegrpo.rewards.registry import share_models

    rewards = []
    for spec in specs:
        kind, options = parse_reward_spec(spec)
        try:
            reward = build_reward(kind, device=device, dtype=dtype, **options)
        except ValueError as err:
            raise InferenceError(f"--reward {spec!r}: {err}") from None
        rewards.append(reward)
    return share_models(rewards)


def load_for_inference(model: str, lora: str | None, *, dtype: str = "fp32", device: str | None = None):
    device = device or compute_device()
    if lora:
        from treegrpo.hub.lora import lora_source

        lora_source(lora)  # checked before the (slow) model load
    loaded = load_pipeline(model, dtype=dtype, device=device, key="MODEL")
    if makes_videos(adapter_for(loaded.pipe)):
        raise ModelLoadError(f"{model} is a video model ({type(loaded.pipe).__name__}); treegrpo sample and eval "
                             "make and score images. Sample it with diffusers (the snippet on a pushed LoRA's card), "
                             "or train it: `treegrpo run` scores videos frame by frame.")
    if lora:
        from treegrpo.hub.lora import load_lora_into

        load_lora_into(loaded.pipe, lora)
    loaded.pipe.set_progress_bar_config(disable=True)
    return loaded


def call_kwargs(pipe, defaults: dict, settings: Settings) -> dict:
    """Keyword arguments for a stock pipeline call: explicit settings, then the model's stored defaults."""
    values = {"num_inference_steps": settings.steps, "guidance_scale": settings.guidance_scale,
              "height": settings.height, "width": settings.width,
              "max_sequence_length": settings.max_sequence_length}
    merged = {k: v if v is not None else defaults.get(k) for k, v in values.items()}
    auto_resize = settings.auto_resize if settings.auto_resize is not None else defaults.get("_auto_resize", True)
    return stock_call(pipe, {**merged, "auto_resize": auto_resize})


def generate(pipe, prompts: list[str], num_images: int, kwargs: dict, seed: int, batch_size: int = 16,
             on_prompt: Callable[[], None] | None = None, sources: list[str] | None = None):
    """ODE samples of the stock pipeline; image j of prompt p uses the noise seeded by (seed, p, j), so the same
    seed gives paired samples for base and base + LoRA. `on_prompt` is called after each prompt (progress).
    Editing models edit each prompt's source image (`sources`, paths)."""
    images = []
    for p, prompt in enumerate(prompts):
        source = source_argument(None if sources is None else sources[p])
        for start in range(0, num_images, batch_size):
            count = min(batch_size, num_images - start)
            generators = sample_generators(seed, p, start, count)
            with torch.no_grad():
                images += pipe(prompt=prompt, num_images_per_prompt=count, generator=generators, **source,
                               **kwargs).images
        if on_prompt is not None:
            on_prompt()
    return images


def best_of_tree_images(pipe, prompts: list[str], scorer, kwargs: dict, *, branch_factor: int | list[int],
                        window_width: int | None, window_start: int | None, beam: int | None, seed: int,
                        tail_steps: int | None = None):
    """Best leaf per prompt of a TreeGRPO tree (or of the pruned search when `beam` is set); `tail_steps` integrates
    the ODE tail after the window with the scheduler's tail solver."""
    scheduler = TreeSDEScheduler.from_scheduler(pipe.scheduler, branch_factor=branch_factor,
                                                window_width=window_width, window_start=window_start,
                                                tail_steps=tail_steps)
    scheduler.manual_seed(seed)
    rollout = TreeRolloutPipeline(pipe, scheduler)
    accepted = inspect.signature(TreeRolloutPipeline.__call__).parameters  # not the stock call's own (max_area)
    call = {k: v for k, v in kwargs.items() if k != "num_inference_steps" and k in accepted}
    if call.get("image") is not None:  # editing: the sources encoded once, resized as the stock call would
        settings = ("guidance_scale", "negative_prompt", "height", "width", "max_sequence_length")
        call["conditioning"] = rollout.encode(prompts, image=call.pop("image"),
                                              auto_resize=kwargs.get("_auto_resize", True),
                                              **{k: call.pop(k) for k in settings if k in call})
    steps = kwargs.get("num_inference_steps", 10)
    generator = torch.Generator().manual_seed(seed)
    if beam:
        return rollout.tree_search(prompts, scorer, beam=beam, num_inference_steps=steps, generator=generator,
                                   **call)
    return rollout.best_of_tree(prompts, scorer, num_inference_steps=steps, generator=generator, **call)


def save_images(images, prompts_per_image: list[str], out_dir: Path, columns: int) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, (image, prompt) in enumerate(zip(images, prompts_per_image, strict=True)):
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48]
        image.save(out_dir / f"{i:04d}_{slug}.png")
    scale = max(1, 128 // images[0].size[0])
    grid = out_dir / "grid.png"
    image_grid(images, columns=columns, labels=prompts_per_image, scale=scale).save(grid)
    return grid


def evaluate(model: str, prompts: list[str], reward_specs: list[str], *, lora: str | None, num_images: int,
             settings: Settings, dtype: str = "fp32", progress: EvalProgress | None = None,
             metadata: list[dict] | None = None) -> dict:
    """Mean ± std of every reward over `num_images` samples per prompt, for the base model and (if given) the base
    with the LoRA, on paired noise. Rewards that can judge right/wrong (digits, geneval) also report accuracy, and
    per GenEval category (`tag`) when the prompts' `metadata` has tags. `progress` hears of each phase and prompt
    (the CLI draws a bar from it)."""
    progress = progress or EvalProgress()
    if lora:
        from treegrpo.hub.lora import lora_source

        lora_source(lora)  # a wrong --lora fails now, not after the base model has sampled
    device = compute_device()
    rewards = build_rewards(reward_specs, device, torch.float32)
    results = {}
    progress.phase(f"loading {model}", None)
    loaded = load_for_inference(model, None, dtype=dtype, device=device)  # loaded once; the LoRA is added after
    kwargs = call_kwargs(loaded.pipe, loaded.defaults, settings)
    image_prompts = [p for p in prompts for _ in range(num_images)]
    image_metadata = [m for m in (metadata or [{} for _ in prompts]) for _ in range(num_images)]
    for label in ["base"] + (["lora"] if lora else []):
        if label == "lora":
            from treegrpo.hub.lora import load_lora_into

            load_lora_into(loaded.pipe, lora)
        progress.phase(f"sampling {label}", len(prompts))
        images = generate(loaded.pipe, prompts, num_images, kwargs, settings.seed, on_prompt=progress.advance,
                          sources=source_paths(metadata))
        progress.phase(f"scoring {label}", None)
        scores = {reward.name: reward_summary(reward, images, image_prompts, image_metadata) for reward in rewards}
        if num_images > 1:
            per_prompt = within_prompt_diversity(images, num_images)
            scores["diversity"] = {"mean": float(per_prompt.mean()), "std": float(per_prompt.std(unbiased=False)),
                                   "n": per_prompt.numel()}
        results[label] = scores
    return {"model": model, "lora": lora, "dtype": dtype, "prompts": len(prompts), "images_per_prompt": num_images,
            "seed": settings.seed, "results": results}


def reward_summary(reward, images: list, prompts: list[str], metadata: list[dict]) -> dict:
    """Mean, std and n of one reward; its accuracy if it judges right/wrong; and, when the metadata carries
    GenEval tags, the accuracy per tag and GenEval's overall score (the unweighted mean over tags)."""
    tags = [m.get("tag") for m in metadata]
    groups = {tag: [i for i, t in enumerate(tags) if t == tag] for tag in dict.fromkeys(tags)}
    values = torch.empty(len(images))
    subscores = {sub: torch.empty(len(images)) for sub in reward.subscore_names}
    correct_by_tag, total = {}, 0.0
    for tag, index in groups.items():  # scored group by group: the per-tag accuracy comes with no extra pass
        group_values, accuracy = score_with_accuracy(reward, [images[i] for i in index], [prompts[i] for i in index],
                                                     [metadata[i] for i in index])
        values[index] = group_values
        for sub, sub_values in subscores.items():
            sub_values[index] = reward.last_subscores[sub].float().cpu()
        if accuracy is not None:
            correct_by_tag[tag] = float(accuracy)
            total += accuracy * len(index)
    summary = {"mean": float(values.mean()), "std": float(values.std(unbiased=False)), "n": values.numel()}
    if subscores:
        summary["subscores"] = {sub: float(sub_values.mean()) for sub, sub_values in subscores.items()}
    if len(correct_by_tag) == len(groups):
        summary["accuracy"] = total / len(images)
        if None not in groups:
            summary["by_tag"] = correct_by_tag
            summary["overall"] = sum(correct_by_tag.values()) / len(correct_by_tag)
    return summary


class EvalProgress:
    """What `evaluate` reports while it works; the default reports nowhere."""

    def phase(self, name: str, total: int | None) -> None:
        """A new phase (`total` prompts to go, or None when it has no count)."""

    def advance(self) -> None:
        """One more prompt of the phase done."""


def within_prompt_diversity(images, num_images: int) -> torch.Tensor:
    """Per prompt, the mean over all pairs of its `num_images` images of their RMS pixel distance (pixels in [0, 1]):
    0 means identical images; two independent uniform-noise images give ~0.41. A rising reward with a diversity
    falling toward 0 means the model collapsed onto one image per prompt (reward hacking shows as both). Images are
    grouped as `generate` returns them, prompt-major. Returns `[num_prompts]`."""
    pixels = torch.stack([torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
                          for image in images]).flatten(1)
    groups = pixels.reshape(-1, num_images, pixels.shape[1])  # [P, n, D]
    distance = torch.cdist(groups, groups) / pixels.shape[1] ** 0.5  # RMS distance of every pair
    pairs = num_images * (num_images - 1)
    return distance.sum(dim=(1, 2)) / pairs


def write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


class EvalBar(EvalProgress):
    """`eval`'s progress on stderr: the phase (loading, sampling base / lora, scoring) and prompts done, so a run of
    a minute or more is never silent."""

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        self._progress.__enter__()
        self._task = self._progress.add_task("starting", total=None)
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    def phase(self, name: str, total: int | None) -> None:
        self._progress.update(self._task, description=name, total=total, completed=0)

    def advance(self) -> None:
        self._progress.advance(self._task)


@dataclass(frozen=True)
class SampleRequest:
    """What `treegrpo sample` was asked for (its arguments, judged)."""

    model: str
    lora: str | None
    prompts: list[str]
    out: Path
    num_images: int  # per prompt, plain sampling
    dtype: str
    settings: Settings
    reward: str | None  # a scorer spec: best-of-tree (or the pruned search with `beam`) instead of plain sampling
    branch_factor: int | list[int]
    window_width: int | None
    window_start: int | None
    beam: int | None
    tail_steps: int | None
    metadata: list[dict] | None = None  # per prompt (a .jsonl's fields): what rewards like geneval score against


def sample_images(request: SampleRequest) -> list[str]:
    """`treegrpo sample`: plain ODE samples of the stock pipeline, or the best leaf of a tree per prompt scored by
    `request.reward`; writes the images and grid.png to `request.out`. Returns the lines to print."""
    loaded = load_for_inference(request.model, request.lora, dtype=request.dtype)
    kwargs = call_kwargs(loaded.pipe, loaded.defaults, request.settings)
    prompts, seed = request.prompts, request.settings.seed
    if request.reward is None:
        images = generate(loaded.pipe, prompts, request.num_images, kwargs, seed,
                          sources=source_paths(request.metadata))
        grid = save_images(images, [p for p in prompts for _ in range(request.num_images)], request.out,
                           columns=request.num_images)
        return [f"wrote {len(images)} images and {grid}"]
    (reward,) = build_rewards([request.reward], loaded.pipe.device, torch.float32)
    by_prompt = dict(zip(prompts, request.metadata or [{} for _ in prompts], strict=True))

    def scorer(images, leaf_prompts):  # each leaf is scored with its prompt's metadata (GenEval's objects, ...)
        return reward.score(images, leaf_prompts, [by_prompt[p] for p in leaf_prompts])

    paths = source_paths(request.metadata)
    sources = {} if paths is None else {"image": load_source_images(paths)}  # the tree: one source per prompt
    result = best_of_tree_images(loaded.pipe, prompts, scorer, {**kwargs, **sources},
                                 branch_factor=request.branch_factor,
                                 window_width=request.window_width, window_start=request.window_start,
                                 beam=request.beam, seed=seed, tail_steps=request.tail_steps)
    grid = save_images(result.images, prompts, request.out, columns=min(8, len(prompts)))
    lines = [f"{score:10.4f}  {p}" for p, score in zip(prompts, result.scores.tolist(), strict=True)]
    return [*lines, f"best-of-tree: {result.rows} denoiser rows; grid {grid}"]


def eval_table(data: dict):
    """`treegrpo eval`'s results as a rich table: a row per reward (and diversity), a column per model variant; for
    rewards scored per GenEval category, a row per category, GenEval's overall score and the share of images with
    objects nobody asked for."""
    from rich.table import Table

    table = Table(title=f"{data['model']}: {data['prompts']} prompts × {data['images_per_prompt']} images")
    table.add_column("reward")
    for label in data["results"]:
        table.add_column(label)
    variants = list(data["results"].values())
    for name in variants[0]:
        cells = []
        for scores in variants:
            entry = scores[name]
            text = f"{entry['mean']:.4f} ± {entry['std']:.4f}"
            if "accuracy" in entry:
                text += f"  (acc {entry['accuracy']:.1%})"
            cells.append(text)
        table.add_row(name, *cells)
        if "by_tag" in variants[0][name]:
            for tag in variants[0][name]["by_tag"]:
                table.add_row(f"  {tag}", *[f"{scores[name]['by_tag'][tag]:.1%}" for scores in variants])
            table.add_row("  GenEval overall", *[f"{scores[name]['overall']:.1%}" for scores in variants])
        if "with_extra" in variants[0][name].get("subscores", {}):  # geneval: what GenEval's rules let through
            table.add_row("  with extra objects", *[
                f"{scores[name]['subscores']['with_extra']:.1%} ({scores[name]['subscores']['extra_objects']:.2f} "
                "an image)" for scores in variants])
    return table
