"""Tree advantage math: the window-start distribution (Eq. 7), leaf advantages (Eq. 9), and the backup of leaf
advantages to every branching edge (Eqs. 10–11).

Notation: `num_steps` = T, `window_width` = w, `window_ratio` = r, `window_start` = s. A tree is given as flat
node arrays: `parent[i]` is node i's parent index (-1 for a root) and `log_prob[i]` the stored log-prob of the edge
into node i (NaN for an ODE edge or a root). Advantages live on edges; `A[i]` is the advantage of the edge into i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Weighting = Literal["prob", "mean"]
WINDOW_POLICIES: tuple[str, ...] = ("geometric", "fixed", "shifting")


# ---- Eq. 7: where the SDE window starts -----------------------------------------------------------------------------
def window_probs(num_steps: int, width: int, ratio: float) -> torch.Tensor:
    """Truncated geometric distribution of the window start (Eq. 7), float64 `[T - w]`.

    Pr[s = i] = (1 - r)·r^i / (1 - r^(T-w)),  i = 0 … T-w-1, so the window never covers the last step.
    `ratio = 1` is the uniform limit.
    """
    num_starts = num_steps - width
    if num_starts < 1:
        raise ValueError(
            f"A window of width {width} in {num_steps} steps cannot avoid the last step; "
            "need window_width < num_steps."
        )
    if not 0 < ratio <= 1:
        raise ValueError(f"window_ratio must be in (0, 1], got {ratio}.")
    if ratio == 1:
        return torch.full((num_starts,), 1.0 / num_starts, dtype=torch.float64)
    i = torch.arange(num_starts, dtype=torch.float64)
    return (1 - ratio) * ratio**i / (1 - ratio**num_starts)


def sample_window_start(
    num_steps: int, width: int, ratio: float, generator: torch.Generator | None = None
) -> int:
    """Draw one window start from Eq. 7 (with `generator`, or torch's global RNG)."""
    probs = window_probs(num_steps, width, ratio)
    return int(torch.multinomial(probs, 1, generator=generator).item())


@dataclass(frozen=True)
class WindowPolicy:
    """Where the SDE window sits in each training epoch; identical on every process for the same `seed`.

    Args:
        num_steps (`int`): T.
        width (`int`): w.
        kind (`str`, *optional*, defaults to `"geometric"`): `"geometric"` (Eq. 7, drawn per epoch), `"fixed"`
            (always `start`), or `"shifting"` (`start + shift_step·(epoch // shift_every)`, wrapping around).
        ratio (`float`, *optional*, defaults to 0.5): r of Eq. 7.
        start (`int`, *optional*, defaults to 0): the fixed start, or the first start of a shifting window.
        shift_step (`int`, *optional*, defaults to 1): steps the shifting window advances.
        shift_every (`int`, *optional*, defaults to 1): epochs between advances.

    Example:
        ```py
        >>> from diffusers_tree.advantages import WindowPolicy
        >>> [WindowPolicy(10, 3, kind="shifting", shift_every=2).start_for_epoch(e, seed=0) for e in range(6)]
        [0, 0, 1, 1, 2, 2]
        ```
    """

    num_steps: int
    width: int
    kind: str = "geometric"
    ratio: float = 0.5
    start: int = 0
    shift_step: int = 1
    shift_every: int = 1

    def __post_init__(self):
        if self.kind not in WINDOW_POLICIES:
            raise ValueError(f"Unknown window policy {self.kind!r}; choose one of {WINDOW_POLICIES}.")
        num_starts = self.num_steps - self.width
        if num_starts < 1:
            raise ValueError(f"window_width={self.width} must be < num_steps={self.num_steps}.")
        if not 0 <= self.start < num_starts:
            raise ValueError(f"window start {self.start} out of range 0 … {num_starts - 1}.")
        if self.shift_every < 1:
            raise ValueError(f"shift_every must be >= 1, got {self.shift_every}.")

    def start_for_epoch(self, epoch: int, seed: int) -> int:
        """The window start of `epoch`; a pure function of (epoch, seed), so all ranks agree."""
        if self.kind == "fixed":
            return self.start
        if self.kind == "shifting":
            return (self.start + self.shift_step * (epoch // self.shift_every)) % (self.num_steps - self.width)
        generator = torch.Generator().manual_seed(_mix_seed(seed, epoch))
        return sample_window_start(self.num_steps, self.width, self.ratio, generator)


def _mix_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 12345) % (2**63 - 1)


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
