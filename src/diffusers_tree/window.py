"""Where the SDE window sits (Eq. 7): the truncated geometric distribution of the window start and the per-epoch
window policies (geometric draw, fixed start, shifting window).

Notation: `num_steps` = T, `window_width` = w, `window_ratio` = r, `window_start` = s; step indices run up from
noise (s = 0 is the first step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
        >>> from diffusers_tree.window import WindowPolicy
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
