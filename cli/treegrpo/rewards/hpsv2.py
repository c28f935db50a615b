"""HPS v2 / v2.1 (Wu et al., 2023): an open_clip ViT-H/14 fine-tuned on human preference pairs.

The checkpoint (``xswu/HPSv2``, ``HPS_v2.1_compressed.pt`` or ``HPS_v2_compressed.pt``) is an open_clip state dict
under ``"state_dict"``; it is renamed key by key into a transformers `CLIPModel` at load time (no open_clip, no
torchvision). score = cos(text embedding, image embedding), no logit scale; ≈ 0.2–0.4 on typical generations.

Preprocessing follows HPSv2's validation transform: scale the longest side to the model's image size (bicubic), pad
centred on black to a square, OpenAI CLIP mean/std. Text: the ViT-H/14 BPE tokenizer, 77 tokens.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image

from treegrpo.rewards.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    RewardBase,
    check_batch,
    check_batch_size,
    clip_cosine,
    empty_init,
    load_checkpoint,
    load_strict,
    resolve_dtype,
    resolve_file,
)

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.1": "HPS_v2.1_compressed.pt", "v2.0": "HPS_v2_compressed.pt"}
HPS_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# Older open_clip versions saved the text tower's causal mask as a buffer; transformers builds its own.
IGNORED_KEYS = frozenset({"attn_mask"})
_BLOCK_RENAMES = {  # open_clip residual block → transformers CLIPEncoderLayer (weight and bias each)
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}  # fmt: skip


def vit_h14_config():
    """transformers `CLIPConfig` of open_clip's ViT-H-14 (embed 1024; vision 32×1280, 16 heads, patch 14, 224 px;
    text 24×1024, 16 heads, 77 tokens; exact GELU; layer-norm eps 1e-5)."""
    from transformers import CLIPConfig

    text = dict(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=1024,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=1024,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024)


def _key_plan(config) -> list[tuple[str, str, str]]:
    """(open_clip key, transformers key, how) for every tensor; how is "copy", "transpose" or "q"/"k"/"v" (a third
    of a fused in-projection)."""
    plan = [
        ("token_embedding.weight", "text_model.embeddings.token_embedding.weight", "copy"),
        ("positional_embedding", "text_model.embeddings.position_embedding.weight", "copy"),
        ("ln_final.weight", "text_model.final_layer_norm.weight", "copy"),
        ("ln_final.bias", "text_model.final_layer_norm.bias", "copy"),
        ("text_projection", "text_projection.weight", "transpose"),  # open_clip: x @ P; nn.Linear: x @ W.T
        ("logit_scale", "logit_scale", "copy"),
        ("visual.class_embedding", "vision_model.embeddings.class_embedding", "copy"),
        ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", "copy"),
        ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", "copy"),
        ("visual.proj", "visual_projection.weight", "transpose"),
    ]
    for which in ("weight", "bias"):
        plan += [
            (f"visual.ln_pre.{which}", f"vision_model.pre_layrnorm.{which}", "copy"),
            (f"visual.ln_post.{which}", f"vision_model.post_layernorm.{which}", "copy"),
        ]
    towers = (
        ("transformer", "text_model.encoder", config.text_config.num_hidden_layers),
        ("visual.transformer", "vision_model.encoder", config.vision_config.num_hidden_layers),
    )
    for source, target, num_layers in towers:
        for i in range(num_layers):
            src, dst = f"{source}.resblocks.{i}", f"{target}.layers.{i}"
            for which in ("weight", "bias"):
                plan += [(f"{src}.{a}.{which}", f"{dst}.{b}.{which}", "copy") for a, b in _BLOCK_RENAMES.items()]
                plan += [(f"{src}.attn.in_proj_{which}", f"{dst}.self_attn.{p}_proj.{which}", p) for p in "qkv"]
    return plan


def open_clip_to_transformers(state_dict: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Rename an open_clip ViT `CLIP` state dict to transformers `CLIPModel` keys.

    Raises:
        ValueError: naming every missing key and every unexpected one (``IGNORED_KEYS`` aside).
    """
    if state_dict and all(key.startswith("module.") for key in state_dict):  # saved from DistributedDataParallel
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    plan = _key_plan(config)
    expected = {source for source, _, _ in plan}
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected - IGNORED_KEYS)
    if missing or unexpected:
        raise ValueError(
            "the HPS checkpoint does not match an open_clip ViT CLIP with "
            f"{config.text_config.num_hidden_layers} text and {config.vision_config.num_hidden_layers} vision layers: "
            f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}."
        )
    converted = {}
    for source, target, how in plan:
        tensor = state_dict[source]
        if how == "transpose":
            tensor = tensor.t()
        elif how in ("q", "k", "v"):
            tensor = tensor.chunk(3, dim=0)["qkv".index(how)]  # nn.MultiheadAttention packs [q; k; v]
        converted[target] = tensor.contiguous()
    return converted


def hps_pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    """HPSv2's validation transform: longest side to ``size`` (bicubic), centred on a black square, OpenAI
    mean/std. Returns float32 ``[B, 3, size, size]``."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        width, height = image.size
        if width != size or height != size:
            scale = size / max(width, height)
            new_width, new_height = round(width * scale), round(height * scale)
            canvas = Image.new("RGB", (size, size))
            canvas.paste(
                image.resize((new_width, new_height), Image.BICUBIC),
                ((size - new_width) // 2, (size - new_height) // 2),
            )
            image = canvas
        arrays.append(np.asarray(image))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255  # [B, 3, S, S]
    mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None], torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    return (pixels - mean) / std


class HPSv2Reward(RewardBase):
    """Human Preference Score v2.1 (or v2.0) as a reward.

    Args:
        version (`str`, *optional*, defaults to `"v2.1"`): `"v2.1"` or `"v2.0"`; picks the checkpoint file.
        pretrained (`str`, *optional*, defaults to `"xswu/HPSv2"`): hub id or local folder holding the checkpoint
            file, or the path of the `.pt` file itself.
        processor (`str`, *optional*, defaults to `"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"`): hub id or folder of
            the tokenizer (open_clip's ViT-H-14 BPE vocabulary).
        clip_config (`str` or `dict`, *optional*): the architecture as a transformers `CLIPConfig` (hub id, folder
            or dict); defaults to open_clip's ViT-H-14, which both HPS checkpoints use.
        batch_size (`int`, *optional*, defaults to 32): images per forward pass.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where the model runs.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): model weights' dtype.

    Example:
        ```py
        >>> from treegrpo.rewards import build_reward
        >>> reward = build_reward("hpsv2", device="cuda", dtype="bfloat16")
        >>> scores = reward(images, prompts)  # float32 [N], ≈ 0.2–0.4
        ```
    """

    name = "hpsv2"

    def __init__(
        self,
        *,
        version: str = "v2.1",
        pretrained: str = HPS_REPO,
        processor: str = HPS_TOKENIZER,
        clip_config: str | dict | None = None,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
    ):
        if version not in HPS_FILES:
            raise ValueError(f"hpsv2 version must be one of {sorted(HPS_FILES)}; got {version!r}.")
        self.version, self.pretrained, self.processor = version, str(pretrained), str(processor)
        self.clip_config = clip_config
        self.batch_size = check_batch_size(batch_size)
        self.device, self.dtype = torch.device(device), resolve_dtype(dtype)
        self._model = None

    def _config(self):
        from transformers import CLIPConfig

        if self.clip_config is None:
            return vit_h14_config()
        if isinstance(self.clip_config, dict):
            return CLIPConfig(**self.clip_config)
        return CLIPConfig.from_pretrained(str(self.clip_config))

    def modules(self) -> list[torch.nn.Module]:
        """The loaded models (none before the first load)."""
        return [m for m in (self._model,) if m is not None]

    def load(self) -> HPSv2Reward:
        """Load the tokenizer and convert the checkpoint into a `CLIPModel` (once)."""
        if self._model is None:
            from transformers import AutoTokenizer, CLIPModel

            self._tokenizer = AutoTokenizer.from_pretrained(self.processor)
            config = self._config()
            path = resolve_file(self.pretrained, HPS_FILES[self.version])
            checkpoint = load_checkpoint(path)
            state_dict = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint
            with empty_init():
                model = CLIPModel(config)
            load_strict(model, open_clip_to_transformers(state_dict, config), f"the HPS checkpoint {path!r}")
            self._model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        return self

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts, self.name)
        self.load()
        size = int(self._model.config.vision_config.image_size)
        cos = clip_cosine(
            self._model,
            self._tokenizer,
            images,
            prompts,
            batch_size=self.batch_size,
            device=self.device,
            to_pixels=lambda part: hps_pixels(part, size).to(device=self.device, dtype=self.dtype),
        )  # [N]
        return cos.float().cpu()
