"""FLUX.2 [dev] (`Flux2Pipeline`) and FLUX.2 [klein] (`Flux2KleinPipeline`).

Quirks, as the pipelines do them:
- the prompt embedding is the text encoder's hidden states of three layers (Mistral3: 10, 20, 30; Qwen3: 9, 18, 27)
  stacked per token, after a chat template; prompts are padded to `max_sequence_length`, so every prompt's text
  position ids are the same and live in `shared`;
- 4D position ids (T, H, W, L) for text (L = token index) and image tokens (H, W = patch row, column);
- latents are 2x2-patchified and packed `[N, (H/2)·(W/2), 4·C]`, normalised by the VAE's batch-norm running
  statistics: decoding un-packs, de-normalises, un-patchifies;
- timestep/1000, and the scheduler's mu from `compute_empirical_mu(image_seq_len, num_steps)` (not FLUX.1's
  `calculate_shift`), with sigmas linspace(1, 1/T, T);
- [dev] is guidance-distilled: `guidance_scale` goes into the guidance embedding, one row per node, no CFG;
- [klein] has no guidance embedding: the base model runs true CFG against the empty prompt (two rows per node) when
  `guidance_scale > 1`; the step-distilled models (`is_distilled`) never do.
- reference images (editing, optional): each is shrunk to at most 1024² pixels, cropped to a multiple of 16, VAE-
  encoded (latent mode, patchified, batch-norm normalised) and packed; the references' tokens follow the noisy ones
  at every forward (the negative pass too), with position ids whose T coordinate is 10, 20, ... per reference, and
  the output is cut back. The stock pipeline gives every prompt of a call the same references; here each prompt has
  its own (`image`: one per prompt, each a PIL image or a list of them), all of one shape.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

from .base import Conditioning, PipelineAdapter, postprocess_decoded, register_adapter, source_sets

REFERENCE_AREA = 1024 * 1024  # the stock pipeline shrinks larger references to this many pixels


@register_adapter("Flux2Pipeline")
class Flux2Adapter(PipelineAdapter):
    hub_tags = ("flux2", "flux2-diffusers")
    takes_source_image = True  # reference images, optional: FLUX.2 also generates from text alone
    needs_source_image = False
    max_sources = None  # any number of references per prompt
    default_guidance_scale = 4.0
    prediction_type = "flow"
    guidance_embedding = True  # [dev]: guidance_scale is a transformer input, not CFG
    # double-stream attention projections, and the single-stream blocks' fused QKV+MLP input projection (their
    # output projection `attn.to_out` shares its name with the double-stream blocks' `to_out` ModuleList)
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                           "to_add_out", "to_qkv_mlp_proj"]

    @classmethod
    def uses_cfg(cls, guidance_scale: float, pipeline_config: dict) -> bool:
        return False  # [dev]: guidance-distilled, guidance_scale goes into the guidance embedding

    @property
    def pixels_per_patch(self) -> int:
        return self.pipe.vae_scale_factor * 2  # the VAE's downsampling, then 2x2 latent patches

    def _encode(self, prompts, max_sequence_length):
        embeds, text_ids = self.pipe.encode_prompt(prompt=prompts, device=self.pipe._execution_device,
                                                   num_images_per_prompt=1,
                                                   max_sequence_length=max_sequence_length or 512)
        return embeds, text_ids[0]  # [P, L, 3·D] and [L, 4]: padded prompts share their position ids

    def _shared(self, text_ids, height, width) -> dict:
        """Text and image position ids (the transformer takes one set for the whole batch)."""
        pipe = self.pipe
        latent_h = int(height) // (pipe.vae_scale_factor * 2)  # patch grid, as the pipeline's prepare_latents
        latent_w = int(width) // (pipe.vae_scale_factor * 2)
        image_ids = pipe._prepare_latent_ids(torch.empty(1, 0, latent_h, latent_w))[0]  # [(H/2)·(W/2), 4]
        return {"txt_ids": text_ids, "img_ids": image_ids.to(text_ids.device)}

    def encode(self, prompts, *, negative_prompt, guidance_scale, height, width, max_sequence_length, image=None,
               auto_resize: bool = True):
        embeds, text_ids = self._encode(prompts, max_sequence_length)
        conditioning = Conditioning(cond={"encoder_hidden_states": embeds},
                                    uncond=self._negative(prompts, negative_prompt, guidance_scale,
                                                          max_sequence_length),
                                    guidance_scale=guidance_scale, height=height, width=width,
                                    shared=self._shared(text_ids, height, width))
        return conditioning if image is None else self._with_references(conditioning, image)

    def _negative(self, prompts, negative_prompt, guidance_scale, max_sequence_length) -> dict | None:
        return None  # [dev]: guidance-distilled

    def _with_references(self, conditioning: Conditioning, image) -> Conditioning:
        """The prompts' reference images encoded once: `source_latents` `[P, S, 4·C]` per prompt (and in the
        negative rows), their position ids `reference_ids` `[S, 4]` shared by the batch."""
        pipe = self.pipe
        encoded, ids = [], None
        for index, refs in enumerate(source_sets(image, conditioning.num_prompts, self.max_sources)):
            latents = [pipe._encode_vae_image(self.reference_pixels(ref), generator=None) for ref in refs]
            prompt_ids = pipe._prepare_image_ids(latents)[0]  # [S, 4]: T = 10, 20, ... per reference
            if ids is not None and prompt_ids.shape != ids.shape:
                raise ValueError(f"the references of prompt {index} make {prompt_ids.shape[0]} tokens, prompt 0's "
                                 f"{ids.shape[0]}: every prompt needs as many references of the same sizes.")
            ids = prompt_ids
            encoded.append(torch.cat([pipe._pack_latents(latent)[0] for latent in latents]))
        source = torch.stack(encoded).to(conditioning.cond["encoder_hidden_states"].dtype)
        uncond = None if conditioning.uncond is None else {**conditioning.uncond, "source_latents": source}
        shared = {**conditioning.shared, "reference_ids": ids.to(conditioning.shared["img_ids"].device)}
        return Conditioning(cond={**conditioning.cond, "source_latents": source}, uncond=uncond,
                            guidance_scale=conditioning.guidance_scale, height=conditioning.height,
                            width=conditioning.width, shared=shared)

    @classmethod
    def encoded_source_size(cls, width: int, height: int, auto_resize: bool = True) -> tuple[int, int]:
        """At most 1024² pixels at the reference's aspect ratio (`reference_pixels`), cropped to multiples of 16."""
        if width * height > REFERENCE_AREA:  # as Flux2ImageProcessor._resize_to_target_area
            scale = math.sqrt(REFERENCE_AREA / (width * height))
            width, height = int(width * scale), int(height * scale)
        return width // 16 * 16, height // 16 * 16

    def reference_pixels(self, image) -> torch.Tensor:
        """One reference as the stock pipeline preprocesses it: at most 1024² pixels, cropped to a multiple of 16,
        `[1, 3, H, W]` in [-1, 1] on the VAE's device."""
        pipe = self.pipe
        pipe.image_processor.check_image_input(image)  # the stock checks: at least 64 px a side, no extreme ratio
        width, height = image.size
        if width * height > REFERENCE_AREA:
            image = pipe.image_processor._resize_to_target_area(image, REFERENCE_AREA)
            width, height = image.size
        multiple = pipe.vae_scale_factor * 2
        width, height = width // multiple * multiple, height // multiple * multiple
        pixels = pipe.image_processor.preprocess(image, height=height, width=width, resize_mode="crop")
        return pixels.to(device=pipe._execution_device, dtype=pipe.vae.dtype)

    def prepare_latents(self, num, height, width, generator, dtype):
        pipe = self.pipe
        channels = pipe.transformer.config.in_channels // 4
        latents, _ = pipe.prepare_latents(num, channels, height, width, dtype, pipe._execution_device, generator)
        return latents  # packed: [num, (h/2)·(w/2), 4·C]

    def set_timesteps(self, scheduler, num_inference_steps, latents):
        sigmas = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(
            1.0, 1 / num_inference_steps, num_inference_steps)
        mu = compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=num_inference_steps)
        scheduler.set_timesteps(num_inference_steps, device=latents.device, sigmas=sigmas, mu=mu)

    def model_forward(self, latents, timestep, inputs, conditioning):
        guidance = None
        if self.guidance_embedding:  # one value per row, as the pipeline's expanded `guidance`
            guidance = torch.full((latents.shape[0],), conditioning.guidance_scale, device=latents.device,
                                  dtype=torch.float32)
        hidden, image_ids = latents, conditioning.shared["img_ids"]
        if "source_latents" in inputs:  # the references' tokens after the noisy ones
            hidden = torch.cat([latents, inputs["source_latents"].to(latents.dtype)], dim=1)
            image_ids = torch.cat([image_ids, conditioning.shared["reference_ids"]])
        out = self.model(hidden_states=hidden, timestep=timestep.to(latents.dtype) / 1000, guidance=guidance,
                         encoder_hidden_states=inputs["encoder_hidden_states"], txt_ids=conditioning.shared["txt_ids"],
                         img_ids=image_ids, return_dict=False)[0]
        return out[:, :latents.shape[1]]

    def vae_latents(self, latents, conditioning):
        """Packed latents to the VAE's: un-pack, undo the batch-norm normalisation, un-patchify [N, C, H, W]."""
        pipe, vae = self.pipe, self.pipe.vae
        image_ids = conditioning.shared["img_ids"].expand(latents.shape[0], -1, -1)
        latents = pipe._unpack_latents_with_ids(latents, image_ids)  # [N, 4·C, H/2, W/2]
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
        return pipe._unpatchify_latents(latents * std + mean)

    def decode(self, latents, conditioning):
        vae = self.pipe.vae
        image = vae.decode(self.vae_latents(latents, conditioning).to(vae.dtype), return_dict=False)[0]
        return postprocess_decoded(self.pipe, image)

    # The stock pipelines' latent layouts differ from the packed one the loop (and the stock loop) steps on:
    def pipeline_latents(self, latents, height, width):
        """Packed roots as the stock pipeline's `latents=` argument takes them: [N, 4·C, H/2, W/2]."""
        grid = self.pipe.vae_scale_factor * 2
        return latents.transpose(1, 2).reshape(latents.shape[0], -1, int(height) // grid, int(width) // grid)

    def latent_output(self, latents, conditioning):
        """Leaves as the stock pipeline returns them for output_type="latent": [dev] packed."""
        return latents


@register_adapter("Flux2KleinPipeline")
class Flux2KleinAdapter(Flux2Adapter):
    """[klein]: no guidance embedding; true CFG as the pipeline's `do_classifier_free_guidance`."""

    guidance_embedding = False

    @classmethod
    def uses_cfg(cls, guidance_scale: float, pipeline_config: dict) -> bool:
        return guidance_scale > 1 and not pipeline_config.get("is_distilled", False)  # distilled klein: never

    def _negative(self, prompts, negative_prompt, guidance_scale, max_sequence_length) -> dict | None:
        if not self.uses_cfg(guidance_scale, self.pipe.config):
            return None
        # the pipeline's negative prompt is always ""; a given one is honoured (same padded length)
        negative = negative_prompt or ""
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        return {"encoder_hidden_states": self._encode(negative, max_sequence_length)[0]}

    def stock_call_kwargs(self, kwargs: dict) -> dict:
        """The stock pipeline takes no `negative_prompt` (its own is always ""), only `negative_prompt_embeds`: a
        given negative prompt is encoded here, one per prompt of `kwargs["prompt"]`, so stock samples (grids,
        `treegrpo sample`) guide against the same negative prompt as the tree."""
        kwargs = dict(kwargs)
        negative = kwargs.pop("negative_prompt", None)
        scale = kwargs.get("guidance_scale")
        if not negative or not self.uses_cfg(2.0 if scale is None else scale, self.pipe.config):
            return kwargs
        prompts = kwargs.get("prompt")
        if prompts is None:
            raise ValueError("Pass `prompt` in the kwargs: FLUX.2 [klein] takes its negative prompt as embeddings, "
                             "one per prompt.")
        count = 1 if isinstance(prompts, str) else len(prompts)
        negatives = [negative] * count if isinstance(negative, str) else list(negative)
        with torch.no_grad():
            kwargs["negative_prompt_embeds"] = self._encode(negatives, kwargs.get("max_sequence_length"))[0]
        return kwargs

    def latent_output(self, latents, conditioning):
        """[klein]'s output_type="latent" is the VAE's latents [N, C, H, W] (it un-packs before that check)."""
        return self.vae_latents(latents, conditioning)
