"""What every tiny builder shares: the word-level tokenizer, the CLIP/T5 text encoders, the SD VAE and UNet, the
seeded build and the finish (fp32, eval mode)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import (
    AutoencoderKL,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

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


