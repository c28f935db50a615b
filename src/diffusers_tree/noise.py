"""The branch-noise convention shared by the scheduler's fixed-batch mode and the rollout pipeline: equal generators
give equal trees whichever way they are computed (docs/algorithm.md, section 5)."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor


def draw_branch_noise(
    num_trees: int,
    num_children: int,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device | str,
) -> torch.Tensor:
    """The noise convention shared by the scheduler and the rollout pipeline: one float32 draw per SDE step of
    shape `[num_trees * num_children, *shape]`, tree-major, children in node order. Equal generators give equal
    trees whichever way they are computed. A list of `num_trees` generators draws each tree's children from its own
    generator (so a tree does not depend on which other trees share its batch, e.g. across processes)."""
    if isinstance(generator, list):
        if len(generator) != num_trees:
            raise ValueError(f"Got {len(generator)} generators for {num_trees} trees; pass one per tree.")
        return torch.cat([randn_tensor((num_children, *shape), generator=g, device=torch.device(device),
                                       dtype=torch.float32) for g in generator])
    return randn_tensor((num_trees * num_children, *shape), generator=generator, device=torch.device(device),
                        dtype=torch.float32)
