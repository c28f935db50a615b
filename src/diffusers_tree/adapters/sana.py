"""SANA (linear-attention DiT on a DC-AE, Gemma-2 text encoder, flow matching on DPM-Solver's flow sigmas).

Quirks, all as `SanaPipeline.__call__` does them (diffusers 0.42):
- Prompts are prefixed with the complex human instruction (the pipeline's own default list, read from its
  signature; set `adapter.complex_human_instruction = None` to drop it); negative prompts are not. The encoder keeps
  the first token and the last `max_sequence_length - 1` (default 300), and the transformer needs the tokenizer's
  attention mask as `encoder_attention_mask`: both are per-prompt tensors of the conditioning.
- The scheduler is `DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")`, set with
  `set_timesteps(n, device=...)` only (no sigmas, no mu); its timesteps are integers (⌊1000 σ⌋), which the
  transformer gets multiplied by `transformer.config.timestep_scale`.
- Latents are float32 whatever the model dtype (the pipeline draws and steps them in float32, casts them to the
  transformer's dtype for the forward and its output back to float32).
- Learned sigma: when `out_channels == 2 · in_channels` only the first half of the channels is the velocity.
- Decoding divides by `vae.config.scaling_factor` (no shift factor).
- Resolution binning: the stock default (`use_resolution_binning=True`) samples at the aspect-ratio bin nearest to
  height × width for the model's resolution and resizes the image back. The tree samples at exactly height × width,
  as the stock pipeline with `use_resolution_binning=False`; both agree at bin sizes (1024 × 1024 for the 1024 px
  models). The stock pipeline also wants multiples of 32 pixels (`pixels_per_patch`).
"""

from __future__ import annotations

import inspect
import math

import torch

from .base import Conditioning, PipelineAdapter, postprocess_decoded, register_adapter


def _pipeline_default(pipe, name: str):
    return inspect.signature(type(pipe).__call__).parameters[name].default


@register_adapter("SanaPipeline")
class SanaAdapter(PipelineAdapter):
    hub_tags = ("sana", "sana-diffusers")
    default_guidance_scale = 4.5
    prediction_type = "flow"
    # the linear self-attention (attn1) and the cross-attention (attn2) projections of every block
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]

    def __init__(self, pipe):
        super().__init__(pipe)
        self.complex_human_instruction = _pipeline_default(pipe, "complex_human_instruction")

    @property
    def pixels_per_patch(self) -> int:
        # the stock pipeline's check_inputs wants multiples of 32 whatever the VAE and patch size
        return math.lcm(32, self.pipe.vae_scale_factor * self.pipe.transformer.config.patch_size)

    def stock_call_kwargs(self, kwargs: dict) -> dict:
        """The stock pipeline bins sizes to its aspect-ratio table by default (32×32 runs at 512×512, then is
        resized); the tree samples at the size asked for, as the stock pipeline does without binning."""
        return {**kwargs, "use_resolution_binning": False}

    def encode(self, prompts, *, negative_prompt, guidance_scale, height, width, max_sequence_length):
        pipe, do_cfg = self.pipe, self.uses_cfg(guidance_scale, self.pipe.config)
        negative_prompt = _pipeline_default(pipe, "negative_prompt") if negative_prompt is None else negative_prompt
        cond, mask, uncond, uncond_mask = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt, num_images_per_prompt=1,
            device=pipe._execution_device,
            max_sequence_length=max_sequence_length or _pipeline_default(pipe, "max_sequence_length"),
            complex_human_instruction=self.complex_human_instruction,
        )
        # encoder_hidden_states first: the rollout takes the conditioning's dtype from its first tensor
        return Conditioning(
            cond={"encoder_hidden_states": cond, "encoder_attention_mask": mask},
            uncond={"encoder_hidden_states": uncond, "encoder_attention_mask": uncond_mask} if do_cfg else None,
            guidance_scale=guidance_scale, height=height, width=width,
        )

    def prepare_latents(self, num, height, width, generator, dtype):
        pipe = self.pipe
        channels = pipe.transformer.config.in_channels
        # float32 as the stock pipeline, whatever `dtype` (the text encoder's) is
        return pipe.prepare_latents(num, channels, height, width, torch.float32, pipe._execution_device, generator)

    def set_timesteps(self, scheduler, num_inference_steps, latents):
        scheduler.set_timesteps(num_inference_steps, device=latents.device)

    def model_forward(self, latents, timestep, inputs, conditioning):
        config = self.pipe.transformer.config
        dtype = self.pipe.transformer.dtype
        out = self.model(latents.to(dtype), encoder_hidden_states=inputs["encoder_hidden_states"].to(dtype),
                         encoder_attention_mask=inputs["encoder_attention_mask"],
                         timestep=timestep * config.timestep_scale, return_dict=False)[0].float()
        if config.out_channels // 2 == config.in_channels:  # learned sigma: keep the velocity half
            out = out.chunk(2, dim=1)[0]
        return out

    def decode(self, latents, conditioning):
        vae = self.pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return postprocess_decoded(self.pipe, image)
