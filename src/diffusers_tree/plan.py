"""The branching plan: per denoising step, how many children each frontier node gets and whether the step is SDE.

Step indices run up from noise as in the paper: step i takes the frontier from level i to level i+1; level 0 is
the root (one shared noise per tree), level T holds the leaves. Children of node j at level i are the nodes
`j·b_i … j·b_i + b_i - 1` at level i+1, so the leaves of node j at level i are a contiguous block of
`num_leaves / frontier_sizes[i]` leaves: the ancestor of leaf l at level i is `l // (num_leaves / frontier_sizes[i])`.

Three shapes (SPEC §2.1, §5):
- `tree` (TreeGRPO): ODE everywhere except a window of `window_width` SDE steps starting at `window_start`,
  where every node gets `branch_factor` children. Leaves `k^w`. `branch_factor` may also list one children count
  per window step (`(9, 3, 1)`: a wide first split, then narrower ones; leaves = their product).
- `flat` (DanceGRPO-style): G trajectories from one root noise, SDE at every step; the root splits into G at
  step 0 and each trajectory is a single-child SDE chain after it.
- `mix` (MixGRPO-style): G trajectories, ODE outside a window of SDE steps; identical until the window, so the
  split into G happens at the window's first step.

The ODE tail after the last SDE step (level L to the leaves) carries no log-prob and is never trained; it only has to
land on an image the reward judges fairly. With `tail_steps = n < T - L` it is integrated by a multistep solver
(DPM-Solver++, `TreeSDEScheduler.tail_solver`) over n + 1 levels of the model's own schedule, `tail_levels`, so
the denoiser sees each leaf n times instead of T - L.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

BranchFactor = int | Sequence[int]


def window_factors(branch_factor: BranchFactor, window_width: int | None = None) -> tuple[int, ...]:
    """Children per node at each window step: `(k,) * w` for an int `k`, or the given per-step counts (whose length
    is the window width; `window_width`, if given, must agree)."""
    if isinstance(branch_factor, int) and not isinstance(branch_factor, bool):
        if window_width is None:
            raise ValueError("window_width is needed with a single branch_factor.")
        factors = (branch_factor,) * window_width
    else:
        factors = tuple(int(f) for f in branch_factor)
        if window_width is not None and len(factors) != window_width:
            raise ValueError(f"branch_factor lists {len(factors)} children counts {list(factors)} but window_width "
                             f"is {window_width}; give one count per window step (or leave window_width out).")
    if not factors:
        raise ValueError("branch_factor lists no children counts; give one per window step, e.g. [3, 3, 3].")
    bad = [f for f in factors if f < 1]
    if bad:
        raise ValueError(f"branch_factor {list(factors)} has counts below 1 ({bad}); every window step needs >= 1 "
                         "child.")
    return factors


@dataclass(frozen=True)
class BranchPlan:
    """Immutable branching plan of one tree.

    Args:
        branch_factors (`tuple[int, ...]`): children per frontier node at each step i = 0 … T-1.
        sde_steps (`tuple[bool, ...]`): whether step i is stochastic (its edges carry log-probs and are trained).
        algorithm (`str`): `"tree"`, `"flat"` or `"mix"`; the name of the shape, for logs.
        tail_steps (`int`, *optional*): most denoiser evaluations after the last SDE step (the ODE tail, integrated
            by a multistep solver over `tail_levels`); `None` = one per remaining step, the exact ODE tail.

    Example:
        ```py
        >>> from diffusers_tree.plan import BranchPlan
        >>> plan = BranchPlan.tree(num_steps=10, branch_factor=3, window_width=3, window_start=2)
        >>> plan.num_leaves, plan.trained_parents, plan.rows_per_tree
        (27, 13, 150)
        ```
    """

    branch_factors: tuple[int, ...]
    sde_steps: tuple[bool, ...]
    algorithm: str = "tree"
    tail_steps: int | None = None

    def __post_init__(self):
        if self.tail_steps is not None and self.tail_steps < 1:
            raise ValueError(f"tail_steps must be >= 1 (or None for the exact tail), got {self.tail_steps}.")
        if len(self.branch_factors) != len(self.sde_steps) or not self.branch_factors:
            raise ValueError(
                f"branch_factors ({len(self.branch_factors)} steps) and sde_steps ({len(self.sde_steps)} steps) "
                "must be non-empty and of equal length."
            )
        for i, (factor, sde) in enumerate(zip(self.branch_factors, self.sde_steps, strict=True)):
            if factor < 1:
                raise ValueError(f"branch factor at step {i} is {factor}; it must be >= 1.")
            if factor > 1 and not sde:
                raise ValueError(f"step {i} branches into {factor} but is ODE: deterministic children are identical.")

    # ---- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def tree(cls, num_steps: int, branch_factor: BranchFactor, window_width: int | None, window_start: int
             ) -> BranchPlan:
        """TreeGRPO: `branch_factor` children per node at each of the `window_width` SDE steps from `window_start`
        (or `branch_factor[j]` children at window step j when it is a sequence)."""
        factors = window_factors(branch_factor, window_width)
        window_width = len(factors)
        _check_window(num_steps, window_width, window_start)
        window = range(window_start, window_start + window_width)
        return cls(
            branch_factors=tuple(factors[i - window_start] if i in window else 1 for i in range(num_steps)),
            sde_steps=tuple(i in window for i in range(num_steps)),
            algorithm="tree",
        )

    @classmethod
    def flat(cls, num_steps: int, num_trajectories: int, deterministic_steps: tuple[int, ...] = ()) -> BranchPlan:
        """DanceGRPO-style: `num_trajectories` SDE trajectories from one shared root noise. `deterministic_steps` are
        ODE steps instead (steps where the SDE has no noise, such as `cps`'s last step: no log-prob, not trained)."""
        if num_steps < 1 or num_trajectories < 1:
            raise ValueError(f"num_steps ({num_steps}) and num_trajectories ({num_trajectories}) must be >= 1.")
        return cls(
            branch_factors=(num_trajectories,) + (1,) * (num_steps - 1),
            sde_steps=tuple(i not in deterministic_steps for i in range(num_steps)),
            algorithm="flat",
        )

    @classmethod
    def mix(cls, num_steps: int, num_trajectories: int, window_width: int, window_start: int) -> BranchPlan:
        """MixGRPO-style: `num_trajectories` trajectories, SDE only inside the window, ODE elsewhere."""
        _check_window(num_steps, window_width, window_start)
        window = range(window_start, window_start + window_width)
        return cls(
            branch_factors=tuple(num_trajectories if i == window_start else 1 for i in range(num_steps)),
            sde_steps=tuple(i in window for i in range(num_steps)),
            algorithm="mix",
        )

    # ---- derived counts -----------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.branch_factors)

    @cached_property
    def frontier_sizes(self) -> tuple[int, ...]:
        """Nodes per tree at each level 0 … T (level i is the frontier before step i)."""
        sizes = [1]
        for factor in self.branch_factors:
            sizes.append(sizes[-1] * factor)
        return tuple(sizes)

    @property
    def num_leaves(self) -> int:
        return self.frontier_sizes[-1]

    @property
    def num_nodes(self) -> int:
        """All nodes of one tree, root and leaves included."""
        return sum(self.frontier_sizes)

    @property
    def tail_start(self) -> int:
        """Level L after the last SDE step (0 if there is none), where the ODE tail begins."""
        return max((i + 1 for i, sde in enumerate(self.sde_steps) if sde), default=0)

    @cached_property
    def tail_levels(self) -> tuple[int, ...]:
        """Levels the ODE tail visits, L … T: every level for the exact tail, else `tail_steps + 1` of them."""
        return tail_levels(self.tail_start, self.num_steps, self.tail_steps)

    @property
    def tail_compressed(self) -> bool:
        return len(self.tail_levels) - 1 < self.num_steps - self.tail_start

    @property
    def model_steps(self) -> tuple[int, ...]:
        """Steps (levels) at which the denoiser sees the frontier: every step up to L, then the tail's levels."""
        return tuple(range(self.tail_start)) + self.tail_levels[:-1]

    @property
    def rows_per_tree(self) -> int:
        """Denoiser rows to sample one tree (per CFG half): one forward per frontier node at each model step."""
        return sum(self.frontier_sizes[i] for i in self.model_steps)

    @property
    def trained_edges(self) -> int:
        """Edges with a log-prob (children created by SDE steps)."""
        return sum(self.frontier_sizes[i + 1] for i in range(self.num_steps) if self.sde_steps[i])

    @property
    def trained_parents(self) -> int:
        """Parent nodes of trained edges: one training forward each, shared by all its children."""
        return sum(self.frontier_sizes[i] for i in range(self.num_steps) if self.sde_steps[i])

    @property
    def window_start(self) -> int | None:
        """First SDE step, or `None` if there is none."""
        return next((i for i, sde in enumerate(self.sde_steps) if sde), None)

    @property
    def window_width(self) -> int:
        return sum(self.sde_steps)

    def ancestor_of_leaf(self, level: int, leaf: int) -> int:
        """Index (within its tree) of the ancestor at `level` of leaf `leaf`."""
        return leaf // (self.num_leaves // self.frontier_sizes[level])

    def describe(self) -> str:
        """One line per step: `step i: SDE x3 (1 -> 3 nodes)`."""
        lines = []
        for i, (factor, sde) in enumerate(zip(self.branch_factors, self.sde_steps, strict=True)):
            kind = f"SDE x{factor}" if sde else "ODE"
            lines.append(f"step {i}: {kind} ({self.frontier_sizes[i]} -> {self.frontier_sizes[i + 1]} nodes)")
        if self.tail_compressed:
            lines.append(f"tail: steps {self.tail_start} … {self.num_steps - 1} as {len(self.tail_levels) - 1} "
                         f"solver steps over levels {list(self.tail_levels)}")
        return "\n".join(lines)


def tail_levels(start_level: int, num_steps: int, tail_steps: int | None) -> tuple[int, ...]:
    """The levels an ODE tail from `start_level` to `num_steps` visits with at most `tail_steps` solver steps:
    all of them when `tail_steps` is `None` or covers every step, else `tail_steps + 1` levels evenly spaced in
    step index (rounded), both ends included, so the solver keeps the model's own sigma schedule.

    Example:
        ```py
        >>> from diffusers_tree.plan import tail_levels
        >>> tail_levels(5, 10, None), tail_levels(5, 10, 2), tail_levels(2, 10, 3)
        ((5, 6, 7, 8, 9, 10), (5, 8, 10), (2, 5, 7, 10))
        ```
    """
    remaining = num_steps - start_level
    if tail_steps is None or tail_steps >= remaining:
        return tuple(range(start_level, num_steps + 1))
    if tail_steps < 1:
        raise ValueError(f"tail_steps must be >= 1, got {tail_steps}.")
    # j·remaining/tail_steps rounded half up, in integers
    return tuple(start_level + (2 * j * remaining + tail_steps) // (2 * tail_steps) for j in range(tail_steps + 1))


def _check_window(num_steps: int, window_width: int, window_start: int) -> None:
    if not 1 <= window_width <= num_steps:
        raise ValueError(f"window_width must be between 1 and num_steps={num_steps}, got {window_width}.")
    if not 0 <= window_start <= num_steps - window_width:
        raise ValueError(
            f"window_start={window_start} does not fit a window of width {window_width} in {num_steps} steps; "
            f"allowed: 0 … {num_steps - window_width}."
        )


def tree_counts(branch_factor: BranchFactor, window_width: int | None = None) -> dict[str, int]:
    """Closed forms of SPEC §2.1: leaves k^w, trained edges k + … + k^w, trained parents (k^w - 1)/(k - 1).
    With per-step counts k_1 … k_w: leaves Π k_j, edges Σ_d Π_{j<=d} k_j, parents Σ_d Π_{j<d} k_j."""
    factors = window_factors(branch_factor, window_width)
    prefix = [math.prod(factors[:d]) for d in range(len(factors) + 1)]  # nodes per tree at window depth d
    return {"leaves": prefix[-1], "trained_edges": sum(prefix[1:]), "trained_parents": sum(prefix[:-1])}


def unique_rows(num_steps: int, branch_factor: BranchFactor, window_width: int | None, window_start: int,
                tail_steps: int | None = None) -> int:
    """Closed form of rows per tree (per CFG half): s + (k^w - 1)/(k - 1) + k^w·n, with n = T - s - w tail steps
    (the exact tail) or min(tail_steps, T - s - w) with a tail solver."""
    counts = tree_counts(branch_factor, window_width)
    w = len(window_factors(branch_factor, window_width))
    tail = num_steps - window_start - w
    tail = tail if tail_steps is None else min(tail_steps, tail)
    return window_start + counts["trained_parents"] + counts["leaves"] * tail


__all__ = ["BranchFactor", "BranchPlan", "tail_levels", "tree_counts", "unique_rows", "window_factors"]


ALGORITHMS: tuple[str, ...] = ("tree", "flat", "mix")


def build_plan(algorithm: str, num_steps: int, branch_factor: BranchFactor, window_width: int | None,
               window_start: int, *, zero_noise_steps: tuple[int, ...] = (), tail_steps: int | None = None
               ) -> BranchPlan:
    """The plan of one tree for `algorithm`; flat and mix use k^w trajectories (Π k_j for per-step counts), the
    tree's leaf count. `zero_noise_steps` (see `TreeSDEScheduler.zero_noise_steps`) become ODE steps of flat; a
    tree/mix window that covers one is an error. `tail_steps`: see `BranchPlan`."""
    plan = _shape_plan(algorithm, num_steps, branch_factor, window_width, window_start, zero_noise_steps)
    return plan if tail_steps is None else replace(plan, tail_steps=tail_steps)


def _shape_plan(algorithm: str, num_steps: int, branch_factor: BranchFactor, window_width: int | None,
                window_start: int, zero_noise_steps: tuple[int, ...]) -> BranchPlan:
    factors = window_factors(branch_factor, window_width)
    window_width, num_leaves = len(factors), math.prod(factors)
    if algorithm == "flat":
        return BranchPlan.flat(num_steps, num_leaves, deterministic_steps=zero_noise_steps)
    if algorithm not in ("tree", "mix"):
        raise ValueError(f"Unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}.")
    covered = sorted(set(zero_noise_steps) & set(range(window_start, window_start + window_width)))
    if covered:
        raise ValueError(
            f"The SDE window (steps {window_start}…{window_start + window_width - 1} of {num_steps}) covers step(s) "
            f"{covered}, where the step has no noise (cps into sigma = 0, or DDIM into alpha_cumprod = 1), so its "
            f"children would be identical and have no log-probability. Start the window at most at "
            f"{min(covered) - window_width}.")
    if algorithm == "tree":
        return BranchPlan.tree(num_steps, factors, window_width, window_start)
    return BranchPlan.mix(num_steps, num_leaves, window_width, window_start)


def checked_tree_shape(branch_factor: BranchFactor, window_width: int | None) -> tuple[BranchFactor, int]:
    """(k or the per-step children as a list, w): w defaults to 3 for one k, else to the list's length."""
    if window_width is None:
        window_width = 3 if isinstance(branch_factor, int) else len(branch_factor)
    if window_width < 1:
        raise ValueError(f"window_width must be >= 1, got {window_width}.")
    factors = window_factors(branch_factor, window_width)  # checks the counts
    return (branch_factor if isinstance(branch_factor, int) else list(factors)), window_width


def check_tree_settings(algorithm: str, tail_steps: int | None, tail_solver_order: int, window_ratio: float) -> None:
    """The scheduler's settings that the plan and Eq. 7 read, judged once with messages naming the allowed values."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"Unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}.")
    if tail_steps is not None and tail_steps < 1:
        raise ValueError(f"tail_steps must be >= 1 (or None for the exact ODE tail), got {tail_steps}.")
    if tail_solver_order not in (1, 2, 3):
        raise ValueError(f"tail_solver_order must be 1, 2 or 3 (DPM-Solver++ orders), got {tail_solver_order}.")
    if not 0 < window_ratio <= 1:
        raise ValueError(f"window_ratio must be in (0, 1], got {window_ratio}.")
