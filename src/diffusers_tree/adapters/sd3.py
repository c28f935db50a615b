"""Stable Diffusion 3 / 3.5 (MMDiT, flow matching, pooled projections, CFG over [uncond; cond])."""

from __future__ import annotations

from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from .base import Conditioning, PipelineAdapter, postprocess_decoded, register_adapter


@register_adapter("StableDiffusion3Pipeline")
class StableDiffusion3Adapter(PipelineAdapter):
    hub_tags = ("sd3", "sd3-diffusers")
    default_guidance_scale = 7.0
    # the joint attention's projections of both streams (image and text)
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                           "to_add_out"]
    prediction_type = "flow"

    @classmethod
    def claims_lora_keys(cls, keys: list[str]) -> bool:
        """A transformer LoRA without single-stream blocks: SD3's (and the digits model's). A guess, taken only when
        the base model's `model_index.json` cannot be read, which tells the other transformer families apart."""
        return bool(keys) and all(k.startswith("transformer.") for k in keys) and not any(
            ".single_transformer_blocks." in k for k in keys)

    def encode(self, prompts, *, negative_prompt, guidance_scale, height, width, max_sequence_length):
        pipe, do_cfg = self.pipe, self.uses_cfg(guidance_scale, self.pipe.config)
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=pipe._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt,
            max_sequence_length=max_sequence_length or 256,
        )
        return Conditioning(
            cond={"encoder_hidden_states": cond, "pooled_projections": pooled},
            uncond={"encoder_hidden_states": uncond, "pooled_projections": uncond_pooled} if do_cfg else None,
            guidance_scale=guidance_scale, height=height, width=width,
        )

    def prepare_latents(self, num, height, width, generator, dtype):
        pipe = self.pipe
        channels = pipe.transformer.config.in_channels
        return pipe.prepare_latents(num, channels, height, width, dtype, pipe._execution_device, generator)

    def set_timesteps(self, scheduler, num_inference_steps, latents):
        config, extra = scheduler.config, {}
        if config.get("use_dynamic_shifting", None):  # as the pipeline: shift by the image token count
            patch = self.pipe.transformer.config.patch_size
            seq_len = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
            extra["mu"] = calculate_shift(seq_len, config.get("base_image_seq_len", 256),
                                          config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                          config.get("max_shift", 1.16))
        scheduler.set_timesteps(num_inference_steps, device=latents.device, **extra)

    def model_forward(self, latents, timestep, inputs, conditioning):
        return self.model(hidden_states=latents, timestep=timestep,
                                     encoder_hidden_states=inputs["encoder_hidden_states"],
                                     pooled_projections=inputs["pooled_projections"], return_dict=False)[0]

    def decode(self, latents, conditioning):
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return postprocess_decoded(self.pipe, image)
