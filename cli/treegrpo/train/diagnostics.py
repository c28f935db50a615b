"""Per-epoch signs of collapse and of a dead learning signal, as pure functions of one process's leaves: the
trainer sums them over processes (`epoch_outputs.epoch_metrics`)."""

from __future__ import annotations

import torch

from treegrpo.rewards.diversity import mean_distance_to_others


def no_signal_groups(total_reward: torch.Tensor, group: torch.Tensor, eps: float) -> tuple[int, int]:
    """(groups whose leaves' combined reward has a spread (std, ddof 0) below `eps`, groups): Eq. 9 divides by
    std + eps, so such a prompt's leaves get advantages ≈ 0 and teach nothing this epoch."""
    ids = group.unique()
    flat = sum(int(total_reward[group == g].double().std(unbiased=False) < eps) for g in ids)
    return flat, int(ids.numel())


def leaf_diversity(images: torch.Tensor, group: torch.Tensor) -> tuple[float, int]:
    """(sum over groups of the mean pairwise RMS pixel distance between the group's leaves, groups with two or more
    leaves). Images in [0, 1], `[L, ...]`; the distance of two images is ‖a − b‖ / √pixels, so 0 means identical
    leaves and ≈ 0.41 two independent uniform images. A falling value while the reward rises is mode collapse."""
    flat = images.detach().flatten(1).float()  # on the images' device: at 1024² a tree's leaves are ~0.3 GB
    group = group.to(flat.device)
    total, counted = 0.0, 0
    for g in group.unique():
        members = flat[group == g]
        if members.shape[0] < 2:
            continue
        total += float(mean_distance_to_others(members).mean())  # the mean over ordered pairs i ≠ j
        counted += 1
    return total, counted
