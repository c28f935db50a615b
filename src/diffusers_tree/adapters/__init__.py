"""One small adapter per pipeline family: prompt encoding, the denoiser call, timesteps, latents, decoding.

`base.py` declares the whole adapter interface (`PipelineAdapter`, every hook with its default), the per-prompt
`Conditioning` and the registry; each family is one file here that subclasses `PipelineAdapter` and registers it
with `@register_adapter("PipelineClassName", ...)`. The tree loop in `pipeline_tree_rollout.py` talks to a pipeline
only through that interface and never imports a model class. Adding a family = one file, its import below, and its
tiny test builder in `diffusers_tree.testing`.
"""

from . import (  # noqa: F401  (registers the families)
    flux,
    flux2,
    flux_kontext,
    qwenimage,
    qwenimage_edit,
    sana,
    sd,
    sd3,
    sdxl,
    wan,
    zimage,
)
from .base import (
    Conditioning,
    PipelineAdapter,
    adapter_class,
    adapter_for,
    guided_model_output,
    makes_videos,
    register_adapter,
    registered_adapters,
    stock_call_kwargs,
)

DenoiserAdapter = PipelineAdapter  # the base's earlier name

__all__ = ["Conditioning", "DenoiserAdapter", "PipelineAdapter", "adapter_class", "adapter_for",
           "guided_model_output", "makes_videos", "register_adapter", "registered_adapters",
           "stock_call_kwargs"]
