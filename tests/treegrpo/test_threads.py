"""The CPU thread policy: free cores by default, never more than torch's default nor fewer than 1, split between
local processes; the recipe's `train.cpu_threads` wins, then OMP_NUM_THREADS (torch left alone)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from treegrpo.recipe import load_recipe  # noqa: E402
from treegrpo.reporting import Reporter  # noqa: E402
from treegrpo.threads import choose_cpu_threads  # noqa: E402
from treegrpo.trainer import setup  # noqa: E402

from .conftest import write_recipe  # noqa: E402


@pytest.mark.parametrize("kwargs, threads", [
    (dict(usable_cores=2, load_average=0.1, default_threads=2), 2),     # idle: all physical cores
    (dict(usable_cores=2, load_average=1.2, default_threads=2), 1),     # one core busy elsewhere
    (dict(usable_cores=2, load_average=5.0, default_threads=2), 1),     # overloaded: still 1, never 0
    (dict(usable_cores=16, load_average=0.0, default_threads=8), 8),    # hyperthreads: physical cores at most
    (dict(usable_cores=16, load_average=2.0, default_threads=16, local_processes=2), 7),  # (16 - 2) // 2
])
def test_automatic_choice(kwargs, threads):
    assert choose_cpu_threads(recipe_threads=None, env={}, **kwargs).threads == threads


def test_explicit_settings_win():
    busy = dict(usable_cores=2, load_average=5.0, default_threads=2)
    assert choose_cpu_threads(recipe_threads=2, env={"OMP_NUM_THREADS": "1"}, **busy).threads == 2
    left_alone = choose_cpu_threads(recipe_threads=None, env={"OMP_NUM_THREADS": "3"}, **busy)
    assert left_alone.threads is None and "OMP_NUM_THREADS=3" in left_alone.reason


def test_the_trainer_sets_the_recipe_threads(workdir, tiny_sd3_dir):
    before = torch.get_num_threads()
    try:
        recipe = load_recipe(write_recipe(workdir, tiny_sd3_dir), ["train.cpu_threads=1"])
        setup(recipe, Reporter(enabled=False))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
