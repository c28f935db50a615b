"""Z-Image (`ZImagePipeline`, Z-Image and Z-Image-Turbo): a single-stream DiT over lists of samples.

Quirks, all as in the installed `pipeline_z_image.py`:
- Prompts go through the Qwen3 tokenizer's chat template; the caption features are the encoder's second-to-last
  hidden states of the unpadded tokens, a list of variable-length `[L_p, D]` tensors. The loop indexes `[P, ...]`
  tensors per row, so they are stored padded to `max_sequence_length` with their lengths, and the list is rebuilt
  per row in `model_forward` (one length for every encode call, so `Conditioning.concat` works).
- The transformer takes a list of per-sample latents with a frame axis (`[C, 1, H, W]`), the timestep
  `(1000 - t) / 1000`, and predicts the negated flow velocity: `model_forward` returns `-output`.
- CFG is `pos + g·(pos - neg)` (not `u + g·(c - u)`), on whenever g > 0: `combine_guidance`.
- The pipeline's `cfg_normalization` (off by default) clips ‖guided‖ to c·‖pos‖ per sample: set
  `adapter.cfg_normalization = c` to mirror it. Its `cfg_truncation` (1.0 by default: never truncates) turns CFG
  off at late timesteps; `combine_guidance` does not see the timestep, so only the default is supported.
- Timesteps: sigmas `linspace(1, 1/T, T)` and `mu` from the image token count, passed on every call (a
  static-shift scheduler, as Z-Image-Turbo's, ignores `mu`).
- Latents are fp32 whatever the model dtype (drawn, kept and stepped so by the pipeline; cast for the forward).
- No `default_sample_size` on the pipeline nor `sample_size` in the DiT's config: `default_size` is 1024x1024.
"""

from __future__ import annotations

import torch
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

from .base import Conditioning, PipelineAdapter, postprocess_decoded, register_adapter


def _padded(features: list[torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """The pipeline's caption-feature list as `cap_feats` `[P, length, D]` (zeros after each prompt's tokens) and
    `cap_lengths` `[P]`; `cap_feats` first, since the loop reads the conditioning's dtype from the first tensor."""
    padded = torch.nn.utils.rnn.pad_sequence(features, batch_first=True)  # [P, longest, D]
    padded = torch.nn.functional.pad(padded, (0, 0, 0, length - padded.shape[1]))
    lengths = torch.tensor([feature.shape[0] for feature in features], device=padded.device)
    return {"cap_feats": padded, "cap_lengths": lengths}


@register_adapter("ZImagePipeline")
class ZImageAdapter(PipelineAdapter):
    hub_tags = ("z-image", "z-image-diffusers")
    default_guidance_scale = 5.0  # the pipeline's default (Z-Image-Turbo is sampled with 0: no CFG)
    prediction_type = "flow"
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]  # every block's attention (refiners included)
    cfg_normalization = 0.0  # the pipeline's `cfg_normalization`: 0 = off, its default

    @classmethod
    def uses_cfg(cls, guidance_scale: float, pipeline_config: dict) -> bool:
        return guidance_scale > 0  # pos + g·(pos − neg): any g > 0 guides (the pipeline's own rule)

    @property
    def default_size(self) -> tuple[int, int]:
        return 1024, 1024  # the pipeline's `height or 1024`, whatever its VAE

    @property
    def pixels_per_patch(self) -> int:
        return self.pipe.vae_scale_factor * 2  # the pipeline's own divisibility check

    def encode(self, prompts, *, negative_prompt, guidance_scale, height, width, max_sequence_length):
        pipe, do_cfg = self.pipe, self.uses_cfg(guidance_scale, self.pipe.config)
        length = max_sequence_length or 512
        if isinstance(negative_prompt, str):  # the pipeline wants one negative prompt per prompt
            negative_prompt = [negative_prompt] * len(prompts)
        # copies: the pipeline writes the chat-templated text back into the lists it is given
        cond, uncond = pipe.encode_prompt(
            list(prompts), device=pipe._execution_device, do_classifier_free_guidance=do_cfg,
            negative_prompt=None if negative_prompt is None else list(negative_prompt), max_sequence_length=length,
        )
        return Conditioning(cond=_padded(cond, length), uncond=_padded(uncond, length) if do_cfg else None,
                            guidance_scale=guidance_scale, height=height, width=width)

    def prepare_latents(self, num, height, width, generator, dtype):
        pipe = self.pipe
        # fp32 whatever `dtype` is: the stock pipeline draws, keeps and steps its latents in fp32 (it asserts so);
        # `model_forward` casts to the transformer's dtype
        return pipe.prepare_latents(num, pipe.transformer.config.in_channels, height, width, torch.float32,
                                    pipe._execution_device, generator)  # [num, C, H/f, W/f]: the DiT patchifies

    def set_timesteps(self, scheduler, num_inference_steps, latents):
        config = scheduler.config
        mu = calculate_shift((latents.shape[-2] // 2) * (latents.shape[-1] // 2),
                             config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        scheduler.set_timesteps(num_inference_steps, device=latents.device,
                                sigmas=get_default_z_image_sigmas(num_inference_steps), mu=mu)

    def model_forward(self, latents, timestep, inputs, conditioning):
        samples = list(latents.to(self.denoiser.dtype).unsqueeze(2).unbind(0))  # [C, 1, H, W] each
        lengths = inputs["cap_lengths"].tolist()
        captions = [f[:n] for f, n in zip(inputs["cap_feats"], lengths, strict=True)]  # the pipeline's list
        out = self.model(samples, (1000 - timestep) / 1000, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2).float()  # the flow velocity; fp32 like the pipeline's guidance

    def combine_guidance(self, uncond_out, cond_out, conditioning):
        guided = cond_out + conditioning.guidance_scale * (cond_out - uncond_out)  # pos + g·(pos - neg)
        if self.cfg_normalization > 0:  # clip each sample's norm to c·‖pos‖ (norms are sign-free)
            pos_norm = torch.linalg.vector_norm(cond_out.flatten(1), dim=1)
            new_norm = torch.linalg.vector_norm(guided.flatten(1), dim=1)
            limit = pos_norm * self.cfg_normalization
            scale = torch.where(new_norm > limit, limit / new_norm, torch.ones_like(new_norm))
            guided = guided * scale.view(-1, *[1] * (guided.dim() - 1))
        return guided

    def decode(self, latents, conditioning):
        vae = self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return postprocess_decoded(self.pipe, image)
