"""Tiny FLUX.1 pipeline: one double and one single block, CLIP and T5 (no guidance embedding, like schnell)."""

from __future__ import annotations

from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import (
    CLIPTextModel,
)

from .common import _clip_config, _finish, _seeded, _t5_encoder, _vae, tiny_tokenizer


def tiny_flux_pipeline(*, seed: int = 0) -> FluxPipeline:
    """Tiny FLUX-style pipeline (schnell-like, no guidance embedding; CLIP + T5 + flow matching with dynamic shift).
    Always pass ``height=32, width=32`` (FLUX's default is 256) and a short ``max_sequence_length`` (e.g. 16)."""
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels x 2x2 packed patches
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
        )
        vae = _vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0)
        text_encoder = CLIPTextModel(_clip_config())
        text_encoder_2 = _t5_encoder()
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        shift=3.0,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_tokenizer(),
        transformer=transformer,
    )
    return _finish(pipe)

