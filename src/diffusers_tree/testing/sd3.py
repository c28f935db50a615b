"""Tiny SD3 pipeline: a two-layer MMDiT, two CLIP encoders and a T5."""

from __future__ import annotations

from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextModelWithProjection,
)

from .common import _clip_config, _finish, _seeded, _t5_encoder, _vae, tiny_tokenizer


def tiny_sd3_pipeline(*, seed: int = 0) -> StableDiffusion3Pipeline:
    """Tiny SD3-style pipeline (MMDiT + two CLIP encoders + T5 + flow matching), 32x32 output by default.
    Call it with a short ``max_sequence_length`` (e.g. 16)."""
    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            caption_projection_dim=64,
            joint_attention_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
            pos_embed_max_size=16,
        )
        vae = _vae(shift_factor=0.0, scaling_factor=1.0)
        text_encoder = CLIPTextModelWithProjection(_clip_config())
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
        text_encoder_3 = _t5_encoder()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tiny_tokenizer(),
    )
    return _finish(pipe)


