"""Stable Diffusion 1.x/2.x (UNet, ε- or v-prediction, CFG over [uncond; cond])."""

from __future__ import annotations

from .base import Conditioning, PipelineAdapter, postprocess_decoded, register_adapter, unet_latents


@register_adapter("StableDiffusionPipeline")
class StableDiffusionAdapter(PipelineAdapter):
    hub_tags = ("stable-diffusion", "stable-diffusion-diffusers")
    denoiser_name = "unet"
    default_guidance_scale = 7.5
    def __init__(self, pipe):
        super().__init__(pipe)
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")

    def encode(self, prompts, *, negative_prompt, guidance_scale, height, width, max_sequence_length):
        do_cfg = self.uses_cfg(guidance_scale, self.pipe.config)
        cond, uncond = self.pipe.encode_prompt(prompts, self.pipe._execution_device, 1, do_cfg, negative_prompt)
        return Conditioning(
            cond={"encoder_hidden_states": cond},
            uncond={"encoder_hidden_states": uncond} if do_cfg else None,
            guidance_scale=guidance_scale, height=height, width=width,
        )

    def prepare_latents(self, num, height, width, generator, dtype):
        return unet_latents(self.pipe, num, height, width, generator, dtype)

    def set_timesteps(self, scheduler, num_inference_steps, latents):
        scheduler.set_timesteps(num_inference_steps, device=latents.device)

    def model_forward(self, latents, timestep, inputs, conditioning):
        return self.model(latents, timestep, encoder_hidden_states=inputs["encoder_hidden_states"],
                              return_dict=False)[0]

    def decode(self, latents, conditioning):
        vae = self.pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return postprocess_decoded(self.pipe, image)
