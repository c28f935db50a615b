"""What every family adapter is: the `PipelineAdapter` base class with every hook the tree loop, the scheduler and
the trainer call, each with its default, the per-prompt `Conditioning`, and the registry of families.

A family file (`sd3.py`, `flux.py`, ...) subclasses `PipelineAdapter`, registers it for its pipeline class names
with `@register_adapter`, implements the five required methods and overrides only the hooks where its pipeline
differs. No caller probes an adapter for a hook it may lack: a hook that is not overridden is the default
below (diffusers' `scheduling_utils.py` beside its schedulers is the model).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

_ADAPTERS: dict[str, type[PipelineAdapter]] = {}


@dataclass
class Conditioning:
    """Prompt conditioning, encoded once per prompt and indexed per node row.

    Args:
        cond (`dict[str, torch.Tensor]`): per-prompt tensors `[P, ...]` passed to the denoiser by keyword.
        uncond (`dict[str, torch.Tensor]`, *optional*): the negative-prompt tensors `[P, ...]` when CFG is on.
        shared (`dict[str, Any]`): tensors the same for every row (FLUX's `txt_ids`/`img_ids`, guidance).
        guidance_scale (`float`): g of `u + g·(c - u)` (CFG) or FLUX's distilled guidance.
        height, width (`int`): the image size, for families whose denoiser or decoder needs it.
        num_frames (`int`, *optional*): the video length in frames for video families (Wan); `None` for images.
    """

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None
    guidance_scale: float
    height: int
    width: int
    shared: dict[str, Any] = field(default_factory=dict)
    num_frames: int | None = None

    @property
    def do_cfg(self) -> bool:
        return self.uncond is not None

    @property
    def num_prompts(self) -> int:
        return next(iter(self.cond.values())).shape[0]

    def to(self, device: torch.device | str) -> Conditioning:
        """The same conditioning with its per-prompt tensors on `device` (`shared` stays: it lives with the model)."""

        def move(tensors):
            return None if tensors is None else {k: v.to(device) for k, v in tensors.items()}

        return replace(self, cond=move(self.cond), uncond=move(self.uncond))

    def select(self, start: int, stop: int) -> Conditioning:
        """Prompts `start:stop` of this conditioning (`concat`'s inverse), e.g. one group of an epoch's prompts."""

        def part(tensors):
            return None if tensors is None else {k: v[start:stop] for k, v in tensors.items()}

        return replace(self, cond=part(self.cond), uncond=part(self.uncond))

    @staticmethod
    def concat(parts: list[Conditioning]) -> Conditioning:
        """Prompts of several conditionings in order (they must share guidance, size and `shared`)."""
        first = parts[0]

        def join(name):
            if getattr(first, name) is None:
                return None
            return {k: torch.cat([getattr(part, name)[k] for part in parts]) for k in getattr(first, name)}

        return replace(first, cond=join("cond"), uncond=join("uncond"))


class PipelineAdapter:
    """One pipeline family as the tree loop sees it. Subclasses implement `encode`, `prepare_latents`,
    `set_timesteps`, `model_forward` and `decode`, set `default_guidance_scale` and `prediction_type`, and override
    the hooks below where their pipeline differs.

    `model` is what every forward calls: the denoiser itself unless a trainer puts its DDP/FSDP-wrapped module there,
    so an adapter never calls `self.pipe.transformer` for a forward."""

    denoiser_name: str = "transformer"  # the pipeline component that denoises ("unet" for SD1.5 / SDXL)
    default_guidance_scale: float  # the pipeline's own default
    prediction_type: str  # "flow" | "epsilon" | "v_prediction"
    # module names a LoRA targets by default (peft matches name endings): every attention's projections
    lora_target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]  # noqa: RUF012 (never mutated)
    default_num_frames: int | None = None  # video families (Wan): the stock default frame count; None: images
    # what a LoRA's Hub card says: its tags (the family's first, as diffusers' training scripts tag) and pipeline tag
    hub_tags: tuple[str, ...] = ()
    hub_task: str = "text-to-image"
    # editing families (FLUX.1 Kontext) take source images: `encode(..., image=...)` conditions every prompt on one;
    # `needs_source_image`: they edit only (FLUX.2 takes reference images but also generates from text alone)
    takes_source_image: bool = False
    needs_source_image: bool = True
    max_sources: int | None = 1  # source images per prompt (None: any number, FLUX.2's references)

    @classmethod
    def encoded_source_size(cls, width: int, height: int, auto_resize: bool = True) -> tuple[int, int]:
        """The (width, height) in pixels at which the family's stock pipeline VAE-encodes a source image of that
        size (editing families; memory planning counts the tokens it adds to every row). Default: as given."""
        return width, height

    @classmethod
    def source_text_tokens(cls, width: int, height: int) -> float:
        """Tokens a source image adds to the text sequence (a vision-language encoder's view of it); default none."""
        return 0.0

    def __init__(self, pipe):
        self.pipe = pipe
        self.model = getattr(pipe, self.denoiser_name)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    # ---- what every family implements ------------------------------------------------------------------------------
    def encode(self, prompts: list[str], *, negative_prompt: str | list[str] | None, guidance_scale: float,
               height: int, width: int, max_sequence_length: int | None) -> Conditioning:
        """Each prompt's conditioning (and, with CFG, the negative prompt's), `[P, ...]` tensors."""
        raise NotImplementedError

    def prepare_latents(self, num: int, height: int, width: int, generator, dtype: torch.dtype) -> torch.Tensor:
        """Noise as the stock pipeline draws it (scaled by the pipeline's own scheduler). Video families also take
        `num_frames=` and return `[num, C, F', h, w]`."""
        raise NotImplementedError

    def set_timesteps(self, scheduler, num_inference_steps: int, latents: torch.Tensor) -> None:
        """`scheduler.set_timesteps(...)` with the sigmas / `mu` the stock pipeline passes."""
        raise NotImplementedError

    def model_forward(self, latents: torch.Tensor, timestep: torch.Tensor, inputs: dict[str, torch.Tensor],
                      conditioning: Conditioning) -> torch.Tensor:
        """The denoiser's output for rows `latents` with per-row `inputs` (indexed from the conditioning)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """Latents to float images `[N, 3, H, W]` in [0, 1] (video families: `[N, F, 3, H, W]`)."""
        raise NotImplementedError

    # ---- hooks with defaults ----------------------------------------------------------------------------------------
    @classmethod
    def claims_lora_keys(cls, keys: list[str]) -> bool:
        """Whether a LoRA file with these keys (diffusers' `transformer.` / `unet.` prefixes) can only be this
        family's, when nothing else names the base model. UNet LoRAs fit SD1.5 and SDXL alike: none claims them."""
        return False

    @classmethod
    def uses_cfg(cls, guidance_scale: float, pipeline_config: dict) -> bool:
        """Whether this family guides with CFG (two rows per node) at `guidance_scale`; `pipeline_config` is the
        pipeline's config (model_index.json). diffusers' rule for most families: g > 1. `encode` decides with it,
        and `treegrpo check` reads it without loading the model."""
        return guidance_scale > 1

    def combine_guidance(self, uncond_out: torch.Tensor, cond_out: torch.Tensor,
                         conditioning: Conditioning) -> torch.Tensor:
        """The guided output from the two CFG halves, at sampling and at training alike: `u + g·(c - u)`. Families
        whose pipelines guide otherwise (Qwen-Image's norm rescale, Z-Image's `pos + g·(pos - neg)`) override it."""
        return uncond_out + conditioning.guidance_scale * (cond_out - uncond_out)

    @property
    def pixels_per_patch(self) -> int:
        """Image height and width must be multiples of this: the VAE's downsampling × the denoiser's patch."""
        patch = getattr(self.denoiser.config, "patch_size", None) or 1
        return self.pipe.vae_scale_factor * patch

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) when none is given: the pipeline's `default_sample_size` (or the denoiser's
        `sample_size`) × the VAE factor, as the stock pipelines do."""
        size = getattr(self.pipe, "default_sample_size", None) or self.denoiser.config.sample_size
        return size * self.pipe.vae_scale_factor, size * self.pipe.vae_scale_factor

    def stock_call_kwargs(self, kwargs: dict) -> dict:
        """Keyword arguments for the stock pipeline's own call that sample as the tree does (Qwen-Image: its CFG
        scale is `true_cfg_scale`; SANA: no resolution binning; FLUX.2 klein: negative prompt embeddings)."""
        return dict(kwargs)

    def pipeline_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Roots in the layout the stock pipeline's `latents=` takes (FLUX.2 steps packed latents, takes unpacked)."""
        return latents

    def latent_output(self, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """Leaves as the stock pipeline returns them for `output_type="latent"` (FLUX.2 klein: unpacked)."""
        return latents

    def postprocess(self, images: torch.Tensor, output_type: str):
        """Decoded float images in [0, 1] as the stock pipeline returns them for `"pil"` / `"np"` (video families:
        as their pipeline's `frames`)."""
        processor = self.pipe.image_processor
        if output_type == "pil":
            return processor.numpy_to_pil(processor.pt_to_numpy(images))
        if output_type == "np":
            return processor.pt_to_numpy(images)
        raise ValueError(f"Unknown output_type {output_type!r}; choose 'pt', 'pil', 'np' or 'latent'.")


def register_adapter(*pipeline_class_names: str):
    """Class decorator: use this adapter for pipelines of these class names (and their subclasses)."""

    def wrap(cls):
        for name in pipeline_class_names:
            _ADAPTERS[name] = cls
        return cls

    return wrap


def adapter_for(pipe) -> PipelineAdapter:
    """The adapter registered for `pipe`'s class (or the nearest registered base class)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__](pipe)
    raise ValueError(
        f"No tree-rollout adapter for {type(pipe).__name__}; supported: {sorted(_ADAPTERS)}. "
        "Add one file in diffusers_tree/adapters/ to support a new family."
    )


def registered_adapters() -> dict[str, type[PipelineAdapter]]:
    """Pipeline class name → its adapter class, for every registered family."""
    return dict(_ADAPTERS)


def adapter_class(pipeline_class_name: str) -> type[PipelineAdapter] | None:
    """The adapter class registered for a pipeline class name (or its nearest registered diffusers base class),
    without a loaded pipeline; None when there is none."""
    import diffusers

    pipeline_class = getattr(diffusers, pipeline_class_name, None)
    names = [cls.__name__ for cls in pipeline_class.__mro__] if isinstance(pipeline_class, type) else \
        [pipeline_class_name]
    return next((_ADAPTERS[name] for name in names if name in _ADAPTERS), None)


def makes_videos(adapter: PipelineAdapter) -> bool:
    """Video families (Wan) say so by declaring `default_num_frames`."""
    return adapter.default_num_frames is not None


def source_sets(image, num_prompts: int, per_prompt: int | None = 1) -> list[list]:
    """Each prompt's source images from an editing family's `image` argument: one image for all prompts, or one
    entry per prompt, an image or (where `per_prompt` allows more than one; None: any number) a list of them."""
    entries = list(image) if isinstance(image, (list, tuple)) else [image] * num_prompts
    if len(entries) != num_prompts:
        raise ValueError(f"{len(entries)} source images for {num_prompts} prompts: give one per prompt, or one for "
                         "all.")
    sets = [list(e) if isinstance(e, (list, tuple)) else [e] for e in entries]
    if any(not images or (per_prompt is not None and len(images) > per_prompt) for images in sets):
        raise ValueError(f"1 to {per_prompt or 'any number of'} source images per prompt; got "
                         f"{[len(images) for images in sets]}.")
    return sets


def stock_call_kwargs(pipe, kwargs: dict) -> dict:
    """`kwargs` for a call of the stock pipeline `pipe` that samples as the tree does (its adapter's
    `stock_call_kwargs`)."""
    return adapter_for(pipe).stock_call_kwargs(dict(kwargs))


def guided_model_output(
    adapter: PipelineAdapter,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_index: torch.Tensor,
    conditioning: Conditioning,
) -> torch.Tensor:
    """The denoiser output used by every step formula: with CFG, one batched forward over [uncond; cond] rows and
    the family's `combine_guidance`; without, the conditional output. `latents` `[R, ...]`, `timestep` and
    `prompt_index` `[R]`. The same function runs at sampling and at training time, so the guided output matches
    exactly."""
    cond = {k: v[prompt_index] for k, v in conditioning.cond.items()}
    if not conditioning.do_cfg:
        return adapter.model_forward(latents, timestep, cond, conditioning)
    both = {k: torch.cat([conditioning.uncond[k][prompt_index], cond[k]]) for k in cond}
    out = adapter.model_forward(torch.cat([latents, latents]), torch.cat([timestep, timestep]), both, conditioning)
    uncond_out, cond_out = out.chunk(2)
    return adapter.combine_guidance(uncond_out, cond_out, conditioning)


def unet_latents(pipe, num: int, height: int, width: int, generator, dtype: torch.dtype) -> torch.Tensor:
    """Initial noise of the UNet pipelines, drawn by the pipeline itself, scaled by its scheduler's
    `init_noise_sigma` (the rollout pipeline rescales it to the tree scheduler's)."""
    channels = pipe.unet.config.in_channels
    return pipe.prepare_latents(num, channels, height, width, dtype, pipe._execution_device, generator)


def postprocess_decoded(pipe, image: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] to float images in [0, 1], as the pipelines' `output_type="pt"`."""
    return pipe.image_processor.postprocess(image, output_type="pt")
