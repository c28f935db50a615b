"""One small adapter per pipeline family: prompt encoding, the denoiser call, timesteps, latents, decoding.

The tree loop in `pipeline_tree_rollout.py` talks to a pipeline only through the `PipelineAdapter` protocol and
never imports a model class. Adding a family = one file here that defines an adapter class and registers it with
`@register_adapter("PipelineClassName", ...)`, plus its test.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

_ADAPTERS: dict[str, type] = {}


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

    @staticmethod
    def concat(parts: list[Conditioning]) -> Conditioning:
        """Prompts of several conditionings in order (they must share guidance, size and `shared`)."""
        first = parts[0]

        def join(name):
            if getattr(first, name) is None:
                return None
            return {k: torch.cat([getattr(part, name)[k] for part in parts]) for k in getattr(first, name)}

        return replace(first, cond=join("cond"), uncond=join("uncond"))


class PipelineAdapter(Protocol):
    """What the tree loop needs from a pipeline family."""

    pipe: Any
    model: torch.nn.Module  # called for every forward; the pipeline's denoiser unless a trainer wraps it
    prediction_type: str  # "flow" | "epsilon" | "v_prediction"
    default_guidance_scale: float

    @property
    def denoiser(self) -> torch.nn.Module: ...

    def encode(self, prompts: list[str], *, negative_prompt: str | list[str] | None, guidance_scale: float,
               height: int, width: int, max_sequence_length: int | None) -> Conditioning: ...

    def prepare_latents(self, num: int, height: int, width: int, generator, dtype: torch.dtype) -> torch.Tensor:
        """Noise as the stock pipeline draws it (scaled by the pipeline's own scheduler)."""

    def set_timesteps(self, scheduler, num_inference_steps: int, latents: torch.Tensor) -> None: ...

    def model_forward(self, latents: torch.Tensor, timestep: torch.Tensor, inputs: dict[str, torch.Tensor],
                      conditioning: Conditioning) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor: ...

    # Optional, read with getattr by the loop and the trainer:
    #   lora_target_modules: list[str]  (class attribute) the denoiser's module names a LoRA targets by default
    #   pixels_per_patch: int  image height and width must be multiples of it (VAE factor × latent patch)
    #   combine_guidance(uncond_out, cond_out, conditioning) -> guided output, for pipelines whose CFG is not
    #       `u + g·(c - u)` (e.g. a norm rescale); used at sampling and training alike
    #   default_size: tuple[int, int]  (height, width) when the pipeline has no `default_sample_size`/`sample_size`
    #   stock_call_kwargs(kwargs) -> kwargs for the stock pipeline's own call that sample as the tree does
    #       (Qwen-Image: `true_cfg_scale`; SANA: no resolution binning); see `stock_call_kwargs` below
    #   pipeline_latents(latents, height, width) -> roots in the layout the stock pipeline's `latents=` takes, and
    #   latent_output(latents, conditioning) -> leaves as its `output_type="latent"` returns them, for families
    #       whose tree steps in another layout (FLUX.2 packs; klein returns unpacked VAE latents)
    # Video families (Wan) also have:
    #   default_num_frames: int  (class attribute) marks the family as video; `num_frames` when none is given
    #   prepare_latents(..., num_frames=None)  latents with a frame axis, `[num, C, F', h, w]`
    #   decode(...) -> float videos `[N, F, 3, H, W]` in [0, 1]
    #   postprocess(videos, output_type) -> what the stock pipeline returns for "pil" / "np"


class DenoiserAdapter:
    """What every adapter shares: the pipeline, its denoiser component (`denoiser_name`), and `model`, what every
    forward calls (the denoiser itself unless a trainer puts its DDP/FSDP-wrapped module there)."""

    denoiser_name = "transformer"

    def __init__(self, pipe):
        self.pipe = pipe
        self.model = getattr(pipe, self.denoiser_name)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @classmethod
    def uses_cfg(cls, guidance_scale: float, pipeline_config: dict) -> bool:
        """Whether this family guides with CFG (two rows per node) at `guidance_scale`; `pipeline_config` is the
        pipeline's config (model_index.json). diffusers' rule for most families: g > 1. `encode` decides with it,
        and `treegrpo check` reads it without loading the model."""
        return guidance_scale > 1


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


def adapter_class(pipeline_class_name: str) -> type | None:
    """The adapter class registered for a pipeline class name (or its nearest registered diffusers base class),
    without a loaded pipeline; None when there is none."""
    import diffusers

    pipeline_class = getattr(diffusers, pipeline_class_name, None)
    names = [cls.__name__ for cls in pipeline_class.__mro__] if isinstance(pipeline_class, type) else \
        [pipeline_class_name]
    return next((_ADAPTERS[name] for name in names if name in _ADAPTERS), None)


def makes_videos(adapter: PipelineAdapter) -> bool:
    """Video families (Wan) say so by declaring `default_num_frames`."""
    return getattr(adapter, "default_num_frames", None) is not None


def stock_call_kwargs(pipe, kwargs: dict) -> dict:
    """`kwargs` for a call of the stock pipeline that samples as the tree does, through the adapter's optional
    `stock_call_kwargs` (Qwen-Image: its CFG scale is `true_cfg_scale`; SANA: no resolution binning)."""
    translate = getattr(adapter_for(pipe), "stock_call_kwargs", None)
    return translate(dict(kwargs)) if translate is not None else dict(kwargs)


def guided_model_output(
    adapter: PipelineAdapter,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_index: torch.Tensor,
    conditioning: Conditioning,
) -> torch.Tensor:
    """The denoiser output used by every step formula: with CFG, one batched forward over [uncond; cond] rows and
    `u + g·(c - u)`; without, the conditional output. `latents` `[R, ...]`, `timestep` and `prompt_index` `[R]`.
    The same function runs at sampling and at training time, so the guided output matches exactly."""
    cond = {k: v[prompt_index] for k, v in conditioning.cond.items()}
    if not conditioning.do_cfg:
        return adapter.model_forward(latents, timestep, cond, conditioning)
    both = {k: torch.cat([conditioning.uncond[k][prompt_index], cond[k]]) for k in cond}
    out = adapter.model_forward(torch.cat([latents, latents]), torch.cat([timestep, timestep]), both, conditioning)
    uncond_out, cond_out = out.chunk(2)
    combine = getattr(adapter, "combine_guidance", None)  # families whose pipelines guide otherwise (Qwen-Image)
    if combine is not None:
        return combine(uncond_out, cond_out, conditioning)
    return uncond_out + conditioning.guidance_scale * (cond_out - uncond_out)


def unet_latents(pipe, num: int, height: int, width: int, generator, dtype: torch.dtype) -> torch.Tensor:
    """Initial noise of the UNet pipelines, drawn by the pipeline itself, scaled by its scheduler's
    `init_noise_sigma` (the rollout pipeline rescales it to the tree scheduler's)."""
    channels = pipe.unet.config.in_channels
    return pipe.prepare_latents(num, channels, height, width, dtype, pipe._execution_device, generator)


def postprocess_decoded(pipe, image: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] to float images in [0, 1], as the pipelines' `output_type="pt"`."""
    return pipe.image_processor.postprocess(image, output_type="pt")


from . import flux, flux2, qwenimage, sana, sd, sd3, sdxl, wan, zimage  # noqa: E402,F401  (registers the families)

__all__ = ["Conditioning", "DenoiserAdapter", "PipelineAdapter", "adapter_for", "guided_model_output",
           "adapter_class", "makes_videos", "register_adapter", "stock_call_kwargs"]
