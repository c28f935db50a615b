"""Qwen-Image-Edit (`QwenImageEditPipeline`): Qwen-Image with the source image seen twice, by the Qwen2.5-VL text
encoder beside the instruction and as VAE latents appended to the image tokens.

Quirks, as the installed `pipeline_qwenimage_edit.py` does them (and Qwen-Image's, see `qwenimage.py`):
- Every source is resized to about 1024² pixels at its aspect ratio (`calculate_dimensions`, multiples of 32),
  whatever the target size; the stock pipeline has no switch for it, so `auto_resize` is ignored. The resized
  image goes to the VL encoder through the edit template (`<|vision_start|><|image_pad|><|vision_end|>` before the
  instruction; the first 64 template tokens dropped), so the prompt embeddings depend on the source, and the
  negative prompt is encoded with the source too.
- The prompt embeddings hold the source's vision tokens: `max_sequence_length` (default 2048 here, the stock call
  does not truncate) is the padded length of instruction plus vision tokens, and must hold both.
- The source is VAE-encoded with the latent mode (`argmax`), normalised by `latents_mean`/`latents_std`, packed in
  2×2 patches, and appended to the noisy tokens at every forward; RoPE gets both grids, `img_shapes = [(1, h/2,
  w/2) of the target, (1, h'/2, w'/2) of the source]`, and the output is cut back to the noisy tokens. The source
  tokens are never denoised nor stored: rows stay the unique-node count, and the source is encoded once per
  prompt (a per-prompt conditioning tensor, gathered per row like the text).
- The target size defaults in the stock pipeline to the source's resized size; here it is the call's height/width.
- A stock batch of several prompts that asks for several images per prompt tiles the sources in the wrong order
  (`[s0, s1, s0, s1, ...]` against prompts `[p0, p0, ..., p1, ...]`); call it one prompt at a time.
"""

from __future__ import annotations

import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

from .base import Conditioning, register_adapter
from .qwenimage import EMPTY_NEGATIVE_PROMPT, QwenImageAdapter

SOURCE_AREA = 1024 * 1024  # the stock pipeline's source resolution, in pixels
DEFAULT_LENGTH = 2048  # instruction + the source's vision tokens (~1,330 for a 1024² source with the real encoder)


@register_adapter("QwenImageEditPipeline")
class QwenImageEditAdapter(QwenImageAdapter):
    hub_tags = ("qwen-image", "qwen-image-diffusers", "qwen-image-edit")
    hub_task = "image-to-image"
    takes_source_image = True

    @classmethod
    def claims_lora_keys(cls, keys: list[str]) -> bool:
        """Never from keys alone: an edit LoRA's keys are Qwen-Image's (the same transformer); which base it was
        trained on is in its card's `base_model`."""
        return False

    def encode(self, prompts, *, negative_prompt, guidance_scale, height, width, max_sequence_length, image=None,
               auto_resize: bool = True):
        if image is None:
            raise ValueError("QwenImageEditPipeline edits a source image: pass image= (one per prompt, or one for "
                             "all).")
        images = list(image) if isinstance(image, (list, tuple)) else [image] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} source images for {len(prompts)} prompts: give one per prompt, or one "
                             "for all.")
        resized, (source_h, source_w) = self.resized_sources(images)
        length = max_sequence_length or DEFAULT_LENGTH
        do_cfg = self.uses_cfg(guidance_scale, self.pipe.config)
        negative = EMPTY_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        cond = self._embed(list(prompts), length, image=resized)
        pipe = self.pipe
        pixels = pipe.image_processor.preprocess(resized, source_h, source_w).unsqueeze(2)  # [P, 3, 1, H, W]
        latents = pipe._encode_vae_image(pixels.to(pipe._execution_device, cond["encoder_hidden_states"].dtype),
                                         generator=None)  # the latent mode: no randomness
        channels, grid_h, grid_w = latents.shape[1], latents.shape[3], latents.shape[4]
        cond["source_latents"] = pipe._pack_latents(latents, len(prompts), channels, grid_h, grid_w)
        # the source grid for RoPE, carried in the shape of an empty tensor: read without a device sync
        shared = {"source_grid": torch.empty(0, grid_h // 2, grid_w // 2, device=latents.device)}
        uncond = None
        if do_cfg:  # the negative prompt sees the source too, and its forward appends the same source tokens
            uncond = {**self._embed(negative, length, image=resized), "source_latents": cond["source_latents"]}
        return Conditioning(cond=cond, uncond=uncond, guidance_scale=guidance_scale, height=height, width=width,
                            shared=shared)

    def resized_sources(self, images: list) -> tuple[list, tuple[int, int]]:
        """The sources resized as the stock pipeline does (about 1024² pixels at each one's aspect ratio) and their
        (height, width), which must agree (a batch shares the source grid)."""
        resized, size = [], None
        for index, img in enumerate(images):
            width, height = img.size
            target_w, target_h, _ = calculate_dimensions(SOURCE_AREA, width / height)
            if size is not None and (target_h, target_w) != size:
                raise ValueError(f"source image {index} becomes {target_w}x{target_h} pixels but image 0 "
                                 f"{size[1]}x{size[0]}: the sources of one batch must share an aspect ratio.")
            size = (target_h, target_w)
            resized.append(self.pipe.image_processor.resize(img, target_h, target_w))
        return resized, size

    def prepare_latents(self, num, height, width, generator, dtype):
        pipe = self.pipe
        channels = pipe.transformer.config.in_channels // 4
        # the edit pipeline's `prepare_latents` takes the source first and returns its latents too
        return pipe.prepare_latents(None, num, channels, height, width, dtype, pipe._execution_device, generator)[0]

    def model_forward(self, latents, timestep, inputs, conditioning):
        factor = self.pipe.vae_scale_factor * 2
        shape = (1, conditioning.height // factor, conditioning.width // factor)
        source = inputs["source_latents"].to(latents.dtype)
        both = torch.cat([latents, source], dim=1)
        source_shape = (1, *conditioning.shared["source_grid"].shape[1:])
        return self.transformer_forward(both, timestep, inputs, [shape, source_shape])[:, :latents.shape[1]]
