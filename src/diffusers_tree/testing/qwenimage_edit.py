"""Tiny Qwen-Image-Edit pipeline (`QwenImageEditPipeline`): the tiny Qwen-Image transformer and text encoder
(`qwenimage.py`), a `Qwen2VLProcessor` whose tokenizer knows the vision tokens (so the tiny Qwen2.5-VL's vision tower
sees the source image as the real one does), and a deeper tiny VAE.

The stock pipeline resizes every source to about 1024² pixels (its `calculate_dimensions`, multiples of 32) for the
VAE and the VL encoder, whatever the target size. The VAE here downsamples by 8 (as the real one) so that encode
stays about a second on a CPU (its mid-block attends over the 128² latent grid), and the source becomes 4,096
tokens beside the 4 of a 32×32 target. The VL image processor caps its input at 56×56 pixels (4 merged vision
tokens) to keep the text encoder tiny.
"""

from __future__ import annotations

from diffusers import AutoencoderKLQwenImage, QwenImageEditPipeline, QwenImageEditPlusPipeline
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2VLProcessor

from .common import DEFAULT_WORDS, TINY_VOCAB_SIZE, _finish, _seeded
from .qwenimage import QWEN_SPECIAL_TOKENS, tiny_qwenimage_pipeline

__all__ = ["tiny_qwen_edit_processor", "tiny_qwenimage_edit_pipeline", "tiny_qwenimage_edit_plus_pipeline"]

# the vision tokens at the ids the tiny Qwen2.5-VL config gives them (`qwenimage._text_encoder`)
VISION_TOKENS = {"<|image_pad|>": TINY_VOCAB_SIZE - 4, "<|video_pad|>": TINY_VOCAB_SIZE - 3,
                 "<|vision_start|>": TINY_VOCAB_SIZE - 2, "<|vision_end|>": TINY_VOCAB_SIZE - 1}
# the words of the edit pipeline's prompt template (`QwenImageEditPipeline.prompt_template_encode`)
EDIT_TEMPLATE_WORDS = ("system Describe the key features of the input image color shape size texture objects "
                       "background then explain how user s text instruction should alter or modify Generate a new "
                       "that meets requirements while maintaining consistency with original where appropriate "
                       "assistant ( ) , . ' : Picture 1 2 3").split()  # Plus numbers its pictures


class _ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without a video processor. transformers checks every processor attribute's class against
    its registry, and without torchvision the video registry is a placeholder that fails the check even for
    `video_processor=None` (transformers 5.x); the edit pipeline never sends videos. Only for in-process tiny
    pipelines: saving and reloading one needs torchvision, as the real Qwen-Image-Edit does."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return type(None)
        return super().check_argument_for_proper_class(argument_name, argument)


def tiny_qwen_edit_processor() -> Qwen2VLProcessor:
    """Word-level stand-in for Qwen2's tokenizer with the vision tokens as special tokens, and a Qwen2-VL image
    processor that feeds the tiny vision tower (14-pixel patches, 2×2 merge, at most 56×56 pixels)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vocab: dict[str, int] = {}
    for word in [*QWEN_SPECIAL_TOKENS, "\n", *EDIT_TEMPLATE_WORDS, *DEFAULT_WORDS]:
        vocab.setdefault(word, len(vocab))
    vocab.update(VISION_TOKENS)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), behavior="removed", invert=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", *VISION_TOKENS], model_max_length=2048,
    )  # fmt: skip
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14,
                                               temporal_patch_size=2, merge_size=2)
    return _ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_qwenimage_edit_pipeline(*, seed: int = 0, plus: bool = False) -> QwenImageEditPipeline:
    """Call with a source ``image``, ``height=32, width=32`` and a short prompt; true CFG as Qwen-Image (a negative
    prompt and ``true_cfg_scale``). One prompt per stock call: a stock batch of several prompts tiles the sources
    in the wrong order when it asks for several images per prompt. `plus`: `QwenImageEditPlusPipeline` (several
    sources per prompt, ``image=[a, b]``)."""
    base = tiny_qwenimage_pipeline(seed=seed)
    with _seeded(seed + 1):
        vae = AutoencoderKLQwenImage(
            base_dim=8, z_dim=4, dim_mult=[1, 1, 2, 2], num_res_blocks=1, temperal_downsample=[False, False, False],
            latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.8, 1.2, 1.5, 0.9],
        )  # fmt: skip
    processor = tiny_qwen_edit_processor()
    pipeline_class = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = pipeline_class(scheduler=base.scheduler, vae=vae, text_encoder=base.text_encoder,
                          tokenizer=processor.tokenizer, processor=processor, transformer=base.transformer)
    return _finish(pipe)


def tiny_qwenimage_edit_plus_pipeline(*, seed: int = 0) -> QwenImageEditPlusPipeline:
    """The tiny Qwen-Image-Edit-Plus pipeline (2509/2511): `tiny_qwenimage_edit_pipeline(plus=True)`."""
    return tiny_qwenimage_edit_pipeline(seed=seed, plus=True)
