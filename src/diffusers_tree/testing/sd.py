"""Tiny SD1.5 and SDXL pipelines: a two-level UNet, CLIP text encoders, the SD VAE."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
)

from .common import SD_BETAS, _clip_config, _finish, _seeded, _unet, _vae, tiny_tokenizer


def tiny_sd_pipeline(*, seed: int = 0) -> StableDiffusionPipeline:
    """Tiny Stable Diffusion 1.5-style pipeline (UNet + one CLIP text encoder + DDIM), 32x32 output by default."""
    with _seeded(seed):
        unet = _unet(cross_attention_dim=32, attention_head_dim=4)
        vae = _vae()
        text_encoder = CLIPTextModel(_clip_config())
    scheduler = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def tiny_sdxl_pipeline(*, seed: int = 0) -> StableDiffusionXLPipeline:
    """Tiny SDXL-style pipeline (text-time UNet + two CLIP encoders + Euler), 32x32 output by default."""
    with _seeded(seed):
        unet = _unet(
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + 32 pooled
            cross_attention_dim=64,  # two CLIP encoders of hidden 32, concatenated
        )
        vae = _vae()
        text_encoder = CLIPTextModel(_clip_config())
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    scheduler = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    return _finish(pipe)


