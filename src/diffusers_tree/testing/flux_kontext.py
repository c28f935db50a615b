"""Tiny FLUX.1 Kontext pipeline: the tiny FLUX.1 components (`flux.py`) in `FluxKontextPipeline`, the editing
pipeline that appends a source image's latents to the image tokens."""

from __future__ import annotations

from diffusers import FluxKontextPipeline

from .common import _finish
from .flux import tiny_flux_pipeline


def tiny_flux_kontext_pipeline(*, seed: int = 0) -> FluxKontextPipeline:
    """Call with ``height=32, width=32``, a short ``max_sequence_length`` (16), a 32x32 source ``image`` and
    ``_auto_resize=False`` (Kontext's preferred resolutions start at 672 pixels)."""
    return _finish(FluxKontextPipeline(**tiny_flux_pipeline(seed=seed).components))
