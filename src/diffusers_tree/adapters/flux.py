"""FLUX.1 (packed 2×2 latent patches, timestep/1000, distilled guidance embedding: one row per node, no CFG)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from .base import Conditioning, PipelineAdapter, postprocess_decoded, register_adapter


@register_adapter("FluxPipeline")
class FluxAdapter(PipelineAdapter):
    hub_tags = ("flux", "flux-diffusers")
    default_guidance_scale = 3.5
    # the joint attention's projections of both streams (image and text)
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                           "to_add_out"]
    prediction_type = "flow"

    @classmethod
    def claims_lora_keys(cls, keys: list[str]) -> bool:
        """A transformer LoRA with single-stream blocks (`single_transformer_blocks`) is FLUX.1's."""
        return bool(keys) and all(k.startswith("transformer.") for k in keys) and any(
            ".single_transformer_blocks." in k for k in keys)

    @classmethod
    def uses_cfg(cls, guidance_scale: float, pipeline_config: dict) -> bool:
        return False  # guidance-distilled: guidance_scale is a transformer input (no true-CFG support here)

    @property
    def pixels_per_patch(self) -> int:
        return self.pipe.vae_scale_factor * 2  # the VAE factor × the 2×2 latent packing

    def encode(self, prompts, *, negative_prompt, guidance_scale, height, width, max_sequence_length):
        pipe = self.pipe
        cond, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=pipe._execution_device,
                                                    num_images_per_prompt=1,
                                                    max_sequence_length=max_sequence_length or 512)
        latent_h = 2 * (int(height) // (pipe.vae_scale_factor * 2))
        latent_w = 2 * (int(width) // (pipe.vae_scale_factor * 2))
        image_ids = pipe._prepare_latent_image_ids(1, latent_h // 2, latent_w // 2, cond.device, cond.dtype)
        return Conditioning(
            cond={"encoder_hidden_states": cond, "pooled_projections": pooled}, uncond=None,
            guidance_scale=guidance_scale, height=height, width=width,
            shared={"txt_ids": text_ids, "img_ids": image_ids},
        )

    def prepare_latents(self, num, height, width, generator, dtype):
        pipe = self.pipe
        channels = pipe.transformer.config.in_channels // 4
        latents, _ = pipe.prepare_latents(num, channels, height, width, dtype, pipe._execution_device, generator)
        return latents  # packed: [num, (h/2)·(w/2), 4·C]

    def set_timesteps(self, scheduler, num_inference_steps, latents):
        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_inference_steps,
                                                                                 num_inference_steps)
        mu = calculate_shift(latents.shape[1], config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        scheduler.set_timesteps(num_inference_steps, device=latents.device, sigmas=sigmas, mu=mu)

    def model_forward(self, latents, timestep, inputs, conditioning):
        transformer = self.pipe.transformer
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((latents.shape[0],), conditioning.guidance_scale, device=latents.device,
                                  dtype=torch.float32)
        return self.model(hidden_states=latents, timestep=timestep.to(latents.dtype) / 1000, guidance=guidance,
                           pooled_projections=inputs["pooled_projections"],
                           encoder_hidden_states=inputs["encoder_hidden_states"],
                           txt_ids=conditioning.shared["txt_ids"], img_ids=conditioning.shared["img_ids"],
                           return_dict=False)[0]

    def decode(self, latents, conditioning):
        pipe, vae = self.pipe, self.pipe.vae
        latents = pipe._unpack_latents(latents, conditioning.height, conditioning.width, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return postprocess_decoded(pipe, image)
