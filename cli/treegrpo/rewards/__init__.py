"""Reward adapters: ``build_reward(kind, device=..., dtype=..., **options)`` returns a `RewardBase`, a callable
``(images: list[PIL.Image.Image], prompts: list[str]) -> float32 [N]``. See ``docs/rewards.md``.

Importing this package imports no model library; models load at a reward's first call (or its ``.load()``).
"""

from __future__ import annotations

from treegrpo.rewards.base import RewardBase, to_pil
from treegrpo.rewards.multi import MultiReward, RewardScores
from treegrpo.rewards.registry import REWARD_KINDS, build_reward, reward_options

__all__ = ["REWARD_KINDS", "RewardBase", "MultiReward", "RewardScores", "build_reward", "reward_options", "to_pil"]
