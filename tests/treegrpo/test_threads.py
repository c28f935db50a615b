"""The CPU thread policy: free cores by default, never more than torch's default nor fewer than 1, split between
local processes; the recipe's `train.cpu_threads` wins, then OMP_NUM_THREADS (torch left alone)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from treegrpo.recipe.loading import load_recipe  # noqa: E402
from treegrpo.run.reporting import Reporter  # noqa: E402
from treegrpo.run.setup import setup  # noqa: E402
from treegrpo.run.threads import choose_cpu_threads  # noqa: E402

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


def test_choice_reuses_the_recorded_count_unless_told_otherwise():
    busy = dict(usable_cores=8, load_average=6.0, default_threads=8)
    resumed = choose_cpu_threads(recipe_threads=None, env={}, recorded=4, **busy)
    assert resumed.threads == 4 and "as this run started" in resumed.reason
    assert choose_cpu_threads(recipe_threads=None, env={}, **busy).threads == 2  # the load alone would give 2
    assert choose_cpu_threads(recipe_threads=3, env={}, recorded=4, **busy).threads == 3


def test_a_resumed_run_keeps_the_thread_count_it_started_with(workdir, tiny_sd3_dir, monkeypatch):
    """The count depends on the load at start, and results on the count (weights differed by 0.018 at 1 vs 2
    threads): a run resumed on a busier machine must compute as the uninterrupted one."""
    import json

    from typer.testing import CliRunner

    import treegrpo.run.threads as threads
    from treegrpo.app import app

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(threads, "busy_cores_now", lambda window_s=0.3: 0.0)  # an idle machine at start
        recipe = write_recipe(workdir, tiny_sd3_dir, epochs=1)
        first = CliRunner().invoke(app, ["run", str(recipe)])
        assert first.exit_code == 0, first.output
        started = json.loads((workdir / "run" / "cpu_threads.json").read_text())["cpu_threads"]
        if started < 2:
            pytest.skip("one usable core: every load gives 1 thread")
        monkeypatch.setattr(threads, "busy_cores_now", lambda window_s=0.3: 64.0)  # fully loaded at resume
        resumed = CliRunner().invoke(app, ["run", str(recipe), "--resume", "--set", "train.epochs=2"])
        assert resumed.exit_code == 0, resumed.output
        assert torch.get_num_threads() == started
        line = next(x for x in resumed.output.splitlines() if x.startswith("CPU:"))
        assert line.startswith(f"CPU: {started} intra-op thread(s)") and "as this run started" in line
        overridden = CliRunner().invoke(app, ["run", str(recipe), "--resume", "--set", "train.epochs=3",
                                              "--set", "train.cpu_threads=1"])
        assert overridden.exit_code == 0, overridden.output
        assert "will not match an uninterrupted run" in overridden.output
    finally:
        torch.set_num_threads(before)
