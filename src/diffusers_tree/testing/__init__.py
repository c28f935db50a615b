"""Tiny random-weight diffusers pipelines, built in-process from config (no Hub access), for tests and benchmarks.

Every builder takes a keyword-only ``seed`` and builds all weights under ``torch.manual_seed(seed)`` inside a
forked CPU RNG (the caller's global RNG state is left untouched), so the same seed gives identical weights.
Models are fp32 and in eval mode.

All four families produce 32x32 images (the VAEs downsample by 2, so latents are 16x16). Call them with:

- SD1.5: ``pipe(prompt, height=32, width=32, num_inference_steps=n, guidance_scale=7.5, generator=g)``
- SDXL:  ``pipe(prompt, height=32, width=32, num_inference_steps=n, guidance_scale=5.0, generator=g)``
- SD3:   ``pipe(prompt, height=32, width=32, num_inference_steps=n, guidance_scale=7.0,
  max_sequence_length=16, generator=g)``
- FLUX:  ``pipe(prompt, height=32, width=32, num_inference_steps=n, max_sequence_length=16, generator=g)``
  (the transformer has no guidance embedding, like FLUX.1-schnell, so ``guidance_scale`` is ignored; FLUX's own
  default height/width is 256, so always pass 32).

Pass a short ``max_sequence_length`` (e.g. 16) to SD3/FLUX: the pipelines' defaults (256/512) only slow the T5 slot.
The families added later (FLUX.2, Qwen-Image, SANA, Wan, Z-Image) have their builders in their own modules here,
each saying how to call it; `TINY_PIPELINES` holds every family's builder and the call kwargs it needs.
"""

from __future__ import annotations

import torch

from .common import DEFAULT_WORDS, DIGIT_WORDS, SD_BETAS, TINY_VOCAB_SIZE, tiny_tokenizer
from .flux import tiny_flux_pipeline
from .flux2 import tiny_flux2_klein_pipeline, tiny_flux2_pipeline
from .flux_kontext import tiny_flux_kontext_pipeline
from .qwenimage import tiny_qwenimage_pipeline
from .qwenimage_edit import tiny_qwenimage_edit_pipeline, tiny_qwenimage_edit_plus_pipeline
from .sana import tiny_sana_pipeline
from .sd import tiny_sd_pipeline, tiny_sdxl_pipeline
from .sd3 import tiny_sd3_pipeline
from .wan import tiny_wan_pipeline
from .zimage import tiny_zimage_pipeline

__all__ = ["TINY_PIPELINES", "rescoring_ratio_error", "tiny_tokenizer", "tiny_sd_pipeline", "tiny_sdxl_pipeline",
           "tiny_sd3_pipeline", "tiny_flux_pipeline", "tiny_flux2_pipeline", "tiny_flux2_klein_pipeline",
           "tiny_qwenimage_pipeline", "tiny_sana_pipeline", "tiny_flux_kontext_pipeline", "TINY_EDIT_PIPELINES",
           "tiny_qwenimage_edit_pipeline", "tiny_qwenimage_edit_plus_pipeline",
           "tiny_wan_pipeline", "tiny_zimage_pipeline",
           "DEFAULT_WORDS", "DIGIT_WORDS", "SD_BETAS", "TINY_VOCAB_SIZE"]

# family → (builder, the call kwargs its tiny pipeline needs: the LLM/T5 token length, Wan's frame count)
TINY_PIPELINES = {
    "sd": (tiny_sd_pipeline, {}),
    "sdxl": (tiny_sdxl_pipeline, {}),
    "sd3": (tiny_sd3_pipeline, {"max_sequence_length": 16}),
    "flux": (tiny_flux_pipeline, {"max_sequence_length": 16}),
    "zimage": (tiny_zimage_pipeline, {"max_sequence_length": 32}),
    "sana": (tiny_sana_pipeline, {"max_sequence_length": 16}),
    "wan": (tiny_wan_pipeline, {"max_sequence_length": 16, "num_frames": 5}),  # 2 latent frames
    "qwenimage": (tiny_qwenimage_pipeline, {"max_sequence_length": 16}),
    "flux2": (tiny_flux2_pipeline, {"max_sequence_length": 48}),  # the chat template's ~30 tokens + the prompt
    "flux2_klein": (tiny_flux2_klein_pipeline, {"max_sequence_length": 32}),
}

# editing families: (builder, call kwargs); their tests give each prompt a source image
TINY_EDIT_PIPELINES = {
    "flux_kontext": (tiny_flux_kontext_pipeline, {"max_sequence_length": 16}),
    "qwenimage_edit": (tiny_qwenimage_edit_pipeline, {}),  # the source's 4 vision tokens + the template's
    "qwenimage_edit_plus": (tiny_qwenimage_edit_plus_pipeline, {}),
}


def rescoring_ratio_error(tree, record, conditioning, max_batch_size: int = 64) -> float:
    """max |ratio − 1| over a record's edges when every parent is re-scored as training does: one guided forward
    per parent (`tree.model_output`), then the log-prob of the stored child under the scheduler's transition. Zero
    up to float rounding before any update, in every family (sampling and training share the code path)."""
    with torch.no_grad():
        model_output = tree.model_output(record.parent_latents, record.parent_timestep, record.parent_prompt_index,
                                         conditioning, max_batch_size=max_batch_size)
    edge = record.edge_parent
    rescored = tree.scheduler.transition(model_output[edge], record.parent_latents[edge], record.edge_step,
                                         stochastic=True, prev_sample=record.child_latents)
    return float((torch.exp(rescored.log_prob - record.edge_log_prob) - 1).abs().max())
