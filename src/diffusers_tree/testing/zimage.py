"""Tiny Z-Image pipeline (``ZImagePipeline``): single-stream DiT + a tiny Qwen3 text encoder + flow matching."""

from __future__ import annotations

from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

from .common import DEFAULT_WORDS, TINY_VOCAB_SIZE, _finish, _seeded, _vae, tiny_tokenizer

# Qwen3's chat layout (`<|im_start|>role\ncontent<|im_end|>\n`); the pipeline renders every prompt through
# `apply_chat_template(..., add_generation_prompt=True, enable_thinking=True)`, so the tokenizer needs one
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """`tiny_tokenizer` plus the chat roles and Qwen's `<|im_start|>`/`<|im_end|>` markers, with a chat template."""
    tokenizer = tiny_tokenizer([*DEFAULT_WORDS, "user", "assistant", "system"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>",
                                                                "</think>"]})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def tiny_zimage_pipeline(*, seed: int = 0) -> ZImagePipeline:
    """Tiny Z-Image-style pipeline (32-wide DiT with 2×2 patches, 2-layer Qwen3 encoder, static-shift flow matching
    like Z-Image-Turbo), 32x32 output. Always pass ``height=32, width=32`` (the pipeline's default is 1024); the
    pipeline's ``guidance_scale`` defaults to 5.0 (CFG on whenever it is > 0). The prompts are ~12 tokens, so
    ``max_sequence_length=32`` holds them all."""
    with _seeded(seed):
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=4,
            dim=32,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=32,  # the Qwen3 hidden size
            axes_dims=[4, 6, 6],  # sums to the head dim 32 / 2
            axes_lens=[1024, 64, 64],
        )
        # Z-Image decodes with the FLUX VAE: no quant convs, its scaling and shift factors
        vae = _vae(use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=1,
        ))  # fmt: skip
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # Z-Image-Turbo's: static shift, no dynamic shifting
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_qwen3_tokenizer(),
        transformer=transformer,
    )
    return _finish(pipe)
