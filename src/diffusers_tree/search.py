"""Inference-time search with trees: best-of-tree, a pruned (beam) tree search, and best-of-N for comparison.

A scorer is any callable `(images: list[PIL.Image.Image], prompts: list[str]) -> scores` (one float per image).
Budgets are counted in denoiser rows (CFG halves included), the unit that costs time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput

from .dynamics import predicted_clean_sample
from .plan import BranchPlan


@dataclass
class SearchOutput(BaseOutput):
    """Best image per prompt.

    Args:
        images (`list[PIL.Image.Image]`): the best image of each prompt.
        scores (`torch.Tensor`): `[num_prompts]` its score.
        candidate_scores (`list[torch.Tensor]`): the scores of every final candidate, per prompt.
        rows (`int`): denoiser rows spent (CFG halves included).
    """

    images: list
    scores: torch.Tensor
    candidate_scores: list
    rows: int


def _score(scorer, images, prompts) -> torch.Tensor:
    scores = torch.as_tensor(scorer(images, prompts), dtype=torch.float32).flatten().cpu()
    if scores.numel() != len(images):
        raise ValueError(f"The scorer returned {scores.numel()} scores for {len(images)} images.")
    return scores


def _pick_best(images, leaf_prompt: torch.Tensor, scores: torch.Tensor, num_prompts: int, rows: int):
    best_images, best_scores, per_prompt = [], [], []
    for p in range(num_prompts):
        idx = (leaf_prompt == p).nonzero().squeeze(1)
        candidates = scores[idx]
        best = int(idx[int(candidates.argmax())])
        best_images.append(images[best])
        best_scores.append(float(scores[best]))
        per_prompt.append(candidates)
    return SearchOutput(images=best_images, scores=torch.tensor(best_scores), candidate_scores=per_prompt, rows=rows)


def best_of_tree(rollout, prompts, scorer, **call_kwargs) -> SearchOutput:
    """Roll out full trees, score every leaf with `scorer`, return the best leaf per prompt.

    Example:
        ```py
        >>> out = tree_pipe.best_of_tree(["a red cat"], lambda images, prompts: [0.0] * len(images),
        ...                              num_inference_steps=10)
        ```
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    out = rollout(prompts, output_type="pil", return_record=False, **call_kwargs)
    per_prompt = len(out.images) // len(prompts)
    leaf_prompt = torch.arange(len(out.images)) // per_prompt
    scores = _score(scorer, out.images, [prompts[int(p)] for p in leaf_prompt])
    return _pick_best(out.images, leaf_prompt, scores, len(prompts), out.rows)


def tree_search(rollout, prompts, scorer, *, beam: int, max_batch_size: int = 64, **call_kwargs) -> SearchOutput:
    """Pruned tree search: before each window step after the first, and before the ODE tail, decode every frontier
    node's x̂0 prediction, score it, and keep only the best `beam` nodes per prompt; only they branch (or finish).
    More of the budget goes to promising branches; the final candidates are scored as images."""
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}.")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    scheduler = rollout.scheduler
    state = {}

    def prune(step: int, x: torch.Tensor, model_output: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        plan: BranchPlan = scheduler.plan
        start, end = plan.window_start, plan.window_start + plan.window_width
        if not (start < step <= end) or x.shape[0] <= beam * len(prompts):
            return torch.arange(x.shape[0], device=x.device)
        x0 = _clean_prediction(rollout, scheduler, model_output, x, step)
        images = rollout.decode(x0.to(x.dtype), state["conditioning"], max_batch_size, "pil")
        scores = _score(scorer, images, [prompts[int(p)] for p in prompt_index])
        keep = []
        for p in range(len(prompts)):
            idx = (prompt_index.cpu() == p).nonzero().squeeze(1)
            top = scores[idx].topk(min(beam, idx.numel())).indices
            keep.append(idx[top])
        return torch.cat(keep).sort().values.to(x.device)

    state["conditioning"] = rollout.encode(prompts, guidance_scale=call_kwargs.get("guidance_scale"),
                                           negative_prompt=call_kwargs.pop("negative_prompt", None),
                                           height=call_kwargs.get("height"), width=call_kwargs.get("width"),
                                           max_sequence_length=call_kwargs.get("max_sequence_length"),
                                           num_frames=call_kwargs.get("num_frames"))
    out = rollout(prompts, conditioning=state["conditioning"], output_type="pil", prune=prune,
                  max_batch_size=max_batch_size, **call_kwargs)
    # survivors are ordered by prompt (kept indices are sorted and frontier rows are prompt-major)
    per_prompt = len(out.images) // len(prompts)
    leaf_prompt = torch.arange(len(out.images)) // per_prompt
    scores = _score(scorer, out.images, [prompts[int(p)] for p in leaf_prompt])
    return _pick_best(out.images, leaf_prompt, scores, len(prompts), out.rows)


def best_of_n(pipe, prompts, scorer, *, n: int, num_inference_steps: int = 10, generator=None, **call_kwargs
              ) -> SearchOutput:
    """Best-of-N with the stock pipeline's own ODE sampler: `n` independent samples per prompt, best by `scorer`.
    Rows are counted at the denoiser (`n · num_inference_steps` per prompt, × 2 with CFG)."""
    from .adapters import adapter_for, makes_videos, stock_call_kwargs

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    adapter = adapter_for(pipe)
    if makes_videos(adapter):
        raise ValueError(f"best_of_n samples and scores images; {type(pipe).__name__} makes videos. Use "
                         "TreeRolloutPipeline.best_of_tree, whose scorer receives the videos.")
    images = []
    with count_rows(adapter.denoiser) as counter:
        # One prompt per call: Qwen-Image's and SANA's `encode_prompt` repeat embeddings but tile masks when prompts
        # of different lengths ask for several images each. By keyword (FLUX.2 takes `image` first), in a fresh
        # list (Z-Image writes its templated prompts into the list it is given).
        for prompt in prompts:
            call = stock_call_kwargs(pipe, {**call_kwargs, "prompt": [prompt]})
            images += pipe(num_images_per_prompt=n, num_inference_steps=num_inference_steps, generator=generator,
                           output_type="pil", **call).images
    leaf_prompt = torch.arange(len(images)) // n
    scores = _score(scorer, images, [prompts[int(p)] for p in leaf_prompt])
    return _pick_best(images, leaf_prompt, scores, len(prompts), counter.rows)


class count_rows:  # noqa: N801 (a context manager used like a function)
    """Count the latent rows that go through `module` while the context is open: `with count_rows(m) as c: ...`,
    then `c.rows`, `c.calls` and `c.max_rows` (the largest single forward)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.rows, self.calls, self.max_rows = module, 0, 0, 0

    def _hook(self, module, args, kwargs):
        latents = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        rows = len(latents)  # a batch tensor, or Z-Image's list of per-sample latents
        self.rows += rows
        self.max_rows = max(self.max_rows, rows)
        self.calls += 1

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def _clean_prediction(rollout, scheduler, model_output, x, step: int) -> torch.Tensor:
    if scheduler.family == "flow":
        return predicted_clean_sample(model_output, x, sigma=float(scheduler.sigma_table[step]))
    alpha, _ = scheduler.alpha_pair(torch.tensor(step))
    return predicted_clean_sample(model_output, x, alpha_prod=float(alpha),
                                  prediction_type=scheduler.config.prediction_type)
