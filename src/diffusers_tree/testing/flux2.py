"""Tiny FLUX.2 pipelines: [dev] (Mistral3 text encoder, guidance embedding) and [klein] base (Qwen3 text encoder,
true CFG), built in-process from config like the other tiny families in `diffusers_tree.testing`.

Both make 32x32 images: the VAE downsamples by 2 and the pipeline packs 2x2 latent patches, so an image is an 8x8
grid of 64 tokens of 16 channels. Call them with:

- FLUX.2 [dev]:   ``pipe(prompt, height=32, width=32, num_inference_steps=n, max_sequence_length=48, generator=g)``
  (``guidance_scale``, default 4.0, feeds the distilled guidance embedding: one forward per image)
- FLUX.2 [klein]: ``pipe(prompt, height=32, width=32, num_inference_steps=n, max_sequence_length=32, generator=g)``
  (the base model: ``guidance_scale`` > 1, default 4.0, runs true CFG against the empty prompt)

Always pass ``height``/``width`` (the pipelines default to 1024) and the short ``max_sequence_length`` (they default to
512). The sequence lengths hold the chat template and the prompt: [dev]'s template puts the pipeline's system message
(about 30 tokens) before every prompt, [klein]'s wraps it in about 15 tokens of Qwen3 chat markup.

The text encoders are narrow (width 16) but as deep as the pipelines read: FLUX.2 stacks the hidden states of layers
(10, 20, 30) of Mistral3 and (9, 18, 27) of Qwen3, so they have 30 and 27 layers. The tokenizers are byte-level BPE
whose vocabulary is every byte plus whole words (``DEFAULT_WORDS`` and, for [dev], the system message's words), so
any text encodes, without unknown tokens. [dev]'s ``tokenizer`` is a ``PreTrainedTokenizerFast`` with a Mistral-style
chat template, not the ``PixtralProcessor`` of the real checkpoint (which needs torchvision): for text the pipeline
only calls its ``apply_chat_template``.
"""

from __future__ import annotations

import re

from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from .common import DEFAULT_WORDS, TINY_VOCAB_SIZE, _finish, _seeded

__all__ = ["tiny_flux2_klein_pipeline", "tiny_flux2_pipeline", "tiny_mistral_tokenizer", "tiny_qwen3_tokenizer"]

TEXT_WIDTH = 16  # hidden size of both tiny text encoders; the transformer reads 3 stacked layers of it
# Mistral's layout: [SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]…[/INST]; content is a string or a list of typed parts
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)
# Qwen3's layout, with its empty think block when called with enable_thinking=False (as FLUX.2 klein does)
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _byte_level_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a byte-level BPE: the 256 byte symbols, then each (ASCII) word alone and after a
    space ('Ġ' + word) as one token. Each token's merges join the pieces the merges so far leave it in, so they are
    appended after (ranked below) every earlier merge and never change how an earlier token splits."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    for token in dict.fromkeys(form for word in words for form in (word, "Ġ" + word)):
        while len(pieces := [t.value for t in models.BPE(vocab, merges).tokenize(token)]) > 1:
            joined = pieces[0]
            for piece in pieces[1:]:
                merges.append((joined, piece))
                joined += piece
                vocab.setdefault(joined, len(vocab))
    return vocab, merges


def _check_vocab(tokenizer) -> None:
    if len(tokenizer) > TINY_VOCAB_SIZE:
        raise ValueError(f"tokenizer of {len(tokenizer)} tokens exceeds the tiny encoders' {TINY_VOCAB_SIZE} rows")


def tiny_mistral_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with Mistral's special tokens and a Mistral-style chat template (see the module docstring)."""
    vocab, merges = _byte_level_bpe([*DEFAULT_WORDS, *re.findall(r"[A-Za-z]+", SYSTEM_MESSAGE)])
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"],
        chat_template=MISTRAL_CHAT_TEMPLATE, model_max_length=512,
    )  # fmt: skip
    _check_vocab(tokenizer)
    return tokenizer


def tiny_qwen3_tokenizer() -> Qwen2Tokenizer:
    """Qwen2Tokenizer (the class FLUX.2 klein ships) on a tiny byte-level BPE, with a Qwen3-style chat template."""
    vocab, merges = _byte_level_bpe([*DEFAULT_WORDS, "user", "assistant"])
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, chat_template=QWEN3_CHAT_TEMPLATE, model_max_length=512,
                               additional_special_tokens=["<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    _check_vocab(tokenizer)
    return tokenizer


def _transformer(*, guidance_embeds: bool) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2x2 packed patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_WIDTH,  # three text-encoder layers stacked per token
        timestep_guidance_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),  # (T, H, W, L) position ids; sums to attention_head_dim
        guidance_embeds=guidance_embeds,
    )


def _vae() -> AutoencoderKLFlux2:
    """Two blocks (vae_scale_factor 2), 4 latent channels; random batch-norm statistics, so that decoding checks
    the pipeline's de-normalisation of the 16 patchified channels."""
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )  # fmt: skip
    vae.bn.running_mean.normal_(0.0, 0.5)
    vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX.2's scheduler config; the pipelines pass mu from their own compute_empirical_mu
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def tiny_flux2_pipeline(*, seed: int = 0) -> Flux2Pipeline:
    """Tiny FLUX.2 [dev]-style pipeline (Mistral3 text encoder, guidance-embedding transformer, flow matching).
    Always pass ``height=32, width=32`` and ``max_sequence_length=48``."""
    tokenizer = tiny_mistral_tokenizer()
    with _seeded(seed):
        text_config = MistralConfig(
            vocab_size=TINY_VOCAB_SIZE, hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=30,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        vision_config = PixtralVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=16, patch_size=4)
        text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config=text_config, vision_config=vision_config, tie_word_embeddings=False,
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        ))  # fmt: skip
        transformer = _transformer(guidance_embeds=True)
        vae = _vae()
    pipe = Flux2Pipeline(scheduler=_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer)
    return _finish(pipe)


def tiny_flux2_klein_pipeline(*, seed: int = 0) -> Flux2KleinPipeline:
    """Tiny FLUX.2 [klein] base-style pipeline (Qwen3 text encoder, no guidance embedding, true CFG).
    Always pass ``height=32, width=32`` and ``max_sequence_length=32``."""
    tokenizer = tiny_qwen3_tokenizer()
    with _seeded(seed):
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=TINY_VOCAB_SIZE, hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=27,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))  # fmt: skip
        transformer = _transformer(guidance_embeds=False)
        vae = _vae()
    pipe = Flux2KleinPipeline(scheduler=_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)
    return _finish(pipe)
