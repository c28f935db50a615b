"""Tree advantage math: leaf advantages (Eq. 9) and the backup of leaf advantages to every branching edge
(Eqs. 10–11). The window-start distribution (Eq. 7) is in `window.py`.

A tree is given as flat
node arrays: `parent[i]` is node i's parent index (-1 for a root) and `log_prob[i]` the stored log-prob of the edge
into node i (NaN for an ODE edge or a root). Advantages live on edges; `A[i]` is the advantage of the edge into i.
"""

from __future__ import annotations

from typing import Literal

import torch

Weighting = Literal["prob", "mean"]


# ---- Eq. 9: leaf advantages ----------------------------------------------------------------------------------------
def group_normalize(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Eq. 9: A = (S - mean_c) / (std_c + eps) within each group c (a prompt's leaves, pooled over its trees).

    std uses ddof = 0. Returns float32 `[N]` in the input order.
    """
    rewards = rewards.double()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(rewards))
    mean = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, rewards) / count
    centered = rewards - mean[inverse]
    var = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, centered**2) / count
    return (centered / (var.sqrt()[inverse] + eps)).float()


def aggregate_rewards(
    rewards: torch.Tensor,
    weights: list[float] | torch.Tensor,
    group_ids: torch.Tensor,
    *,
    mode: Literal["advantage", "reward"] = "advantage",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Combine several rewards `[R, N]` into one leaf advantage `[N]` (SPEC §2.2).

    `"advantage"`: normalize each reward per group, then A = Σ_j w_j·A_j (the paper's HPS:CLIP 0.8:0.2).
    `"reward"`: S = Σ_j w_j·S_j, then normalize once.
    """
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if rewards.ndim != 2 or rewards.shape[0] != weights.numel():
        raise ValueError(f"rewards must be [num_rewards, N] with one weight per reward; got {tuple(rewards.shape)} "
                         f"and {weights.numel()} weights.")
    if mode == "advantage":
        per_reward = torch.stack([group_normalize(r, group_ids, eps).double() for r in rewards])
        return (weights[:, None] * per_reward).sum(0).float()
    if mode == "reward":
        return group_normalize((weights[:, None] * rewards.double()).sum(0), group_ids, eps)
    raise ValueError(f"Unknown aggregation {mode!r}; choose 'advantage' or 'reward'.")


# ---- Eqs. 10-11: backup to the branching edges ----------------------------------------------------------------------
def node_depths(parent: torch.Tensor) -> torch.Tensor:
    """Depth of every node (roots 0), for nodes given by their parent index."""
    parent = parent.long()
    depth = torch.zeros_like(parent)
    current = parent.clone()
    for _ in range(parent.numel()):
        has_parent = current >= 0
        if not bool(has_parent.any()):
            return depth
        depth += has_parent.long()
        current = torch.where(has_parent, parent[current.clamp(min=0)], current)
    raise ValueError("`parent` contains a cycle.")


def sibling_weights(parent: torch.Tensor, log_prob: torch.Tensor, weighting: Weighting = "prob") -> torch.Tensor:
    """Weight of the edge into each node among its siblings, float64 `[N]` (NaN for roots).

    `"prob"` (Eq. 11): softmax over the siblings' stored log-probs. `"mean"`: 1 / number of siblings.
    Children through ODE edges (NaN log-prob) get the plain average, so a single-child ODE chain has weight 1.
    """
    if weighting not in ("prob", "mean"):
        raise ValueError(f"Unknown weighting {weighting!r}; choose 'prob' or 'mean'.")
    parent = parent.long()
    n = parent.numel()
    has_parent = parent >= 0
    slot = parent.clamp(min=0)
    count = torch.zeros(n, dtype=torch.float64).index_add_(0, slot[has_parent], torch.ones(int(has_parent.sum()),
                                                                                           dtype=torch.float64))
    weights = torch.full((n,), float("nan"), dtype=torch.float64)
    weights[has_parent] = 1.0 / count[slot[has_parent]]
    lp = log_prob.double()
    scored = has_parent & ~torch.isnan(lp)
    if weighting == "prob" and bool(scored.any()):
        idx = scored.nonzero().squeeze(1)
        max_lp = torch.full((n,), -float("inf"), dtype=torch.float64)
        max_lp = max_lp.scatter_reduce(0, slot[idx], lp[idx], reduce="amax")
        expd = torch.exp(lp[idx] - max_lp[slot[idx]])
        total = torch.zeros(n, dtype=torch.float64).index_add_(0, slot[idx], expd)
        weights[idx] = expd / total[slot[idx]]  # Eq. 11: softmax_c(logp_old(c))
    return weights


def backup_advantages(
    parent: torch.Tensor,
    leaf_advantage: torch.Tensor,
    log_prob: torch.Tensor,
    weighting: Weighting = "prob",
    *,
    depth_normalize: bool = False,
    group_ids: torch.Tensor | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Back leaf advantages up the tree (Eqs. 10–11); returns the advantage of the edge into every node.

    Args:
        parent (`torch.Tensor`): `[N]` parent index of each node, -1 for roots.
        leaf_advantage (`torch.Tensor`): `[N]`, read at leaves (nodes without children) only.
        log_prob (`torch.Tensor`): `[N]` stored log-prob of the edge into each node; NaN for ODE edges and roots.
        weighting (`str`, *optional*, defaults to `"prob"`): `"prob"` (Eq. 11 softmax) or `"mean"`.
        depth_normalize (`bool`, *optional*, defaults to `False`): BranchGRPO's variant: after the backup,
            normalize the trained-edge advantages to zero mean and unit std per (group, depth).
        group_ids (`torch.Tensor`, *optional*): `[N]` group (prompt) of each node for `depth_normalize`.
        eps (`float`, *optional*, defaults to 1e-4): added to the std in `depth_normalize`.

    Returns:
        float32 `[N]`: A(v) for every node v whose incoming edge is trained (finite log-prob); NaN elsewhere.
        Nodes after the window pass the leaf advantage up unchanged through their single-child ODE chain (Eq. 10).

    Example:
        ```py
        >>> import torch
        >>> from diffusers_tree.advantages import backup_advantages
        >>> parent = torch.tensor([-1, 0, 0])            # a root with two SDE children (the leaves)
        >>> log_prob = torch.tensor([float("nan"), 0.0, 0.0])
        >>> backup_advantages(parent, torch.tensor([0.0, 1.0, -1.0]), log_prob)
        tensor([nan, 1., -1.])
        ```
    """
    parent = parent.long()
    n = parent.numel()
    if leaf_advantage.numel() != n or log_prob.numel() != n:
        raise ValueError(f"parent, leaf_advantage and log_prob must have the same length; got {n}, "
                         f"{leaf_advantage.numel()}, {log_prob.numel()}.")
    depth = node_depths(parent)
    has_parent = parent >= 0
    is_leaf = torch.ones(n, dtype=torch.bool)
    is_leaf[parent[has_parent]] = False
    weights = sibling_weights(parent, log_prob, weighting)
    value = torch.where(is_leaf, leaf_advantage.double(), torch.zeros(n, dtype=torch.float64))
    if bool(torch.isnan(value[is_leaf]).any()):
        raise ValueError("leaf_advantage is NaN at a leaf.")
    for d in range(int(depth.max()) if n else 0, 0, -1):
        nodes = (depth == d).nonzero().squeeze(1)
        value.index_add_(0, parent[nodes], weights[nodes] * value[nodes])  # Eq. 11 (Eq. 10 for ODE chains)
    trained = has_parent & ~torch.isnan(log_prob.double())
    advantage = torch.where(trained, value, torch.full_like(value, float("nan")))
    if depth_normalize:
        groups = torch.zeros(n, dtype=torch.long) if group_ids is None else group_ids.long()
        key = groups * (int(depth.max()) + 1) + depth
        idx = trained.nonzero().squeeze(1)
        advantage[idx] = group_normalize(advantage[idx], key[idx], eps).double()
    return advantage.float()


def effective_sample_size(parent: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    """1 / Σ w² of the Eq. 11 weights at every parent with trained children, float32 `[num_parents]`.

    Equals the number of children for uniform weights and 1 when one child takes all the weight.
    """
    parent = parent.long()
    weights = sibling_weights(parent, log_prob, "prob")
    trained = (parent >= 0) & ~torch.isnan(log_prob.double())
    parents, slot = torch.unique(parent[trained], return_inverse=True)
    squares = torch.zeros(parents.numel(), dtype=torch.float64).index_add_(0, slot, weights[trained] ** 2)
    return (1.0 / squares).float()
