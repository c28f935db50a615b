"""Tiny Qwen-Image pipeline (`QwenImagePipeline`), built in-process from config.

Call it with ``pipe(prompt, height=32, width=32, num_inference_steps=n, max_sequence_length=16, generator=g)``;
add ``negative_prompt=" "`` (and ``true_cfg_scale``, default 4) for the pipeline's true CFG, which it runs only when
a negative prompt is given. Always pass ``height``/``width`` (the pipeline's default is 256 here).
"""

from __future__ import annotations

from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from .common import DEFAULT_WORDS, TINY_VOCAB_SIZE, _finish, _seeded

__all__ = ["tiny_qwen_tokenizer", "tiny_qwenimage_pipeline"]

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]  # ids 0..3; <|endoftext|> pads
# the words of the pipeline's prompt template (`prompt_template_encode`), so the template is not all <unk>
TEMPLATE_WORDS = ("system Describe the image by detailing color shape size texture quantity text spatial "
                  "relationships of objects and background user assistant , :").split()


def tiny_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level stand-in for Qwen2's tokenizer: `<|im_start|>`/`<|im_end|>` are single special tokens and each
    newline is a token of its own, so the template's prefix is 34 tokens, the count the pipeline drops
    (`prompt_template_encode_start_idx`), as with the real tokenizer. Pads on the right with `<|endoftext|>`."""
    vocab: dict[str, int] = {}
    for word in [*QWEN_SPECIAL_TOKENS, "\n", *TEMPLATE_WORDS, *DEFAULT_WORDS]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # words, punctuation runs and newlines are tokens; other whitespace separates them
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), behavior="removed", invert=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], model_max_length=2048,
    )  # fmt: skip


def _text_encoder() -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL with a 2-layer, 32-wide language model (the pipeline reads its last hidden states) and a 1-block
    vision tower the pipeline never calls; the vision token ids sit in unused vocabulary rows."""
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=2, pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},  # 2·4 = head dim
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        image_token_id=TINY_VOCAB_SIZE - 4, video_token_id=TINY_VOCAB_SIZE - 3,
        vision_start_token_id=TINY_VOCAB_SIZE - 2, vision_end_token_id=TINY_VOCAB_SIZE - 1,
    )  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config)


def tiny_qwenimage_pipeline(*, seed: int = 0) -> QwenImagePipeline:
    """Tiny Qwen-Image pipeline (2-block MMDiT + tiny Qwen2.5-VL + Qwen VAE + flow matching with Qwen-Image's
    dynamic exponential shift), 32x32 images: the VAE downsamples by 2, so latents are 4×16×16, packed to 64 tokens
    of 16 channels. The VAE's `latents_mean`/`latents_std` are not 0/1, so decoding checks the normalization."""
    with _seeded(seed):
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),  # sums to the head dim
        )  # fmt: skip
        vae = AutoencoderKLQwenImage(
            base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
            latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.8, 1.2, 1.5, 0.9],
        )  # fmt: skip
        text_encoder = _text_encoder()
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen-Image's scheduler settings
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
    )  # fmt: skip
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                             tokenizer=tiny_qwen_tokenizer(), transformer=transformer)
    return _finish(pipe)
