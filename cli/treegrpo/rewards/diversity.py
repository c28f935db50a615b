"""A counterweight to mode collapse: each image's mean distance to the other images of its prompt in the same batch.

GRPO pushes every prompt's samples toward whatever its reward likes best; on a narrow reward the policy ends up
drawing one image per prompt (on `builtin:digits` within-prompt diversity fell to 0.55 of the base model's). Added
as a second `[[reward]]` with a small weight, this term gives, within a prompt's group, an advantage to the leaves
that differ most from their siblings. The distance is the one the trainer logs as `tree/leaf_diversity` and the
evaluation as `eval/diversity` (RMS pixel distance: 0 for identical images, ~0.41 for two independent uniform
noise images), so what it rewards is exactly what those curves show.

It is relative to the batch: the trainer scores all of a process's leaves in one call, so a leaf is compared with
the other leaves of its prompt's trees in that epoch (whole trees are always on one process). Scored alone, an
image gets 0. Pixel distance is a crude notion of variety on real photographs (a shifted copy is "diverse"); it
suits small models and is cheap.

Example:

```py
>>> from PIL import Image
>>> from treegrpo.rewards import build_reward
>>> black, white = Image.new("RGB", (8, 8), (0, 0, 0)), Image.new("RGB", (8, 8), (255, 255, 255))
>>> build_reward("diversity")([black, white, black], ["a", "a", "b"]).tolist()
[1.0, 1.0, 0.0]
```
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from treegrpo.rewards.base import RewardBase, check_batch


def mean_distance_to_others(members: torch.Tensor) -> torch.Tensor:
    """Per row of `members` `[n, D]` (n ≥ 2), the mean RMS distance `‖xᵢ − xⱼ‖ / √D` to the other rows, `[n]` on
    their device. The one definition of within-group distance: this reward and the trainer's `leaf_diversity` /
    `eval/diversity` (`treegrpo.train.diagnostics`) both use it."""
    distances = torch.cdist(members, members) / members.shape[1] ** 0.5
    return distances.sum(dim=1) / (members.shape[0] - 1)  # the diagonal is zero


def within_prompt_distance(pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Per image, the mean RMS distance `‖xᵢ − xⱼ‖ / √D` to the other images `j ≠ i` with the same prompt (0 when it
    has none). `pixels` float `[N, D]`; returns float32 `[N]`."""
    pixels = pixels.float()
    out = torch.zeros(len(prompts), dtype=torch.float32)
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        index = torch.tensor(members)
        out[index] = mean_distance_to_others(pixels[index])
    return out


class DiversityReward(RewardBase):
    """Mean RMS pixel distance of each image to the other images of its prompt in the batch.

    Args:
        size (`int`, *optional*, defaults to 64): images larger than `size` × `size` are resized to it (bilinear)
            before measuring, so the cost stays small at 1024²; smaller images are measured as they are.
        device, dtype: unused (no model).
    """

    name = "diversity"

    def __init__(self, *, size: int = 64, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"diversity size must be a positive integer (pixels per side); got {size!r}.")
        self.size = size

    def load(self) -> DiversityReward:
        """Nothing to load; here for a uniform interface."""
        return self

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """The images as float RGB `[N, D]` in [0, 1], at most `size` pixels a side."""
        arrays = []
        for image in images:
            image = image.convert("RGB")
            if max(image.size) > self.size:
                image = image.resize((self.size, self.size), Image.BILINEAR)
            arrays.append(np.asarray(image, dtype=np.float32).reshape(-1) / 255.0)
        if len({a.shape for a in arrays}) > 1:
            raise ValueError("the diversity reward needs images of one size in a batch; got "
                             f"{sorted({im.size for im in images})}.")
        return torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 0)

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts, self.name)
        return within_prompt_distance(self.pixels(images), prompts)
