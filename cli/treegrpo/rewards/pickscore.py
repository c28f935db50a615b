"""PickScore (Kirstain et al., 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

score = exp(logit_scale) · cos(text embedding, image embedding)   (raw; PickScore_v1's exp(logit_scale) ≈ 100)
"""

from __future__ import annotations

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

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
SCALES = ("raw", "flow_grpo", "mixgrpo")


class PickScoreReward(RewardBase):
    """PickScore as a reward.

    Args:
        pretrained (`str`, *optional*, defaults to `"yuvalkirstain/PickScore_v1"`): hub id or local folder of the
            transformers `CLIPModel`.
        processor (`str`, *optional*, defaults to `"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"`): hub id or folder of
            the tokenizer and image processor.
        scale (`str`, *optional*, defaults to `"raw"`): `"raw"` (≈ 18–24 on typical images), `"flow_grpo"`
            (raw / 26, Flow-GRPO's reward) or `"mixgrpo"` ((raw − 18) / 8, MixGRPO's reward).
        batch_size (`int`, *optional*, defaults to 32): images per forward pass.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where the model runs.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): model weights' dtype.

    Example:
        ```py
        >>> from treegrpo.rewards import build_reward
        >>> reward = build_reward("pickscore", device="cuda", dtype="bfloat16", scale="flow_grpo")
        >>> scores = reward(images, prompts)  # float32 [N]; the model loads here, at the first call
        ```
    """

    name = "pickscore"

    def __init__(
        self,
        *,
        pretrained: str = PICKSCORE_MODEL,
        processor: str = PICKSCORE_PROCESSOR,
        scale: str = "raw",
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
    ):
        if scale not in SCALES:
            raise ValueError(f"pickscore scale must be one of {SCALES}; got {scale!r}.")
        self.pretrained, self.processor, self.scale = str(pretrained), str(processor), scale
        self.batch_size = check_batch_size(batch_size)
        self.device, self.dtype = torch.device(device), resolve_dtype(dtype)
        self._model = None

    def modules(self) -> list[torch.nn.Module]:
        """The loaded models (none before the first load)."""
        return [m for m in (self._model,) if m is not None]

    def load(self) -> PickScoreReward:
        """Load the tokenizer, image processor and model (once)."""
        if self._model is None:
            self._tokenizer, self._image_processor, model = load_clip_parts(self.pretrained, self.processor)
            # read before casting: exp(logit_scale) ≈ 100 loses ~1 % in bfloat16
            self._logit_scale = float(model.logit_scale.detach().float().exp())
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
        raw = self._logit_scale * cos
        if self.scale == "flow_grpo":
            raw = raw / 26
        elif self.scale == "mixgrpo":
            raw = (raw - 18) / 8
        return raw.float().cpu()
