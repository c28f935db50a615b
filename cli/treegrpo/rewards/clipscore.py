"""CLIPScore (Hessel et al., 2021) as a reward: text-image cosine similarity of a CLIP model.

score = scale · cos(text embedding, image embedding), then max(score, 0) when ``clamp`` is set.

Conventions (all on `openai/clip-vit-large-patch14`, whose exp(logit_scale) is 100):
- ``scale=1.0`` (default): the raw cosine, ≈ 0.2–0.4 on typical generations (the TreeGRPO paper's ~0.37).
- ``scale=100 / 30``: Flow-GRPO's reward (``logits_per_image.diagonal() / 30``, no clamp).
- ``scale=100.0, clamp=True``: torchmetrics' ``CLIPScore`` (per image, before averaging).
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from treegrpo.rewards.base import (
    RewardBase,
    check_batch,
    check_batch_size,
    clip_cosine,
    load_clip_parts,
    pixel_values,
    resolve_dtype,
)

CLIPSCORE_MODEL = "openai/clip-vit-large-patch14"


class CLIPScoreReward(RewardBase):
    """CLIP text-image cosine similarity as a reward.

    Args:
        pretrained (`str`, *optional*, defaults to `"openai/clip-vit-large-patch14"`): hub id or local folder of
            the transformers `CLIPModel`.
        processor (`str`, *optional*): hub id or folder of the tokenizer and image processor; defaults to
            `pretrained`.
        scale (`float`, *optional*, defaults to 1.0): multiplies the cosine (100/30 for Flow-GRPO, 100 for
            torchmetrics).
        clamp (`bool`, *optional*, defaults to `False`): clip negative scores to 0 (torchmetrics does).
        batch_size (`int`, *optional*, defaults to 32): images per forward pass.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where the model runs.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): model weights' dtype.

    Example:
        ```py
        >>> from treegrpo.rewards import build_reward
        >>> reward = build_reward("clipscore", device="cuda", scale=100 / 30)  # Flow-GRPO's convention
        >>> scores = reward(images, prompts)  # float32 [N]
        ```
    """

    name = "clipscore"

    def __init__(
        self,
        *,
        pretrained: str = CLIPSCORE_MODEL,
        processor: str | None = None,
        scale: float = 1.0,
        clamp: bool = False,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
    ):
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"clipscore scale must be a positive number; got {scale!r}.")
        if not isinstance(clamp, bool):
            raise ValueError(f"clipscore clamp must be true or false; got {clamp!r}.")
        self.pretrained = str(pretrained)
        self.processor = self.pretrained if processor is None else str(processor)
        self.scale, self.clamp = float(scale), clamp
        self.batch_size = check_batch_size(batch_size)
        self.device, self.dtype = torch.device(device), resolve_dtype(dtype)
        self._model = None

    def modules(self) -> list[torch.nn.Module]:
        """The loaded models (none before the first load)."""
        return [m for m in (self._model,) if m is not None]

    def load(self) -> CLIPScoreReward:
        """Load the tokenizer, image processor and model (once)."""
        if self._model is None:
            self._tokenizer, self._image_processor, model = load_clip_parts(self.pretrained, self.processor)
            self._model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        return self

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts, self.name)
        self.load()
        cos = clip_cosine(
            self._model,
            self._tokenizer,
            images,
            prompts,
            batch_size=self.batch_size,
            device=self.device,
            to_pixels=lambda part: pixel_values(self._image_processor, part, self.device, self.dtype),
        )  # [N]
        score = self.scale * cos
        if self.clamp:
            score = score.clamp(min=0)
        return score.float().cpu()
