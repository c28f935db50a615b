"""JPEG compressibility (DDPO, Black et al., 2023): score = −(JPEG size in kB), kB = 1000 bytes.

Images that compress well (smooth, few details) score higher. The prompt is ignored. No model, so ``device`` and
``dtype`` are accepted for a uniform signature and unused.
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from treegrpo.rewards.base import RewardBase, check_batch


class JpegCompressibilityReward(RewardBase):
    """Negative JPEG-encoded size in kB, as in DDPO's ``jpeg_compressibility``.

    Args:
        quality (`int`, *optional*, defaults to 95): JPEG quality, 1–95 (DDPO uses 95).
        device, dtype: unused (no model).

    Example:
        ```py
        >>> from PIL import Image
        >>> from treegrpo.rewards import build_reward
        >>> reward = build_reward("jpeg")
        >>> flat, noisy = Image.new("RGB", (64, 64), (128, 128, 128)), Image.effect_noise((64, 64), 64).convert("RGB")
        >>> bool(reward([flat], [""]) > reward([noisy], [""]))
        True
        ```
    """

    name = "jpeg"

    def __init__(
        self, *, quality: int = 95, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
    ):
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
            raise ValueError(f"jpeg quality must be an integer in 1..95; got {quality!r}.")
        self.quality = quality

    def load(self) -> JpegCompressibilityReward:
        """Nothing to load; here for a uniform interface."""
        return self

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts, self.name)
        sizes = []
        for image in images:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000)
        return -torch.tensor(sizes, dtype=torch.float32)
