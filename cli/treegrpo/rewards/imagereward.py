"""ImageReward (Xu et al., 2023): BLIP (ViT-L/16 + BERT-base with cross-attention) and an MLP head, trained on
human rankings of text-to-image generations.

The checkpoint (``THUDM/ImageReward``: ``ImageReward.pt`` + ``med_config.json``) is re-implemented with transformers'
`BlipVisionModel` and `BlipTextModel` (``is_decoder=True`` in the config so that the cross-attention layers exist,
called bidirectionally, as BLIP's BertModel is in ImageReward):

    score = (mlp(text_encoder([CLS] prompt [SEP], cross-attending to vit(image))[CLS]) − 0.16717362830052426)
            / 1.0333394966054072

so scores are ≈ N(0, 1) over the ImageReward training distribution. Text: BERT uncased, padded to 35 tokens.
Images: shortest side to 224 (bicubic), centre crop, OpenAI CLIP mean/std.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import torch
from PIL import Image

from treegrpo.rewards.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    RewardBase,
    ScoreMLP,
    check_batch,
    check_batch_size,
    chunks,
    empty_init,
    load_checkpoint,
    load_strict,
    resolve_dtype,
    resolve_file,
)

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
IMAGEREWARD_TOKENIZER = "google-bert/bert-base-uncased"
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
MAX_TEXT_LENGTH = 35
# Tensors the original model holds but never uses for the score: BLIP's contrastive projections, and the BERT
# position-id buffer older transformers saved with the weights.
IGNORED_KEYS = frozenset(
    {
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
        "blip.text_encoder.embeddings.position_ids",
    }
)
_VISION_RENAMES = {  # BLIP ViT block → transformers BlipEncoderLayer (weight and bias each)
    "norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}  # fmt: skip


def blip_large_vision_config() -> dict:
    """BLIP's ViT-L/16 at 224 px (layer-norm eps 1e-6, exact GELU), as `BlipVisionConfig` keyword arguments."""
    return dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=16,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )


def text_config_from_med(med: Mapping, encoder_hidden_size: int):
    """`BlipTextConfig` from BLIP's ``med_config.json`` (a BertConfig); cross-attention reads the ViT's width."""
    from transformers import BlipTextConfig

    if not med.get("add_cross_attention", False):
        raise ValueError(
            "med_config.json must set add_cross_attention: ImageReward's text encoder cross-attends to the image."
        )
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "layer_norm_eps",
        "pad_token_id",
    )
    return BlipTextConfig(
        **{key: med[key] for key in keys if key in med},
        encoder_hidden_size=encoder_hidden_size,
        is_decoder=True,
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
    )


def _vision_key(key: str) -> str | None:
    """transformers `BlipVisionModel` key of a BLIP ``visual_encoder`` key (without prefix), or None."""
    fixed = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
        "norm.weight": "post_layernorm.weight",
        "norm.bias": "post_layernorm.bias",
    }
    if key in fixed:
        return fixed[key]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
    if match and match.group(2) in _VISION_RENAMES:
        return f"encoder.layers.{match.group(1)}.{_VISION_RENAMES[match.group(2)]}.{match.group(3)}"
    return None


def split_imagereward_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Split an ImageReward checkpoint into (`BlipVisionModel`, `BlipTextModel`, `ScoreMLP`) state dicts.

    Raises:
        ValueError: naming every key outside the three parts (``IGNORED_KEYS`` aside). Missing keys surface when
            each part is loaded strictly.
    """
    vision, text, mlp, unexpected = {}, {}, {}, []
    for key, tensor in state_dict.items():
        if key in IGNORED_KEYS:
            continue
        if key.startswith("blip.visual_encoder.") and _vision_key(key.removeprefix("blip.visual_encoder.")):
            vision[_vision_key(key.removeprefix("blip.visual_encoder."))] = tensor
        elif key.startswith("blip.text_encoder."):
            text[key.removeprefix("blip.text_encoder.")] = tensor
        elif key.startswith("mlp."):
            mlp[key.removeprefix("mlp.")] = tensor
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(
            f"unexpected keys in the ImageReward checkpoint: {sorted(unexpected)[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}."
        )
    return vision, text, mlp


class ImageRewardReward(RewardBase):
    """ImageReward as a reward.

    Args:
        pretrained (`str`, *optional*, defaults to `"THUDM/ImageReward"`): hub id or local folder holding
            `ImageReward.pt` and `med_config.json`.
        processor (`str`, *optional*, defaults to `"google-bert/bert-base-uncased"`): hub id or folder of the
            tokenizer.
        vision_config (`str` or `dict`, *optional*): the ViT as a transformers `BlipVisionConfig` (hub id, folder
            or dict); defaults to BLIP's ViT-L/16 at 224 px, which the released checkpoint uses.
        batch_size (`int`, *optional*, defaults to 32): images per forward pass.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where the model runs.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): dtype of the BLIP weights (the MLP head runs
            in float32).

    Example:
        ```py
        >>> from treegrpo.rewards import build_reward
        >>> reward = build_reward("imagereward", device="cuda")
        >>> scores = reward(images, prompts)  # float32 [N], ≈ N(0, 1)
        ```
    """

    name = "imagereward"

    def __init__(
        self,
        *,
        pretrained: str = IMAGEREWARD_REPO,
        processor: str = IMAGEREWARD_TOKENIZER,
        vision_config: str | dict | None = None,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
    ):
        self.pretrained, self.processor, self.vision_config = str(pretrained), str(processor), vision_config
        self.batch_size = check_batch_size(batch_size)
        self.device, self.dtype = torch.device(device), resolve_dtype(dtype)
        self._vision = None

    def _vision_config(self):
        from transformers import BlipVisionConfig

        if self.vision_config is None:
            return BlipVisionConfig(**blip_large_vision_config())
        if isinstance(self.vision_config, dict):
            return BlipVisionConfig(**self.vision_config)
        return BlipVisionConfig.from_pretrained(str(self.vision_config))

    def modules(self) -> list[torch.nn.Module]:
        """The loaded models (none before the first load)."""
        return [] if self._vision is None else [self._vision, self._text, self._mlp]

    def load(self) -> ImageRewardReward:
        """Load the tokenizer and build the BLIP towers and head from the checkpoint (once)."""
        if self._vision is None:
            from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel

            self._tokenizer = AutoTokenizer.from_pretrained(self.processor)
            vision_config = self._vision_config()
            with open(resolve_file(self.pretrained, MED_CONFIG_FILE)) as file:
                text_config = text_config_from_med(json.load(file), vision_config.hidden_size)
            path = resolve_file(self.pretrained, IMAGEREWARD_FILE)
            vision_sd, text_sd, mlp_sd = split_imagereward_state_dict(load_checkpoint(path))
            with empty_init():
                vision, text = BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False)
            mlp = ScoreMLP(text_config.hidden_size)
            load_strict(vision, vision_sd, f"the ImageReward vision tower from {path!r}")
            load_strict(text, text_sd, f"the ImageReward text encoder from {path!r}")
            load_strict(mlp, mlp_sd, f"the ImageReward MLP head from {path!r}")
            self._text = text.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
            self._mlp = mlp.to(device=self.device).eval().requires_grad_(False)
            self._image_processor = _center_crop_processor(vision_config.image_size)
            self._vision = vision.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        return self

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        n = check_batch(images, prompts, self.name)
        self.load()
        scores = torch.empty(n, device=self.device)
        for part in chunks(n, self.batch_size):
            pixels = self._image_processor(
                images=[image.convert("RGB") for image in images[part]], return_tensors="pt"
            )["pixel_values"]
            image_embeds = self._vision(pixel_values=pixels.to(device=self.device, dtype=self.dtype)).last_hidden_state
            tokens = self._tokenizer(
                prompts[part], padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
            )
            hidden = self._text(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
                encoder_hidden_states=image_embeds,
            ).last_hidden_state  # [B, 35, 768]
            scores[part] = self._mlp(hidden[:, 0].float()).squeeze(-1)
        return ((scores - REWARD_MEAN) / REWARD_STD).float().cpu()


def _center_crop_processor(size: int):
    """CLIP-style preprocessing on PIL: shortest side to ``size`` (bicubic), centre crop, OpenAI mean/std."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4: the slow processor is the PIL one
        from transformers import CLIPImageProcessor as Processor
    return Processor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
