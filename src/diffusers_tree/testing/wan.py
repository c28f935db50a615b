"""Tiny Wan 2.1-style text-to-video pipeline (`WanPipeline`), built in-process from config."""

from __future__ import annotations

from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from .common import TINY_VOCAB_SIZE, _finish, _seeded, tiny_tokenizer

LATENT_CHANNELS = 4


def tiny_wan_pipeline(*, seed: int = 0) -> WanPipeline:
    """Tiny Wan 2.1-style pipeline (3-D transformer + UMT5 + causal 3-D VAE + UniPC with flow sigmas), fp32, eval.

    The VAE downsamples 8× in space and 4× in time, as Wan's does, and the transformer's patch is (1, 2, 2): height
    and width must be multiples of 16 and `num_frames` of the form 4k + 1. A 32x32 video of 5 frames has latents
    `[B, 4, 2, 4, 4]`. Call it with a short ``max_sequence_length`` (Wan pads every prompt to it; default 512) and a
    few frames (Wan's default is 81):
    ``pipe(prompt, height=32, width=32, num_frames=5, num_inference_steps=n, guidance_scale=5.0,
    max_sequence_length=16, output_type="pt", generator=g).frames``
    (videos `[B, F, 3, H, W]` in [0, 1]).
    """
    with _seeded(seed):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,  # rope splits it 4/4/4 over frames, height, width
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            text_dim=32,
            freq_dim=32,
            ffn_dim=32,
            num_layers=2,
            rope_max_seq_len=32,
        )
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=LATENT_CHANNELS,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            # non-trivial per-channel statistics, so decoding checks the normalization
            latents_mean=[0.1, -0.2, 0.3, -0.4],
            latents_std=[1.5, 0.5, 2.0, 1.0],
        )
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=TINY_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=37,
                                                   num_layers=2, num_heads=4, relative_attention_num_buckets=8))
    # as the Wan 2.1 checkpoints ship it (flow_shift 3.0 is their 480p setting)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tiny_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    return _finish(pipe)
