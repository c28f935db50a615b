"""Tiny SANA pipeline: a two-block DC-AE, a patch-2 linear-attention SANA transformer and a two-layer Gemma-2.

Call it with ``pipe(prompt, height=32, width=32, num_inference_steps=n, max_sequence_length=16,
use_resolution_binning=False, generator=g)``. ``use_resolution_binning=False`` is needed for any size that is not
one of SANA's aspect-ratio bins: the stock default maps 32x32 to the nearest 512-px bin (512x512), samples there
and resizes the decoded image back. ``max_sequence_length=16`` keeps the Gemma slot short (the default is 300
tokens after the complex human instruction, which the tiny word-level tokenizer encodes mostly as ``<unk>``).
"""

from __future__ import annotations

from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
from tokenizers.processors import TemplateProcessing
from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

from .common import TINY_VOCAB_SIZE, _finish, _seeded, tiny_tokenizer

__all__ = ["SANA_SCHEDULER_CONFIG", "tiny_gemma_tokenizer", "tiny_sana_pipeline"]

# The scheduler of the SANA checkpoints on the Hub (DPM-Solver++ 2M on flow sigmas shifted by 3)
SANA_SCHEDULER_CONFIG = dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")


def tiny_gemma_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny word-level tokenizer, prefixing ``<s>`` as Gemma's prefixes ``<bos>``: SANA keeps the first token
    (the bos) and the last ``max_sequence_length - 1`` ones, and the empty negative prompt then still has one
    unmasked token. ``model_max_length`` 512 leaves room for the complex human instruction (~190 tokens here)."""
    tokenizer = tiny_tokenizer(model_max_length=512)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tokenizer


def tiny_sana_pipeline(*, seed: int = 0) -> SanaPipeline:
    """Tiny SANA pipeline, 32x32 output (DC-AE factor 2: 4x16x16 latents, 8x8 tokens with patch 2). See the module
    docstring for the call arguments (``use_resolution_binning=False``, a short ``max_sequence_length``)."""
    with _seeded(seed):
        transformer = SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,  # all = 2 x 8
            caption_channels=32,  # the Gemma hidden size
            mlp_ratio=2.5, sample_size=16, patch_size=2,  # sample_size 16: the 512-px bins (the stock check)
        )  # fmt: skip
        vae = AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=4,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
            scaling_factor=0.41407,  # SANA's DC-AE value: not 1, so a missing division shows
        )  # fmt: skip
        text_encoder = Gemma2Model(
            Gemma2Config(
                vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                pad_token_id=1, bos_token_id=0, eos_token_id=2,  # the tiny tokenizer's ids
            )
        )  # fmt: skip
    pipe = SanaPipeline(
        tokenizer=tiny_gemma_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**SANA_SCHEDULER_CONFIG),
    )
    return _finish(pipe)
