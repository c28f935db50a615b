"""The GRPO objective on tree edges (Eq. 12) and the optional KL to the reference policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossOutput:
    """Loss of one micro-batch of edges and its diagnostics (floats are detached)."""

    loss: torch.Tensor  # scalar, with grad
    ratio_mean: float
    ratio_max_error: float  # max |ratio - 1|
    ratio_drift: float  # mean |ratio - 1|: how far the policy has moved from the sampling one on these edges
    clip_frac: float
    approx_kl: float  # mean of ½ (logp_new - logp_old)², a cheap KL estimate between old and new policy
    kl: float  # the reference KL term (0 when off)
    log_prob_finite: bool = True  # whether every re-scored log-prob was finite (set by the caller that re-scores)


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantage: torch.Tensor,
    *,
    clip_range: float,
    adv_clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-edge PPO-clip loss (Eq. 12): max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε)) with A clipped to ±adv_clip.

    Returns `(loss [E], ratio [E])`."""
    advantage = advantage.clamp(-adv_clip, adv_clip)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantage * ratio
    clipped = -advantage * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


def gaussian_mean_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between N(mean, s²) and N(ref_mean, s²) per edge, averaged over elements: mean_d (μθ - μref)² / (2 s²)."""
    std = torch.broadcast_to(std, mean.shape)
    return ((mean - ref_mean) ** 2 / (2 * std**2)).flatten(1).mean(1)


def grpo_edge_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantage: torch.Tensor,
    *,
    clip_range: float,
    adv_clip: float,
    normalizer: int,
    kl: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> LossOutput:
    """Sum of per-edge losses divided by `normalizer` (the edge count of the whole update, so accumulating
    micro-batches gives the mean over the update), plus `kl_beta · KL` the same way."""
    per_edge, ratio = ppo_clip_loss(log_prob, old_log_prob, advantage, clip_range=clip_range, adv_clip=adv_clip)
    total = per_edge.sum()
    kl_value = 0.0
    if kl is not None and kl_beta > 0:
        total = total + kl_beta * kl.sum()
        kl_value = float(kl.detach().mean())
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_range).float().mean()
        log_ratio = log_prob - old_log_prob
    return LossOutput(
        loss=total / normalizer,
        ratio_mean=float(ratio.detach().mean()),
        ratio_max_error=float((ratio.detach() - 1).abs().max()),
        ratio_drift=float((ratio.detach() - 1).abs().mean()),
        clip_frac=float(clipped),
        approx_kl=float(0.5 * (log_ratio.detach() ** 2).mean()),
        kl=kl_value,
    )
