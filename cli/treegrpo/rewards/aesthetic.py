"""LAION aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE``), the DDPO aesthetic reward.

score = mlp(e / ‖e‖), e = CLIP ViT-L/14 image embedding (`CLIPVisionModelWithProjection`); the MLP is
768→1024→128→64→16→1 without activations. Scores are on the AVA 1–10 scale, ≈ 4–7 for typical generations. The
prompt is ignored.
"""

from __future__ import annotations

import torch
from PIL import Image

from treegrpo.rewards.base import (
    RewardBase,
    check_batch,
    check_batch_size,
    chunks,
    load_checkpoint,
    load_image_processor,
    load_score_mlp,
    pixel_values,
    quiet_transformers,
    resolve_dtype,
    resolve_file,
    unit,
)

AESTHETIC_REPO = "trl-lib/ddpo-aesthetic-predictor"
AESTHETIC_FILE = "aesthetic-model.pth"
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"


class AestheticReward(RewardBase):
    """The LAION aesthetic score as a reward.

    Args:
        pretrained (`str`, *optional*, defaults to `"trl-lib/ddpo-aesthetic-predictor"`): the MLP head: hub id or
            local folder holding `aesthetic-model.pth`, or the path of a state-dict file (e.g. LAION's original
            `sac+logos+ava1-l14-linearMSE.pth`, same keys).
        clip_pretrained (`str`, *optional*, defaults to `"openai/clip-vit-large-patch14"`): hub id or folder of the
            CLIP model whose vision tower embeds the images.
        processor (`str`, *optional*): hub id or folder of the image processor; defaults to `clip_pretrained`.
        batch_size (`int`, *optional*, defaults to 32): images per forward pass.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where the model runs.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): dtype of the CLIP weights (the MLP head
            runs in float32).

    Example:
        ```py
        >>> from treegrpo.rewards import build_reward
        >>> reward = build_reward("aesthetic", device="cuda")
        >>> scores = reward(images, prompts)  # float32 [N], ≈ 4–7
        ```
    """

    name = "aesthetic"

    def __init__(
        self,
        *,
        pretrained: str = AESTHETIC_REPO,
        clip_pretrained: str = AESTHETIC_CLIP,
        processor: str | None = None,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
    ):
        self.pretrained, self.clip_pretrained = str(pretrained), str(clip_pretrained)
        self.processor = self.clip_pretrained if processor is None else str(processor)
        self.batch_size = check_batch_size(batch_size)
        self.device, self.dtype = torch.device(device), resolve_dtype(dtype)
        self._vision = None

    def modules(self) -> list[torch.nn.Module]:
        """The loaded models (none before the first load)."""
        return [] if self._vision is None else [self._vision, self._mlp]

    def load(self) -> AestheticReward:
        """Load the image processor, the CLIP vision tower and the MLP head (once)."""
        if self._vision is None:
            from transformers import CLIPVisionModelWithProjection

            path = resolve_file(self.pretrained, AESTHETIC_FILE)
            self._mlp = load_score_mlp(load_checkpoint(path), f"the aesthetic head {path!r}").to(self.device)
            self._image_processor = load_image_processor(self.processor)
            with quiet_transformers():  # the text tower's weights are skipped on purpose
                vision = CLIPVisionModelWithProjection.from_pretrained(self.clip_pretrained)
            self._vision = vision.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        return self

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        n = check_batch(images, prompts, self.name)
        self.load()
        scores = torch.empty(n, device=self.device)
        for part in chunks(n, self.batch_size):
            pixels = pixel_values(self._image_processor, images[part], self.device, self.dtype)
            embeds = unit(self._vision(pixel_values=pixels).image_embeds)  # [B, 768], float32
            scores[part] = self._mlp(embeds).squeeze(-1)
        return scores.float().cpu()
