"""Qwen-Image-Edit (`QwenImageEditPipeline`) and Qwen-Image-Edit-Plus (`QwenImageEditPlusPipeline`, the 2509/2511
checkpoints, several source images): Qwen-Image with each source seen twice, by the Qwen2.5-VL text encoder beside
the instruction and as VAE latents appended to the image tokens.

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
- Plus: each prompt may have several sources ("Picture 1: ..., Picture 2: ..." before the instruction); the VL
  encoder sees each at about 384² pixels, the VAE at about 1024², and RoPE gets one grid per source. Its stock
  pipeline takes one prompt per call.
"""

from __future__ import annotations

import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

from .base import Conditioning, register_adapter, source_sets
from .qwenimage import EMPTY_NEGATIVE_PROMPT, QwenImageAdapter

SOURCE_AREA = 1024 * 1024  # the stock pipelines' source resolution for the VAE (and Edit's VL encoder), in pixels
CONDITION_AREA = 384 * 384  # Plus: each source's resolution for the VL encoder
DEFAULT_LENGTH = 2048  # instruction + the source's vision tokens (~1,330 for a 1024² source with the real encoder)


@register_adapter("QwenImageEditPipeline")
class QwenImageEditAdapter(QwenImageAdapter):
    hub_tags = ("qwen-image", "qwen-image-diffusers", "qwen-image-edit")
    hub_task = "image-to-image"
    takes_source_image = True
    condition_area = SOURCE_AREA  # pixels of each source as the VL encoder sees it

    @classmethod
    def claims_lora_keys(cls, keys: list[str]) -> bool:
        """Never from keys alone: an edit LoRA's keys are Qwen-Image's (the same transformer); which base it was
        trained on is in its card's `base_model`."""
        return False

    def encode(self, prompts, *, negative_prompt, guidance_scale, height, width, max_sequence_length, image=None,
               auto_resize: bool = True):
        sources = self.source_sets(image, len(prompts))
        length = max_sequence_length or DEFAULT_LENGTH
        negative = EMPTY_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        seen = [[self._resized(img, self.condition_area) for img in images] for images in sources]
        cond = self._embed_each(list(prompts), seen, length)
        latents, grids = zip(*(self._source_latents(images) for images in sources), strict=True)
        odd = next((i for i, grid in enumerate(grids) if grid != grids[0]), None)
        if odd is not None:
            raise ValueError(f"the sources of prompt {odd} make latent grids {grids[odd]}, prompt 0's {grids[0]}: "
                             "the sources of one batch must share their number and aspect ratios.")
        cond["source_latents"] = torch.stack(latents)
        # each source's grid for RoPE, carried in the shape of an empty tensor: read without a device sync
        shared = {f"source_grid_{i}": torch.empty(0, h, w, device=cond["source_latents"].device)
                  for i, (h, w) in enumerate(grids[0])}
        uncond = None
        if self.uses_cfg(guidance_scale, self.pipe.config):  # the negative prompt sees the sources too
            uncond = {**self._embed_each(negative, seen, length), "source_latents": cond["source_latents"]}
        return Conditioning(cond=cond, uncond=uncond, guidance_scale=guidance_scale, height=height, width=width,
                            shared=shared)

    @classmethod
    def encoded_source_size(cls, width: int, height: int, auto_resize: bool = True) -> tuple[int, int]:
        """About 1024² pixels at the source's aspect ratio, multiples of 32 (`_source_latents`)."""
        encoded_width, encoded_height, _ = calculate_dimensions(SOURCE_AREA, width / height)
        return encoded_width, encoded_height

    @classmethod
    def source_text_tokens(cls, width: int, height: int) -> float:
        """The VL encoder's vision tokens for the source seen at `condition_area` pixels: one per 28×28 pixels
        (Qwen2.5-VL's 14-pixel patches merged 2×2)."""
        return cls.condition_area / (28 * 28)

    def source_sets(self, image, num_prompts: int) -> list[list]:
        """Each prompt's source images: `image` is one image for all, or one entry per prompt (an image, or for
        Plus a list of them)."""
        if image is None:
            raise ValueError(f"{type(self.pipe).__name__} edits a source image: pass image= (one per prompt, or one "
                             "for all).")
        return source_sets(image, num_prompts, self.max_sources)

    def _resized(self, image, area: int):
        """`image` resized as the stock pipeline does: about `area` pixels at its aspect ratio, multiples of 32."""
        width, height, _ = calculate_dimensions(area, image.size[0] / image.size[1])
        return self.pipe.image_processor.resize(image, height, width)

    def _embed_each(self, prompts: list[str], seen: list[list], length: int) -> dict[str, torch.Tensor]:
        """Prompt embeddings prompt by prompt, each with its own sources as the VL encoder sees them (one image for
        Edit; a list, "Picture 1 ... n", for Plus), padded to `length` and stacked."""
        parts = [self._embed([prompt], length, image=images[0] if self.max_sources == 1 else images)
                 for prompt, images in zip(prompts, seen, strict=True)]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def _source_latents(self, images: list) -> tuple[torch.Tensor, tuple]:
        """One prompt's sources VAE-encoded (latent mode, normalised) and packed, `[S, 4·C]`, and their grids."""
        pipe, packed, grids = self.pipe, [], []
        for image in images:
            width, height = self.encoded_source_size(*image.size)
            pixels = pipe.image_processor.preprocess(image, height, width).unsqueeze(2)  # [1, 3, 1, H, W]
            latents = pipe._encode_vae_image(pixels.to(pipe._execution_device, pipe.vae.dtype), generator=None)
            channels, grid_h, grid_w = latents.shape[1], latents.shape[3], latents.shape[4]
            packed.append(pipe._pack_latents(latents, 1, channels, grid_h, grid_w)[0])
            grids.append((grid_h // 2, grid_w // 2))
        return torch.cat(packed).to(self.pipe.transformer.dtype), tuple(grids)

    def prepare_latents(self, num, height, width, generator, dtype):
        pipe = self.pipe
        channels = pipe.transformer.config.in_channels // 4
        # the edit pipelines' `prepare_latents` take the sources first and return their latents too
        return pipe.prepare_latents(None, num, channels, height, width, dtype, pipe._execution_device, generator)[0]

    def model_forward(self, latents, timestep, inputs, conditioning):
        factor = self.pipe.vae_scale_factor * 2
        shapes = [(1, conditioning.height // factor, conditioning.width // factor)]
        shapes += [(1, *grid.shape[1:]) for key, grid in conditioning.shared.items() if key.startswith("source_grid")]
        both = torch.cat([latents, inputs["source_latents"].to(latents.dtype)], dim=1)
        return self.transformer_forward(both, timestep, inputs, shapes)[:, :latents.shape[1]]


@register_adapter("QwenImageEditPlusPipeline")
class QwenImageEditPlusAdapter(QwenImageEditAdapter):
    """Plus (2509/2511): up to `max_sources` sources per prompt, seen by the VL encoder at about 384² pixels."""

    max_sources = 3  # the checkpoints are trained with 1-3 input images
    condition_area = CONDITION_AREA
