"""FLUX.1 Kontext (image editing): FLUX.1 with the source image's latents appended to the image token sequence.

Quirks, as `FluxKontextPipeline` does them:
- The source image is resized to the Kontext resolution nearest its aspect ratio (`PREFERRED_KONTEXT_RESOLUTIONS`,
  `auto_resize=True`, the stock default; else kept) and floored to a multiple of 16 pixels, then VAE-encoded with
  the latent distribution's mode (deterministic), shifted and scaled, and packed in 2×2 patches like the noise.
- Every forward sees `[noisy tokens; source tokens]` along the sequence, with position ids `[noise ids; source ids]`
  whose first coordinate is 1 for the source (0 for the noise); the output is cut back to the noisy tokens. The
  source tokens are never denoised and never stored in the record: a node is still one denoiser row, and the
  source latents are encoded once per prompt (a per-prompt conditioning tensor, gathered per row like the text).
- The target size is the call's height/width, as given. The stock pipeline instead rescales the requested size to
  `max_area` pixels (1024² by default) at the requested aspect ratio, floored to a multiple of 16: to sample what it
  samples, pass that size. The schedule's shift uses the noisy tokens only.
- Guidance-distilled like FLUX.1-dev (one row per node); the stock pipeline's true CFG (`true_cfg_scale` with a
  negative prompt) is not supported here, as for FLUX.1.
- Without a source image it is FLUX.1 text-to-image, as the stock pipeline is.
"""

from __future__ import annotations

import torch
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

from .base import register_adapter, source_sets
from .flux import FluxAdapter


@register_adapter("FluxKontextPipeline")
class FluxKontextAdapter(FluxAdapter):
    hub_tags = ("flux", "flux-diffusers", "flux-kontext")
    hub_task = "image-to-image"
    takes_source_image = True

    @classmethod
    def claims_lora_keys(cls, keys: list[str]) -> bool:
        """Never from keys alone: a Kontext LoRA's keys are FLUX.1's (the same transformer); FLUX.1 claims them, and
        which base a LoRA was trained on is in its card's `base_model`."""
        return False

    def stock_call_kwargs(self, kwargs: dict) -> dict:
        """The stock call samples at the given size (`max_area` = height × width; its default rescales to 1024²) and
        resizes sources as `auto_resize` says (the stock pipeline's private `_auto_resize`)."""
        kwargs = dict(kwargs)
        auto_resize = kwargs.pop("auto_resize", None)
        if auto_resize is not None:
            kwargs["_auto_resize"] = auto_resize
        if kwargs.get("height") and kwargs.get("width"):
            kwargs.setdefault("max_area", kwargs["height"] * kwargs["width"])
        return kwargs

    def encode(self, prompts, *, negative_prompt, guidance_scale, height, width, max_sequence_length, image=None,
               auto_resize: bool = True):
        conditioning = super().encode(prompts, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                                      height=height, width=width, max_sequence_length=max_sequence_length)
        if image is None:
            return conditioning
        images = [images[0] for images in source_sets(image, len(prompts))]
        pixels = self.source_pixels(images, auto_resize, conditioning.cond["encoder_hidden_states"].dtype)
        pipe = self.pipe
        latents = pipe._encode_vae_image(image=pixels, generator=None)  # the latent mode: no randomness
        channels, latent_h, latent_w = latents.shape[1:]
        packed = pipe._pack_latents(latents, latents.shape[0], channels, latent_h, latent_w)
        source_ids = pipe._prepare_latent_image_ids(1, latent_h // 2, latent_w // 2, packed.device, packed.dtype)
        source_ids[..., 0] = 1  # the source's tokens sit on another "frame" than the noise's
        shared = {**conditioning.shared, "img_ids": torch.cat([conditioning.shared["img_ids"], source_ids])}
        return type(conditioning)(cond={**conditioning.cond, "source_latents": packed}, uncond=None,
                                  guidance_scale=guidance_scale, height=height, width=width, shared=shared)

    @classmethod
    def encoded_source_size(cls, width: int, height: int, auto_resize: bool = True, multiple: int = 16
                            ) -> tuple[int, int]:
        """Kontext's preferred resolution nearest the aspect ratio (`auto_resize`, the stock default), else as
        given, floored to `multiple` (the VAE's scale × the 2×2 packing: 16 for the real models)."""
        if auto_resize:
            _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        return width // multiple * multiple, height // multiple * multiple

    def source_pixels(self, images: list, auto_resize: bool, dtype: torch.dtype) -> torch.Tensor:
        """The source images as the stock pipeline preprocesses them, `[P, 3, H, W]` in [-1, 1] on its device. The
        stock pipeline sizes a batch by its first image; here each image is sized by itself, and they must agree
        (the source tokens' position ids are shared by the batch)."""
        processor, multiple = self.pipe.image_processor, self.pipe.vae_scale_factor * 2
        tensors = []
        for index, img in enumerate(images):
            height, width = processor.get_default_height_width(img)
            width, height = self.encoded_source_size(width, height, auto_resize, multiple)
            tensors.append(processor.preprocess(processor.resize(img, height, width), height, width))
            if tensors[-1].shape != tensors[0].shape:
                raise ValueError(f"source image {index} becomes {width}x{height} pixels but image 0 "
                                 f"{tensors[0].shape[-1]}x{tensors[0].shape[-2]}: the source images of one batch must "
                                 "have the same size after Kontext's resizing (the same aspect ratio with "
                                 "auto_resize, else the same size).")
        return torch.cat(tensors).to(device=self.pipe._execution_device, dtype=dtype)

    def prepare_latents(self, num, height, width, generator, dtype):
        pipe = self.pipe
        channels = pipe.transformer.config.in_channels // 4
        # Kontext's `prepare_latents` takes the source image first and returns its latents and ids too
        latents = pipe.prepare_latents(None, num, channels, height, width, dtype, pipe._execution_device, generator)[0]
        return latents  # packed: [num, (h/2)·(w/2), 4·C]

    def model_forward(self, latents, timestep, inputs, conditioning):
        source = inputs.get("source_latents")
        if source is None:
            return super().model_forward(latents, timestep, inputs, conditioning)
        both = torch.cat([latents, source.to(latents.dtype)], dim=1)
        return super().model_forward(both, timestep, inputs, conditioning)[:, :latents.shape[1]]
