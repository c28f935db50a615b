"""Several rewards at once: each scores every image, each is normalized within its group (a prompt's leaves), and
the normalized advantages are summed with weights (the TreeGRPO paper's HPS 0.8 / CLIP 0.2):

    A = Σ_j w_j · (S_j − mean_c(S_j)) / (std_c(S_j) + eps)      (``mode="advantage"``, the default)

``mode="reward"`` sums the raw scores first and normalizes once. The math is `diffusers_tree.advantages.
aggregate_rewards`; this module adds names, weights and metrics (``reward/<name>/mean``, ``reward/<name>/std``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from treegrpo.rewards.base import RewardBase
from treegrpo.rewards.registry import build_reward

AGGREGATION_MODES = ("advantage", "reward")


@dataclass(frozen=True)
class RewardScores:
    """The scores of one batch under every reward.

    Args:
        names (`tuple[str, ...]`): reward names, in order.
        scores (`torch.Tensor`): float32 `[num_rewards, N]`, row j from reward ``names[j]``.
    """

    names: tuple[str, ...]
    scores: torch.Tensor  # [num_rewards, N]

    def __getitem__(self, name: str) -> torch.Tensor:
        """Scores `[N]` of the reward called ``name``."""
        if name not in self.names:
            raise KeyError(f"no reward named {name!r}; have {list(self.names)}.")
        return self.scores[self.names.index(name)]


class MultiReward:
    """Named, weighted rewards.

    Args:
        rewards (`Mapping[str, RewardBase]`): name → reward; the names label metrics (``reward/<name>/mean``).
        weights (`Mapping[str, float]`, *optional*): name → weight; 1.0 for each reward if not given.
        mode (`str`, *optional*, defaults to `"advantage"`): `"advantage"` (normalize each reward per group, then
            weight) or `"reward"` (weight the raw scores, then normalize).
        eps (`float`, *optional*, defaults to 1e-4): added to each group's std.

    Example:
        ```py
        >>> import torch
        >>> from PIL import Image
        >>> from treegrpo.rewards import build_reward
        >>> from treegrpo.rewards.multi import MultiReward
        >>> rewards = MultiReward({"jpeg": build_reward("jpeg"),
        ...                        "brightness": build_reward("python",
        ...                                                   function="treegrpo.rewards.python:mean_brightness")},
        ...                       weights={"jpeg": 0.8, "brightness": 0.2})
        >>> images = [Image.new("RGB", (32, 32), (v, v, v)) for v in (0, 255)]
        >>> scores = rewards.score(images, ["a square"] * 2)
        >>> rewards.metrics(scores)["reward/brightness/mean"]
        0.5
        >>> rewards.advantages(scores, group_ids=torch.tensor([0, 0])).shape
        torch.Size([2])
        ```
    """

    def __init__(
        self,
        rewards: Mapping[str, RewardBase],
        weights: Mapping[str, float] | None = None,
        *,
        mode: str = "advantage",
        eps: float = 1e-4,
    ):
        if not rewards:
            raise ValueError("MultiReward needs at least one reward.")
        if mode not in AGGREGATION_MODES:
            raise ValueError(f"Unknown aggregation mode {mode!r}; choose one of {AGGREGATION_MODES}.")
        weights = {name: 1.0 for name in rewards} if weights is None else dict(weights)
        if set(weights) != set(rewards):
            raise ValueError(f"weights must name exactly the rewards {sorted(rewards)}; got {sorted(weights)}.")
        for name, weight in weights.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
                raise ValueError(f"the weight of reward {name!r} must be a finite number; got {weight!r}.")
        self.rewards = dict(rewards)
        self.names = tuple(self.rewards)
        self.weights = tuple(float(weights[name]) for name in self.names)
        self.mode, self.eps = mode, eps

    @classmethod
    def from_specs(
        cls,
        specs: Mapping[str, Mapping[str, Any]],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        mode: str = "advantage",
        eps: float = 1e-4,
    ) -> MultiReward:
        """Build from ``{name: {"kind": ..., "weight": ..., **options}}`` (weight defaults to 1.0) with
        `build_reward`.

        Example: ``MultiReward.from_specs({"hps": {"kind": "hpsv2", "weight": 0.8},
        "clip": {"kind": "clipscore", "weight": 0.2}}, device="cuda")``.
        """
        rewards, weights = {}, {}
        for name, spec in specs.items():
            options = dict(spec)
            if "kind" not in options:
                raise ValueError(f"reward {name!r} needs a 'kind'.")
            kind, weights[name] = options.pop("kind"), options.pop("weight", 1.0)
            rewards[name] = build_reward(kind, device=device, dtype=dtype, **options)
        return cls(rewards, weights, mode=mode, eps=eps)

    def load(self) -> MultiReward:
        """Load every reward that loads lazily."""
        for reward in self.rewards.values():
            reward.load()
        return self

    def score(self, images: list[Image.Image], prompts: list[str]) -> RewardScores:
        """Every reward's float32 scores of the batch."""
        rows = []
        for name, reward in self.rewards.items():
            scores = torch.as_tensor(reward(images, prompts)).float().cpu()
            if scores.shape != (len(images),):
                raise ValueError(f"reward {name!r} returned shape {tuple(scores.shape)}; expected ({len(images)},).")
            rows.append(scores)
        return RewardScores(self.names, torch.stack(rows))  # [num_rewards, N]

    def advantages(self, scores: RewardScores, group_ids: torch.Tensor) -> torch.Tensor:
        """Leaf advantages float32 `[N]`: per-group normalization and weights as set by ``mode``."""
        from diffusers_tree.advantages import aggregate_rewards  # importing diffusers_tree imports diffusers

        if scores.names != self.names:
            raise ValueError(f"scores are for rewards {list(scores.names)}, not {list(self.names)}.")
        return aggregate_rewards(scores.scores, list(self.weights), group_ids, mode=self.mode, eps=self.eps)

    def metrics(self, scores: RewardScores) -> dict[str, float]:
        """``reward/<name>/mean`` and ``reward/<name>/std`` (population std) of each reward's raw scores."""
        metrics = {}
        for name, row in zip(scores.names, scores.scores, strict=True):
            metrics[f"reward/{name}/mean"] = float(row.mean()) if row.numel() else float("nan")
            metrics[f"reward/{name}/std"] = float(row.std(unbiased=False)) if row.numel() else float("nan")
        return metrics
