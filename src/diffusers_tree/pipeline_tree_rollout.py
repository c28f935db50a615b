"""`TreeRolloutPipeline`: tree rollouts in which every unique node goes through the denoiser exactly once.

The frontier of all trees of all prompts advances in lockstep (every tree has the same plan, so all frontier nodes
sit at the same step): one timestep per step, the frontier batched (chunked to `max_batch_size` rows) with CFG's
[uncond; cond] halves in the same forward. At an SDE step each frontier node's single model output gives the mean
of all its `k` children. The noise convention is the scheduler's (`draw_branch_noise`), so with the same root
latents and generator the leaves equal the stock pipeline's with `TreeSDEScheduler` swapped in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from diffusers.utils import BaseOutput

from .adapters import (
    Conditioning,
    PipelineAdapter,
    adapter_for,
    guided_model_output,
    makes_videos,
    registered_adapters,
)
from .noise import draw_branch_noise
from .plan import BranchPlan
from .record import RecordBuilder, RolloutRecord
from .scheduling_tree_sde import TreeSDEScheduler

logger = logging.getLogger(__name__)

# prune(step_index, latents [R, ...], model_output [R, ...], prompt_index [R]) -> indices of frontier rows to keep
PruneFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TreeRolloutOutput(BaseOutput):
    """Output of [`TreeRolloutPipeline.__call__`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): every leaf, grouped by prompt, then tree,
            then leaf (`[num_prompts · num_trees · num_leaves, 3, H, W]` in [0, 1] for `output_type="pt"`). Video
            families (Wan): videos, `[N, F, 3, H, W]` for `"pt"`, as the stock pipeline's `frames` otherwise.
        record ([`RolloutRecord`], *optional*): the tree structure, log-probs and latents for training.
        rows (`int`): latent rows that went through the denoiser (CFG halves counted).
    """

    images: object
    record: RolloutRecord | None
    rows: int


class TreeRolloutPipeline:
    """Samples TreeGRPO trees (or the flat/mix peer shapes) with a stock pipeline's own components.

    A wrapper around the stock pipeline rather than one pipeline subclass per family: the family quirks stay in one
    small adapter file each, and everything users already did to their pipeline (LoRAs loaded with
    `load_lora_weights`, offload hooks, dtype and device) applies because the same modules run. Call it like a
    diffusers pipeline: `tree(prompt, ...)` returns PIL images by default.

    Args:
        pipe: a `StableDiffusionPipeline`, `StableDiffusionXLPipeline`, `StableDiffusion3Pipeline` or `FluxPipeline`.
        scheduler ([`TreeSDEScheduler`]): the tree scheduler; its plan decides the tree shape.

    Example:
        ```py
        >>> import torch
        >>> from diffusers_tree import TreeRolloutPipeline, TreeSDEScheduler
        >>> from diffusers_tree.testing import tiny_sd3_pipeline
        >>> pipe = tiny_sd3_pipeline()
        >>> tree = TreeRolloutPipeline.from_pipe(pipe, scheduler=TreeSDEScheduler.from_scheduler(pipe.scheduler,
        ...                                                               window_start=2))
        >>> out = tree(["a red cat"], num_inference_steps=10, height=32, width=32, max_sequence_length=16,
        ...            generator=torch.Generator().manual_seed(0))
        >>> len(out.images), out.rows  # 27 leaves (PIL images); (2 + 13 + 27·5) nodes × 2 CFG halves
        (27, 300)
        ```
    """

    def __init__(self, pipe, scheduler: TreeSDEScheduler, adapter: PipelineAdapter | None = None):
        if not isinstance(scheduler, TreeSDEScheduler):
            raise TypeError(f"scheduler must be a TreeSDEScheduler, got {type(scheduler).__name__}; wrap it with "
                            "TreeSDEScheduler.from_scheduler(pipe.scheduler, ...).")
        self.pipe = pipe
        self.scheduler = scheduler
        self.adapter = adapter or adapter_for(pipe)

    @classmethod
    def from_pipe(cls, pipe, scheduler: TreeSDEScheduler | None = None, **tree_kwargs) -> TreeRolloutPipeline:
        """Build from a loaded stock pipeline; `scheduler` defaults to wrapping `pipe.scheduler` with `tree_kwargs`.
        A pipe whose scheduler already is a `TreeSDEScheduler` keeps its tree, with `tree_kwargs` changing it."""
        if scheduler is None:
            scheduler = TreeSDEScheduler.from_scheduler(pipe.scheduler, **tree_kwargs)
        elif tree_kwargs:
            raise ValueError(f"Pass tree settings {sorted(tree_kwargs)} to the scheduler, not with `scheduler=`.")
        return cls(pipe, scheduler)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.adapter.denoiser

    def set_progress_bar_config(self, **kwargs) -> None:
        self.pipe.set_progress_bar_config(**kwargs)

    # ---- public entry points ----------------------------------------------------------------------------------
    def encode(self, prompts: list[str], *, guidance_scale: float | None = None, negative_prompt=None,
               height: int | None = None, width: int | None = None,
               max_sequence_length: int | None = None, num_frames: int | None = None, image=None,
               auto_resize: bool = True) -> Conditioning:
        """Encode each prompt once (cond and, with CFG, uncond); reused for sampling and training forwards. Video
        families also record `num_frames` (their default when `None`) for the rollouts that use the conditioning.
        Editing families (`adapter.takes_source_image`) take `image`: one source image per prompt, or one for all,
        encoded here once; `auto_resize` (the stock default) first resizes it to the family's preferred resolution
        nearest its aspect ratio (FLUX.1 Kontext's list), else it keeps its size."""
        height, width = self._size(height, width)
        num_frames = self._num_frames(num_frames)
        guidance_scale = self.adapter.default_guidance_scale if guidance_scale is None else guidance_scale
        source = {}
        if image is not None:
            if not self.adapter.takes_source_image:
                raise ValueError(f"{type(self.pipe).__name__} takes no source image; pipelines that take one: "
                                 f"{', '.join(n for n, a in registered_adapters().items() if a.takes_source_image)}.")
            source = {"image": image, "auto_resize": auto_resize}
        with torch.no_grad():
            conditioning = self.adapter.encode(list(prompts), negative_prompt=negative_prompt,
                                               guidance_scale=guidance_scale, height=height, width=width,
                                               max_sequence_length=max_sequence_length, **source)
        return conditioning if num_frames is None else replace(conditioning, num_frames=num_frames)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        num_trees: int = 1,
        num_inference_steps: int = 10,
        window_start: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int | None = None,
        num_frames: int | None = None,
        image=None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        conditioning: Conditioning | None = None,
        max_batch_size: int = 64,
        output_type: str = "pil",
        return_record: bool = True,
        record_device: str | torch.device | None = None,
        prune: PruneFn | None = None,
    ) -> TreeRolloutOutput:
        """Roll out `num_trees` trees per prompt.

        Args:
            prompt (`str` or `list[str]`): the prompt or prompts, one group (tree or trees) each.
            num_trees, num_inference_steps (`int`, defaults to 1 and 10): trees per prompt; T.
            window_start (`int`, *optional*): override the scheduler's window start (the trainer's epoch draw).
            guidance_scale (`float`, *optional*): CFG scale (FLUX: distilled guidance); the family's default.
            num_frames (`int`, *optional*): video families (Wan: 4k + 1); else the conditioning's, or the default.
            image (*optional*): editing families (Kontext): the source image(s), as `encode` takes them.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): the root noise, then one branch-noise
                tensor per SDE step (else the scheduler's `manual_seed` generator, else the global RNG); one per tree
                (`num_prompts · num_trees`, prompt-major) makes each tree independent of its batch-mates.
            latents (`torch.Tensor`, *optional*): roots `[num_prompts · num_trees, ...]`, packed as the pipeline packs.
            conditioning ([`Conditioning`], *optional*): pre-encoded prompts from [`~TreeRolloutPipeline.encode`].
            max_batch_size (`int`, defaults to 64): most latent rows per denoiser forward, CFG halves included.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` (float in [0, 1]) or `"latent"`.
            return_record (`bool`, defaults to `True`): build the [`RolloutRecord`]; its latents on `record_device`.
            prune (`callable`, *optional*): before each transition, the frontier rows to keep (tree search; no record).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        # 1. the conditioning: given (its size and frame count win) or encoded now
        if conditioning is None:
            conditioning = self.encode(prompts, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                                       height=height, width=width, max_sequence_length=max_sequence_length,
                                       num_frames=num_frames, image=image)
        self.check_inputs(prompts, conditioning, height, width, num_frames, num_trees, generator, latents,
                          max_batch_size, prune)
        # 2. the roots and the schedule
        latents = self._roots(len(prompts) * num_trees, conditioning, generator) if latents is None else latents
        self.adapter.set_timesteps(self.scheduler, num_inference_steps, latents)
        if window_start is not None:
            self.scheduler.set_window_start(window_start)
        # 3. the tree, every unique node once; then the leaves decoded
        leaves, record, rows = self._expand(latents, conditioning, num_trees, generator, max_batch_size, prune,
                                            return_record and prune is None, record_device)
        images = leaves if output_type == "latent" else self.decode(leaves, conditioning, max_batch_size, output_type)
        return TreeRolloutOutput(images=images, record=record, rows=rows)

    def check_inputs(self, prompts: list[str], conditioning: Conditioning, height, width, num_frames, num_trees: int,
                     generator, latents, max_batch_size: int, prune) -> None:
        """The call's arguments agree with each other and with the conditioning (encoded for one image size and
        frame count: FLUX's image ids, SDXL's time ids)."""
        if (height or conditioning.height, width or conditioning.width) != (conditioning.height, conditioning.width):
            raise ValueError(f"height/width {height}x{width} differ from the conditioning's "
                             f"{conditioning.height}x{conditioning.width}; encode for the size you sample.")
        if num_frames is not None and num_frames != conditioning.num_frames:
            raise ValueError(f"num_frames={num_frames} differs from the conditioning's "
                             f"{conditioning.num_frames}; encode with the num_frames you sample.")
        if conditioning.num_prompts != len(prompts):
            raise ValueError(f"conditioning has {conditioning.num_prompts} prompts but {len(prompts)} were given.")
        num_roots = len(prompts) * num_trees
        if isinstance(generator, list) and (len(generator) != num_roots or prune is not None):
            raise ValueError(f"A generator list needs one generator per tree ({num_roots}) and no pruning; got "
                             f"{len(generator)}.")
        if num_trees < 1 or max_batch_size < (2 if conditioning.do_cfg else 1):
            raise ValueError(f"num_trees ({num_trees}) must be >= 1 and max_batch_size ({max_batch_size}) >= 2.")
        if latents is not None and latents.shape[0] != num_roots:
            raise ValueError(f"latents has {latents.shape[0]} rows; expected num_prompts × num_trees = {num_roots}.")

    def prepare_roots(self, num: int, height: int, width: int, generator, dtype: torch.dtype,
                      num_frames: int | None = None) -> torch.Tensor:
        """Root noise in the pipeline's layout, at the tree scheduler's scale. The stock `prepare_latents` scales by
        the pipeline's own scheduler (SDXL's Euler: init_noise_sigma ≈ 14.6), while the tree scheduler steps from
        its own `init_noise_sigma` (1: DDIM on variance-preserving latents, or flow matching). `num_frames`: video
        families only (their default when `None`)."""
        num_frames = self._num_frames(num_frames)
        video = {} if num_frames is None else {"num_frames": num_frames}  # image adapters take no frame count
        latents = self.adapter.prepare_latents(num, height, width, generator, dtype, **video)
        scale = self.scheduler.init_noise_sigma / getattr(self.pipe.scheduler, "init_noise_sigma", 1.0)
        return latents if scale == 1 else latents * scale

    def best_of_tree(self, prompts, scorer, **call_kwargs):
        """Score every leaf with `scorer(images, prompts)` and return the best image per prompt (see `search.py`)."""
        from .search import best_of_tree

        return best_of_tree(self, prompts, scorer, **call_kwargs)

    def tree_search(self, prompts, scorer, beam: int, **call_kwargs):
        """Pruned tree search: keep the best `beam` nodes per prompt at each window depth (see `search.py`)."""
        from .search import tree_search

        return tree_search(self, prompts, scorer, beam=beam, **call_kwargs)

    # ---- the loop ---------------------------------------------------------------------------------------------
    def model_output(self, latents: torch.Tensor, timestep: torch.Tensor, prompt_index: torch.Tensor,
                     conditioning: Conditioning, max_batch_size: int) -> torch.Tensor:
        """Guided denoiser output for frontier rows, in chunks of at most `max_batch_size` denoiser rows."""
        chunk = max_batch_size // (2 if conditioning.do_cfg else 1)
        outputs = []
        for start in range(0, latents.shape[0], chunk):
            part = slice(start, start + chunk)
            outputs.append(guided_model_output(self.adapter, latents[part], timestep[part], prompt_index[part],
                                               conditioning))
        return torch.cat(outputs)

    def _expand(self, roots, conditioning, num_trees, generator, max_batch_size, prune, build_record, record_device):
        plan, generator = self.scheduler.plan, generator or self.scheduler.noise_generator
        device = roots.device
        num_roots = roots.shape[0]
        x = roots
        prompt = torch.arange(num_roots, device=device) // num_trees
        builder = RecordBuilder(plan, prompt.shape[0] // num_trees, num_trees, record_device) if build_record else None
        node = builder.add_roots(prompt) if builder else None
        rows = 0
        cfg_factor = 2 if conditioning.do_cfg else 1
        # with a tail solver the steps after the window are the solver's (plan.tail_levels), not one per timestep
        stepwise = plan.num_steps if not plan.tail_compressed else plan.tail_start
        with self.pipe.progress_bar(total=len(plan.model_steps)) as progress:
            for i in range(stepwise):
                timestep = self.scheduler.timesteps[i].expand(x.shape[0])
                out = self.model_output(x, timestep, prompt, conditioning, max_batch_size)
                rows += x.shape[0] * cfg_factor
                if prune is not None:
                    keep = prune(i, x, out, prompt)
                    x, out, prompt = x[keep], out[keep], prompt[keep]
                factor = plan.branch_factors[i]
                source = torch.arange(x.shape[0], device=device).repeat_interleave(factor)
                if plan.sde_steps[i]:
                    # Eq. 7's window: one forward per parent, k children from its single mean
                    trees = len(generator) if isinstance(generator, list) else 1
                    noise = draw_branch_noise(trees, source.shape[0] // trees, tuple(x.shape[1:]),
                                              generator=generator, device=device)
                    result = self.scheduler.transition(out[source], x[source], i, stochastic=True, noise=noise)
                else:
                    result = self.scheduler.transition(out, x, i, stochastic=False)
                if builder:
                    node = builder.add_step(i, node, source, x, result, self.scheduler.timesteps[i])
                x, prompt = result.prev_sample, prompt[source]
                progress.update()
            if stepwise < plan.num_steps:
                x, rows = self._solve_tail(x, prompt, conditioning, plan, max_batch_size, prune, rows, progress)
                if builder:  # the leaves' edge from their level-L ancestor stands for the whole tail (record.py)
                    node = builder.add_tail(node)
        record = builder.finish(x, node, rows) if builder else None
        return x, record, rows

    def _solve_tail(self, x, prompt, conditioning, plan: BranchPlan, max_batch_size, prune, rows, progress):
        """The ODE tail from level L with the scheduler's multistep solver: one forward per leaf per solver step."""
        levels = plan.tail_levels
        solver = self.scheduler.tail_solver(levels)
        cfg_factor = 2 if conditioning.do_cfg else 1
        for j, level in enumerate(levels[:-1]):
            timestep = self.scheduler.timesteps[level]
            out = self.model_output(x, timestep.expand(x.shape[0]), prompt, conditioning, max_batch_size)
            rows += x.shape[0] * cfg_factor
            if prune is not None and j == 0:  # before the tail only: the solver's history is per row
                keep = prune(level, x, out, prompt)
                x, out, prompt = x[keep], out[keep], prompt[keep]
            x = solver.step(out, timestep, x).prev_sample
            progress.update()
        return x, rows

    def decode(self, latents: torch.Tensor, conditioning: Conditioning, max_batch_size: int = 64,
               output_type: str = "pt"):
        """Decode latents in chunks to images in [0, 1] (`"pt"`), PIL (`"pil"`) or numpy (`"np"`)."""
        with torch.no_grad():
            images = torch.cat([self.adapter.decode(latents[s:s + max_batch_size], conditioning)
                                for s in range(0, latents.shape[0], max_batch_size)])
        if output_type == "pt":
            return images
        return self.adapter.postprocess(images, output_type)  # as the stock pipeline's "pil" / "np" (videos: frames)

    def _num_frames(self, num_frames):
        """`num_frames` or the video family's default; `None` for image families (which refuse a frame count)."""
        if not makes_videos(self.adapter):
            if num_frames is not None:
                raise ValueError(f"num_frames={num_frames} was given, but {type(self.pipe).__name__} makes images; "
                                 "num_frames is for video pipelines (Wan).")
            return None
        return self.adapter.default_num_frames if num_frames is None else num_frames

    def _roots(self, num: int, conditioning: Conditioning, generator) -> torch.Tensor:
        dtype = next(iter(conditioning.cond.values())).dtype
        return self.prepare_roots(num, conditioning.height, conditioning.width, generator, dtype,
                                  num_frames=conditioning.num_frames)

    def _size(self, height, width):
        default_height, default_width = self.adapter.default_size
        return height or default_height, width or default_width

