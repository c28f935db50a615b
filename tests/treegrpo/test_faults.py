"""Fault injection: hard kills (mid-checkpoint, mid-training), SIGTERM, a damaged newest checkpoint and a partial
metrics line; each run resumed with `--resume` ends with the uninterrupted run's LoRA and metrics."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import write_recipe

RUNNER = Path(__file__).with_name("fault_runner.py")


def _run(recipe: Path, out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TREEGRPO_FAULT=fault or "none:0")
    env.pop("RANK", None)
    return subprocess.run([sys.executable, str(RUNNER), "run", str(recipe), "--set",
                           f"output.dir={json.dumps(str(out))}", *extra],
                          env=env, capture_output=True, text=True, timeout=300, cwd=recipe.parent)


def _final(out: Path) -> dict:
    return load_file(out / "final" / "pytorch_lora_weights.safetensors")


def _rewards(out: Path) -> list[float]:
    return [json.loads(line)["reward/mean"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_sd3_dir):
    folder = tmp_path_factory.mktemp("faults")
    (folder / "prompts.txt").write_text("a red cat\na blue dog\na green tree\na white house\n")
    from .conftest import REWARD_MODULE

    (folder / "test_rewards.py").write_text(REWARD_MODULE)
    recipe = write_recipe(folder, tiny_sd3_dir, epochs=4)
    done = _run(recipe, folder / "reference")
    assert done.returncode == 0, done.stderr[-3000:]
    return recipe, _final(folder / "reference"), _rewards(folder / "reference")


def _assert_same_as_reference(out: Path, reference) -> None:
    _, weights, rewards = reference
    resumed = _final(out)
    assert resumed.keys() == weights.keys()
    for key in weights:
        torch.testing.assert_close(resumed[key], weights[key], rtol=0, atol=1e-7)
    assert _rewards(out) == pytest.approx(rewards, abs=1e-6)


@pytest.mark.parametrize("fault, code, newest", [
    ("kill-mid-checkpoint:2", -signal.SIGKILL, 1),   # epoch-000002 never published: resume from 1
    ("kill-in-training:3", -signal.SIGKILL, 2),      # killed in epoch 3's update: resume from 2
    ("sigterm-in-scoring:3", 143, 2),                # SIGTERM in epoch 3: checkpoint of the 2 completed epochs
])
def test_resume_after_a_fault_equals_the_uninterrupted_run(reference, tmp_path, fault, code, newest):
    recipe = reference[0]
    out = tmp_path / "run"
    broken = _run(recipe, out, fault=fault)
    assert broken.returncode == code, broken.stderr[-3000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    assert names[-1] == f"epoch-{newest:06d}"
    if code == 143:
        assert "SIGTERM: checkpoint of 2 completed epochs" in broken.stderr and "Traceback" not in broken.stderr
    resumed = _run(recipe, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())
    _assert_same_as_reference(out, reference)


def test_damaged_newest_checkpoint_and_partial_metrics_line_fall_back(reference, tmp_path):
    recipe = reference[0]
    out = tmp_path / "run"
    assert _run(recipe, out, fault="kill-in-training:4").returncode == -signal.SIGKILL  # checkpoints 1, 2, 3
    model = out / "checkpoints" / "epoch-000003" / "accelerate" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])  # truncated
    (out / "checkpoints" / "epoch-000009-backup").mkdir()  # a user's copy: not ours, ignored
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"epoch": 3, "reward/me')  # a partial last line (killed mid-write)
    resumed = _run(recipe, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch-000003 is damaged" in resumed.stderr and "dropping damaged line" in resumed.stderr
    _assert_same_as_reference(out, reference)


def test_no_intact_checkpoint_is_one_line(reference, tmp_path):
    recipe = reference[0]
    out = tmp_path / "run"
    assert _run(recipe, out, fault="kill-in-training:2").returncode == -signal.SIGKILL  # checkpoint 1 only
    (out / "checkpoints" / "epoch-000001" / "trainer_state.json").write_text('{"epoch": 99}')
    resumed = _run(recipe, out, "--resume")
    assert resumed.returncode == 2
    assert "no intact checkpoint" in resumed.stderr and "Traceback" not in resumed.stderr
