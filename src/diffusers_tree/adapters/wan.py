"""Wan 2.1 text-to-video (`WanPipeline`): leaves are videos.

Quirks, all as `pipeline_wan.py` does them:
- Video latents `[B, C, F', H/8, W/8]` with `F' = (num_frames - 1) // 4 + 1`: `num_frames` must be 4k + 1 (the stock
  pipeline rounds other counts with a warning; we refuse them) and height/width multiples of 16 (VAE 8 × patch 2).
- One UMT5 encoder; prompts are cleaned (ftfy, HTML, whitespace) and their embeddings zero-padded to
  `max_sequence_length` (default 512). No attention mask reaches the transformer, so the padding is conditioning.
- Plain CFG `u + g·(c - u)` (default 5.0) with `""` as the default negative prompt. The stock pipeline runs the
  halves as two forwards, the tree as one batch.
- UniPC with flow sigmas: flow matching, `set_timesteps(n)` with no `mu` (the shift is the scheduler's `flow_shift`).
- Noise is drawn and latents kept in fp32 whatever the model dtype; each forward casts to the transformer's dtype.
- Decoding un-normalizes per channel (`latents_mean`/`latents_std`), the VAE gives `[B, 3, F, H, W]` in [-1, 1] and the
  video processor `[B, F, 3, H, W]` in [0, 1]; `"pil"` is a list of frame lists per video, `"np"` `[B, F, H, W, 3]`.
- Wan 2.2 (`transformer_2` + `boundary_ratio` experts, `expand_timesteps` TI2V) is refused.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Conditioning, PipelineAdapter, register_adapter


@register_adapter("WanPipeline")
class WanAdapter(PipelineAdapter):
    hub_tags = ("wan", "wan-diffusers")
    hub_task = "text-to-video"
    default_guidance_scale = 5.0
    default_num_frames = 81  # marks a video family; the stock pipeline's default
    default_size = (480, 832)  # the stock pipeline's default height/width (the transformer has no sample_size)
    prediction_type = "flow"
    # self- (attn1) and cross-attention (attn2) projections of every block
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]

    def __init__(self, pipe):
        if pipe.transformer is None or pipe.transformer_2 is not None or pipe.config.boundary_ratio is not None:
            raise ValueError("Tree rollouts support Wan 2.1 (one `transformer`); this pipeline has a `transformer_2`"
                             "/`boundary_ratio` (Wan 2.2 two-expert denoising), which is not supported.")
        if pipe.config.get("expand_timesteps", False):
            raise ValueError("Tree rollouts do not support Wan 2.2 TI2V (`expand_timesteps=True`, per-token "
                             "timesteps); use a Wan 2.1 text-to-video pipeline.")
        super().__init__(pipe)

    @property
    def pixels_per_patch(self) -> int:
        return self.pipe.vae_scale_factor_spatial * self.pipe.transformer.config.patch_size[1]

    def encode(self, prompts, *, negative_prompt, guidance_scale, height, width, max_sequence_length):
        pipe, do_cfg = self.pipe, self.uses_cfg(guidance_scale, self.pipe.config)
        cond, uncond = pipe.encode_prompt(prompt=prompts, negative_prompt=negative_prompt,
                                          do_classifier_free_guidance=do_cfg, num_videos_per_prompt=1,
                                          max_sequence_length=max_sequence_length or 512,
                                          device=pipe._execution_device)
        dtype = self.denoiser.dtype  # the stock pipeline casts the embeddings to the transformer's dtype
        return Conditioning(
            cond={"encoder_hidden_states": cond.to(dtype)},
            uncond={"encoder_hidden_states": uncond.to(dtype)} if do_cfg else None,
            guidance_scale=guidance_scale, height=height, width=width,
        )

    def prepare_latents(self, num, height, width, generator, dtype, num_frames=None):
        pipe = self.pipe
        num_frames = self.default_num_frames if num_frames is None else num_frames
        if num_frames < 1 or (num_frames - 1) % pipe.vae_scale_factor_temporal:
            raise ValueError(f"num_frames={num_frames}: Wan needs {pipe.vae_scale_factor_temporal}k + 1 frames "
                             f"(e.g. 5, 33, 81).")
        multiple = self.pixels_per_patch
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple} for Wan; got {height}x{width}.")
        # fp32 whatever `dtype` is: the stock pipeline draws and keeps its latents in fp32
        return pipe.prepare_latents(num, pipe.transformer.config.in_channels, height, width, num_frames,
                                    torch.float32, pipe._execution_device, generator)  # [num, C, F', h, w]

    def set_timesteps(self, scheduler, num_inference_steps, latents):
        scheduler.set_timesteps(num_inference_steps, device=latents.device)

    def model_forward(self, latents, timestep, inputs, conditioning):
        hidden_states = inputs["encoder_hidden_states"]
        return self.model(hidden_states=latents.to(hidden_states.dtype), timestep=timestep,
                          encoder_hidden_states=hidden_states, return_dict=False)[0]

    def decode(self, latents, conditioning):
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        video = vae.decode(latents / inverse_std + mean, return_dict=False)[0]  # as the stock pipeline, bit for bit
        return self.pipe.video_processor.postprocess_video(video, output_type="pt")  # [B, F, 3, H, W]

    def postprocess(self, videos: torch.Tensor, output_type: str):
        """Float videos `[N, F, 3, H, W]` in [0, 1] to what `WanPipeline` returns for `"pil"` / `"np"`."""
        processor = self.pipe.video_processor
        frames = [processor.pt_to_numpy(video) for video in videos]  # each [F, H, W, 3]
        if output_type == "np":
            return np.stack(frames)
        return [processor.numpy_to_pil(video) for video in frames]
