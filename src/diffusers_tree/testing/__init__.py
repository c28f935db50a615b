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

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

__all__ = ["TINY_PIPELINES", "rescoring_ratio_error", "tiny_tokenizer", "tiny_sd_pipeline", "tiny_sdxl_pipeline",
           "tiny_sd3_pipeline", "tiny_flux_pipeline", "tiny_flux2_pipeline", "tiny_flux2_klein_pipeline",
           "tiny_qwenimage_pipeline", "tiny_sana_pipeline", "tiny_wan_pipeline", "tiny_zimage_pipeline"]

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, matching the CLIP configs below
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DEFAULT_WORDS = [
    "a", "an", "the", "photo", "picture", "painting", "portrait", "of", "on", "in", "with", "and", "at",
    "cat", "dog", "bird", "horse", "car", "house", "tree", "flower", "apple", "banana", "table", "chair",
    "man", "woman", "sky", "sea", "mountain", "city", "street",
    "red", "blue", "green", "yellow", "black", "white", "orange", "purple",
    "small", "large", "big", "cute", "beautiful", "high", "quality", "detailed",
    *DIGIT_WORDS,
]  # fmt: skip
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)  # SD1.5/SDXL
TINY_VOCAB_SIZE = 1000  # embedding rows of the tiny text encoders; tokenizer vocabularies must stay below this


def _clip_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=TINY_VOCAB_SIZE, projection_dim=32,
    )  # fmt: skip


def _t5_encoder() -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=TINY_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4))


def _vae(**overrides) -> AutoencoderKL:
    """AutoencoderKL with 2 blocks (vae_scale_factor 2), 4 latent channels, for 32x32 images."""
    config = dict(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=32,
    )  # fmt: skip
    return AutoencoderKL(**{**config, **overrides})


def _unet(**overrides) -> UNet2DConditionModel:
    """Two-block UNet on 16x16 latents (32x32 images with the VAE above)."""
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        **overrides,
    )


def _finish(pipe):
    """Put every torch module of ``pipe`` (built in fp32) in eval mode and disable the progress bar."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Fork the CPU RNG and seed it, so building does not disturb the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_tokenizer(
    vocab_words: list[str] | None = None, model_max_length: int = 77, *, seed: int = 0
) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: ids 0..3 are <s>, <pad>, </s>, <unk>, then ``vocab_words`` (default: a few
    dozen common prompt words and the digit words zero..nine). Unknown words map to <unk>; no bos/eos is added.
    ``seed`` is accepted for a uniform signature; the tokenizer has no randomness."""
    del seed
    words = DEFAULT_WORDS if vocab_words is None else vocab_words
    vocab: dict[str, int] = {}
    for word in [*SPECIAL_TOKENS, *words]:
        vocab.setdefault(word, len(vocab))
    if len(vocab) > TINY_VOCAB_SIZE:
        raise ValueError(f"vocabulary of {len(vocab)} tokens exceeds the tiny encoders' {TINY_VOCAB_SIZE} rows")
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def tiny_sd_pipeline(*, seed: int = 0) -> StableDiffusionPipeline:
    """Tiny Stable Diffusion 1.5-style pipeline (UNet + one CLIP text encoder + DDIM), 32x32 output by default."""
    with _seeded(seed):
        unet = _unet(cross_attention_dim=32, attention_head_dim=4)
        vae = _vae()
        text_encoder = CLIPTextModel(_clip_config())
    scheduler = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def tiny_sdxl_pipeline(*, seed: int = 0) -> StableDiffusionXLPipeline:
    """Tiny SDXL-style pipeline (text-time UNet + two CLIP encoders + Euler), 32x32 output by default."""
    with _seeded(seed):
        unet = _unet(
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + 32 pooled
            cross_attention_dim=64,  # two CLIP encoders of hidden 32, concatenated
        )
        vae = _vae()
        text_encoder = CLIPTextModel(_clip_config())
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    scheduler = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    return _finish(pipe)


def tiny_sd3_pipeline(*, seed: int = 0) -> StableDiffusion3Pipeline:
    """Tiny SD3-style pipeline (MMDiT + two CLIP encoders + T5 + flow matching), 32x32 output by default.
    Call it with a short ``max_sequence_length`` (e.g. 16)."""
    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            caption_projection_dim=64,
            joint_attention_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
            pos_embed_max_size=16,
        )
        vae = _vae(shift_factor=0.0, scaling_factor=1.0)
        text_encoder = CLIPTextModelWithProjection(_clip_config())
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
        text_encoder_3 = _t5_encoder()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tiny_tokenizer(),
    )
    return _finish(pipe)


def tiny_flux_pipeline(*, seed: int = 0) -> FluxPipeline:
    """Tiny FLUX-style pipeline (schnell-like, no guidance embedding; CLIP + T5 + flow matching with dynamic shift).
    Always pass ``height=32, width=32`` (FLUX's default is 256) and a short ``max_sequence_length`` (e.g. 16)."""
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels x 2x2 packed patches
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
        )
        vae = _vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0)
        text_encoder = CLIPTextModel(_clip_config())
        text_encoder_2 = _t5_encoder()
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        shift=3.0,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_tokenizer(),
        transformer=transformer,
    )
    return _finish(pipe)


from .flux2 import tiny_flux2_klein_pipeline, tiny_flux2_pipeline  # noqa: E402  (after the helpers they import)
from .qwenimage import tiny_qwenimage_pipeline  # noqa: E402
from .sana import tiny_sana_pipeline  # noqa: E402
from .wan import tiny_wan_pipeline  # noqa: E402
from .zimage import tiny_zimage_pipeline  # noqa: E402

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
