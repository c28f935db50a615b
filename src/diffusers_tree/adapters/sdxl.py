"""Stable Diffusion XL (UNet with pooled text embeddings and size/crop time ids, CFG over [uncond; cond])."""

from __future__ import annotations

import torch

from .base import Conditioning, PipelineAdapter, postprocess_decoded, register_adapter, unet_latents


@register_adapter("StableDiffusionXLPipeline")
class StableDiffusionXLAdapter(PipelineAdapter):
    hub_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")
    denoiser_name = "unet"
    default_guidance_scale = 5.0
    def __init__(self, pipe):
        super().__init__(pipe)
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")

    def encode(self, prompts, *, negative_prompt, guidance_scale, height, width, max_sequence_length):
        pipe, do_cfg = self.pipe, self.uses_cfg(guidance_scale, self.pipe.config)
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompts, device=pipe._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt,
        )
        projection_dim = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                          else pipe.text_encoder_2.config.projection_dim)
        # original size = target size = (height, width), no crop: the pipeline's defaults
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=cond.dtype,
                                          text_encoder_projection_dim=projection_dim).to(cond.device)
        time_ids = time_ids.repeat(len(prompts), 1)  # [P, 6]
        return Conditioning(
            cond={"encoder_hidden_states": cond, "text_embeds": pooled, "time_ids": time_ids},
            uncond=({"encoder_hidden_states": uncond, "text_embeds": uncond_pooled, "time_ids": time_ids}
                    if do_cfg else None),
            guidance_scale=guidance_scale, height=height, width=width,
        )

    def prepare_latents(self, num, height, width, generator, dtype):
        return unet_latents(self.pipe, num, height, width, generator, dtype)

    def set_timesteps(self, scheduler, num_inference_steps, latents):
        scheduler.set_timesteps(num_inference_steps, device=latents.device)

    def model_forward(self, latents, timestep, inputs, conditioning):
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        return self.model(latents, timestep, encoder_hidden_states=inputs["encoder_hidden_states"],
                              added_cond_kwargs=added, return_dict=False)[0]

    def decode(self, latents, conditioning):
        vae = self.pipe.vae
        config = vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        # fp16 VAEs overflow (the pipeline upcasts too); decode in fp32 then
        upcast = vae.dtype == torch.float16 and config.force_upcast
        vae_dtype = torch.float32 if upcast else vae.dtype
        if upcast:
            vae.to(torch.float32)
        image = vae.decode(latents.to(vae_dtype), return_dict=False)[0]
        if upcast:
            vae.to(torch.float16)
        return postprocess_decoded(self.pipe, image)
