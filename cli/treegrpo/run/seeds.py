"""Every seed of a run derives from the recipe's `train.seed` and integers naming what it seeds (epoch, prompt
position, tree, a named stream), so a resumed run repeats exactly and a tree's noise does not depend on which
process samples it. The stream numbers are part of every recorded run's randomness: they never change."""

from __future__ import annotations

from enum import IntEnum

import torch


class Stream(IntEnum):
    """What a per-tree or per-process seed draws."""

    ROLLOUT = 0  # per tree: the root noise, then one branch noise per SDE step
    EDGE_SELECTION = 1  # per tree: which edges a flat/mix run trains (`tree.timestep_fraction`)
    EVALUATION = 2  # per evaluation image: its noise, the same at every evaluation of the run
    TRAINING = 7  # per process and epoch: the training micro-batch order


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    value = 0x5EED
    for part in parts:
        value = (value * 6364136223846793005 + int(part) + 1442695040888963407) % (2**63 - 1)
    return value


def seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed` (the draws are moved to the compute device, so every device agrees)."""
    return torch.Generator().manual_seed(seed)


def tree_generators(seed: int, epoch: int, positions: list[int], num_trees: int, stream: Stream = Stream.ROLLOUT
                    ) -> list[torch.Generator]:
    """One generator per tree, slot-major, seeded by (seed, epoch, run-wide slot position, tree, stream): the same
    whichever process samples the slot, different for every slot (even when two slots hold the same prompt)."""
    return [seeded(derive_seed(seed, epoch, p, t, stream)) for p in positions for t in range(num_trees)]


def training_generator(seed: int, epoch: int, process_index: int) -> torch.Generator:
    """The training micro-batch order of one process in one epoch (the + 1 is how every recorded run drew it)."""
    return seeded(derive_seed(seed, epoch, process_index, Stream.TRAINING) + 1)


def prompt_order_generator(seed: int, pass_index: int) -> torch.Generator:
    """The prompt permutation of one pass over the prompt list."""
    return seeded(derive_seed(seed, pass_index))


def lora_init_seed(seed: int, init_seed: int) -> int:
    """The LoRA initialisation's seed (`model.lora.init_seed` varies it without changing the run's other draws)."""
    return derive_seed(seed, init_seed)


def evaluation_generators(seed: int, items: list[tuple[int, int]]) -> list[torch.Generator]:
    """One generator per (prompt, image) evaluation item: the same noise at every evaluation of a run."""
    return [seeded(derive_seed(seed, Stream.EVALUATION, p, j)) for p, j in items]


def sample_generators(seed: int, prompt_index: int, first_image: int, count: int) -> list[torch.Generator]:
    """`sample`/`eval`: image j of prompt p draws from (seed, p, j), so one seed gives paired base and LoRA samples."""
    return [seeded(derive_seed(seed, prompt_index, first_image + j)) for j in range(count)]
