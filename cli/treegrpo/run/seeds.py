"""Every seed of a run derives from the recipe's `train.seed` and integers naming what it seeds (epoch, prompt
position, tree, a stream number), so a resumed run repeats exactly and a tree's noise does not depend on which
process samples it."""

from __future__ import annotations


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    value = 0x5EED
    for part in parts:
        value = (value * 6364136223846793005 + int(part) + 1442695040888963407) % (2**63 - 1)
    return value
