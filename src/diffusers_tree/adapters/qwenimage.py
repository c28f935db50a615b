"""Qwen-Image (`QwenImagePipeline`): an MMDiT over packed 2×2 latent patches with true CFG and a norm rescale.

Quirks, all as in the installed `pipeline_qwenimage.py`:
- Prompts go through the Qwen2.5-VL chat template; the pipeline drops the template's first 34 tokens and keeps each
  prompt's unpadded last hidden states, zero-padded to the longest prompt with `encoder_hidden_states_mask`. Here
  every encode call is padded to one length, `max_sequence_length` (cond and uncond alike), so CFG halves batch
  and `Conditioning.concat` works; `model_forward` trims each batch to its longest prompt and drops the mask when
  no row has padding, as the pipeline does, so the padding costs nothing. Masked padding changes outputs by float
  rounding only (`tests/diffusers_tree/test_qwenimage.py`).
- CFG: the pipeline guides only when `true_cfg_scale > 1` *and* a negative prompt is given. Here
  `guidance_scale` is `true_cfg_scale` and alone decides, as in every family: above 1 the negative prompt defaults
  to `" "` (the empty negative prompt the pipeline's docstring suggests). The default, 1, is the stock call
  without a negative prompt (no CFG). To reproduce `pipe(p, negative_prompt=n, true_cfg_scale=g)`, pass
  `negative_prompt=n, guidance_scale=g`. The guided output is rescaled per token to the conditional output's
  norm: `combine_guidance`.
- Latents `[N, (h/2)·(w/2), 4·C]` packed like FLUX; the transformer takes `img_shapes` (frame, h/2, w/2) for
  RoPE, the timestep divided by 1000, and no guidance embedding (Qwen-Image is not guidance-distilled).
- Timesteps: sigmas `linspace(1, 1/T, T)` and `mu` from the packed sequence length, on every call.
- The VAE (`AutoencoderKLQwenImage`) has a frame axis and per-channel `latents_mean`/`latents_std`.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from .base import Conditioning, PipelineAdapter, postprocess_decoded, register_adapter

EMPTY_NEGATIVE_PROMPT = " "


@register_adapter("QwenImagePipeline")
class QwenImageAdapter(PipelineAdapter):
    hub_tags = ("qwen-image", "qwen-image-diffusers")
    default_guidance_scale = 1.0  # the stock default call: true_cfg_scale 4 but no negative prompt, so no CFG
    prediction_type = "flow"
    # both streams' attention projections of every block, as the other MMDiT families
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                           "to_add_out"]

    @property
    def pixels_per_patch(self) -> int:
        return self.pipe.vae_scale_factor * 2  # the VAE factor × the 2×2 packing

    def _embed(self, prompts: list[str], length: int, **source) -> dict[str, torch.Tensor]:
        """The pipeline's prompt embeddings `[P, length, D]` and mask `[P, length]` (1 = token, 0 = padding); an
        editing pipeline's `encode_prompt` also takes the source images (`source`: `image=`)."""
        pipe = self.pipe
        embeds, mask = pipe.encode_prompt(prompts, device=pipe._execution_device, max_sequence_length=length,
                                          **source)
        if embeds.shape[1] > length:
            raise ValueError(f"prompt embeddings of {embeds.shape[1]} tokens exceed max_sequence_length={length}; "
                             "raise it (an editing prompt's tokens include its source image's vision tokens).")
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        pad = length - embeds.shape[1]
        return {"encoder_hidden_states": torch.nn.functional.pad(embeds, (0, 0, 0, pad)),
                "encoder_hidden_states_mask": torch.nn.functional.pad(mask, (0, pad))}

    def encode(self, prompts, *, negative_prompt, guidance_scale, height, width, max_sequence_length):
        do_cfg = self.uses_cfg(guidance_scale, self.pipe.config)
        length = max_sequence_length or 512  # the pipeline's default length
        negative_prompt = EMPTY_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        if isinstance(negative_prompt, str):  # one negative prompt per prompt
            negative_prompt = [negative_prompt] * len(prompts)
        if do_cfg and len(negative_prompt) != len(prompts):
            raise ValueError(f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts; give one string "
                             "or one negative prompt per prompt.")
        return Conditioning(cond=self._embed(list(prompts), length),
                            uncond=self._embed(list(negative_prompt), length) if do_cfg else None,
                            guidance_scale=guidance_scale, height=height, width=width)

    def prepare_latents(self, num, height, width, generator, dtype):
        pipe = self.pipe
        channels = pipe.transformer.config.in_channels // 4
        return pipe.prepare_latents(num, channels, height, width, dtype, pipe._execution_device, generator)

    def set_timesteps(self, scheduler, num_inference_steps, latents):
        config = scheduler.config
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(latents.shape[1], config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        scheduler.set_timesteps(num_inference_steps, device=latents.device, sigmas=sigmas, mu=mu)

    def model_forward(self, latents, timestep, inputs, conditioning):
        factor = self.pipe.vae_scale_factor * 2
        shape = (1, conditioning.height // factor, conditioning.width // factor)  # (frames, h/2, w/2) for RoPE
        return self.transformer_forward(latents, timestep, inputs, [shape])

    def transformer_forward(self, hidden_states, timestep, inputs, shapes: list[tuple[int, int, int]]):
        """The transformer on `hidden_states` (the noisy tokens, then any source tokens, whose grids `shapes` lists
        in that order for RoPE), with the batch's prompt embeddings trimmed to its longest prompt."""
        embeds, mask = inputs["encoder_hidden_states"], inputs["encoder_hidden_states_mask"]
        lengths = mask.sum(dim=1)  # masks are leading ones: trim the padding no row of this batch needs
        longest, shortest = torch.stack([lengths.max(), lengths.min()]).tolist()  # one device sync per forward
        embeds, mask = embeds[:, :longest], mask[:, :longest]
        mask = None if shortest == longest else mask  # no row padded: no mask, as the pipeline
        return self.model(hidden_states=hidden_states, timestep=timestep.to(hidden_states.dtype) / 1000,
                          encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                          img_shapes=[shapes] * hidden_states.shape[0], return_dict=False)[0]

    def stock_call_kwargs(self, kwargs: dict) -> dict:
        """Call kwargs for the stock pipeline that sample as the tree does: its CFG scale is `true_cfg_scale`, and
        it guides only when given a negative prompt (`guidance_scale` it takes for guidance-distilled variants).
        Call the stock pipeline with one image per prompt, or one prompt at a time: diffusers' `encode_prompt`
        tiles the masks but repeats the embeddings when prompts of different lengths ask for several images each."""
        kwargs = dict(kwargs)
        scale = kwargs.pop("guidance_scale", None)
        if scale is not None:
            kwargs["true_cfg_scale"] = scale
            if scale > 1 and kwargs.get("negative_prompt") is None:
                kwargs["negative_prompt"] = EMPTY_NEGATIVE_PROMPT
        prompts, negative = kwargs.get("prompt"), kwargs.get("negative_prompt")
        if isinstance(negative, str) and isinstance(prompts, list):
            # one negative prompt per prompt: a single string is encoded once, for a batch of one
            kwargs["negative_prompt"] = [negative] * len(prompts)
        return kwargs

    def combine_guidance(self, uncond_out, cond_out, conditioning):
        """True CFG, then each token's guided output rescaled to the conditional output's norm (the pipeline's)."""
        guided = uncond_out + conditioning.guidance_scale * (cond_out - uncond_out)
        return guided * (torch.norm(cond_out, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))

    def decode(self, latents, conditioning):
        pipe, vae = self.pipe, self.pipe.vae
        latents = pipe._unpack_latents(latents, conditioning.height, conditioning.width, pipe.vae_scale_factor)
        latents = latents.to(vae.dtype)  # [N, C, 1, H/8, W/8]: one frame
        view = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(view).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(view).to(latents.device, latents.dtype)
        image = vae.decode(latents / inverse_std + mean, return_dict=False)[0][:, :, 0]  # the pipeline's rounding
        return postprocess_decoded(pipe, image)
