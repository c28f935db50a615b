"""benchmarks/baselines.py at its smallest setting, so the fair-baselines benchmark cannot rot: the peers' presets
train what the docs say they train, and the time-to-accuracy arithmetic is right."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("baselines", ROOT / "benchmarks" / "baselines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reached_and_worst_after_smooth_over_three_evaluations():
    baselines = _script()
    # (epoch, wall s, judge, reward classifier)
    evals = [(0, 0, 0.5, 0.5), (2, 1, 0.85, 0), (4, 2, 0.95, 0), (6, 3, 0.95, 0), (8, 4, 0.7, 0), (10, 5, 0.9, 0)]
    assert baselines.reached(evals, 0.9) == (6, 3)  # (0.85 + 0.95 + 0.95) / 3 = 0.917; at epoch 4 it is 0.767
    assert baselines.reached(evals, 0.99) is None
    # means of 3 from epoch 6 on: 0.917, 0.867, 0.85
    assert abs(baselines.worst_after(evals, 0.9) - 0.85) < 1e-9


def test_presets_train_what_their_authors_train(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "baselines.py"), "--seeds", "0", "--epochs", "2",
                           "--eval-every", "1", "--samples-per-digit", "2", "--methods", "tree", "flat-flowgrpo",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tree |" in proc.stdout and "| flat-flowgrpo |" in proc.stdout
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    runs = {json.loads(line)["method"]: json.loads(line) for line in lines}
    # 10 prompts an epoch. Flow-GRPO: 27 trajectories of 10 steps each, steps 0..8 trained (one parent each, no CFG)
    flow = runs["flat-flowgrpo"]["epochs"][0]
    assert flow["model/rollout_rows"] == 10 * 27 * 10 and flow["model/train_rows"] == 10 * 27 * 9
    # TreeGRPO k = 3, w = 3: 13 parents a prompt
    assert runs["tree"]["epochs"][0]["model/train_rows"] == 10 * 13
    assert len(runs["tree"]["evals"]) == 3  # before training and after each epoch
