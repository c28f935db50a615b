"""Source preservation for editing: how much of the source image an edit leaves as it was.

An edit should change what the instruction asks for and nothing else. This reward scores the rest:
``score = 1 - mean |edited - source|`` over the pixels (RGB in [0, 1]) outside the prompt's edited region, with the
source resized (bicubic) to the edited image's size. A prompt line may give the region as ``"edit_region": [x0, y0,
x1, y1]``, fractions of the width and height; without one, the whole image counts. Alone it rewards returning the
source unchanged; mix it with a reward on the result (``[[reward]]`` weights), the way peers pair an instruction
judge with a consistency term. No model, no download.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from treegrpo.rewards.base import RewardBase, check_batch

REGION_KEY = "edit_region"


def kept_mask(height: int, width: int, region) -> np.ndarray:
    """`[H, W]` bool: True outside the edited region (fractions `[x0, y0, x1, y1]`), everywhere when `region` is
    None. ValueError naming the value for a region that is not four fractions with x0 < x1 and y0 < y1."""
    mask = np.ones((height, width), dtype=bool)
    if region is None:
        return mask
    if not (isinstance(region, (list, tuple)) and len(region) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in region)
            and region[0] < region[2] and region[1] < region[3]):
        raise ValueError(f'"{REGION_KEY}": {region!r} must be [x0, y0, x1, y1], fractions in [0, 1] of the width and '
                         "height with x0 < x1 and y0 < y1")
    x0, y0, x1, y1 = (round(region[0] * width), round(region[1] * height), round(region[2] * width),
                      round(region[3] * height))
    mask[y0:y1, x0:x1] = False
    return mask


class PreservationReward(RewardBase):
    """1 − mean absolute pixel difference to the source image outside the edited region (higher: more kept).

    Example:
        ```py
        >>> from PIL import Image
        >>> from treegrpo.rewards import build_reward
        >>> reward = build_reward("preservation")
        >>> source, edit = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (255, 0, 0))
        >>> edit.paste((0, 0, 255), (0, 0, 4, 8))  # the left half changed
        >>> reward([edit], ["make the left half blue"], source_images=[source])
        tensor([0.6667])
        >>> reward([edit], ["make the left half blue"], metadata=[{"edit_region": [0, 0, 0.5, 1]}],
        ...        source_images=[source])
        tensor([1.])
        ```
    """

    name = "preservation"
    takes_metadata = True
    takes_source_images = True

    def __init__(self, *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32):
        pass  # no model: device and dtype are accepted for a uniform signature

    def __call__(self, images: list[Image.Image], prompts: list[str], metadata: list[dict] | None = None,
                 source_images: list[Image.Image] | None = None) -> torch.Tensor:
        n = check_batch(images, prompts, self.name)
        if source_images is None:
            raise ValueError(f"reward {self.name!r} compares each image with its source image, but the prompts name "
                             'none; give each .jsonl prompt line an "image" (editing models) or use another reward')
        if len(source_images) != n:
            raise ValueError(f"reward {self.name!r} got {len(source_images)} source images for {n} images")
        scores = []
        for index, (image, source) in enumerate(zip(images, source_images, strict=True)):
            edited = np.asarray(image.convert("RGB"), dtype=np.float64) / 255  # [H, W, 3]
            height, width = edited.shape[:2]
            original = np.asarray(source.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.float64) / 255
            region = (metadata[index] if metadata is not None else {}).get(REGION_KEY)
            mask = kept_mask(height, width, region)
            difference = np.abs(edited - original)[mask]
            scores.append(1.0 - float(difference.mean()) if difference.size else 1.0)
        return torch.tensor(scores, dtype=torch.float32)
