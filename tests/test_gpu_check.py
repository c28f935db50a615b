"""benchmarks/gpu_check.py at its smallest setting, so the GPU check cannot rot between GPU sessions: the real
trainer path for tree and flat, the table, and the exported LoRA reloaded in a stock pipeline."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_end_to_end_at_its_smallest_setting(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--size", "tiny", "--out",
                           str(tmp_path), "--epochs", "1", "--parts", "tree,flat,tail,offload"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| s / iteration |" in proc.stdout and "tree vs flat per iteration" in proc.stdout
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    tree, flat = results["tree"], results["flat"]
    # k=3, w=3: 13 parents per tree, both CFG halves, one prompt
    assert tree["model/trained_parents"] == 13 and tree["model/train_rows"] == 26
    assert flat["model/rollout_rows"] == 2 * (1 + 27 * 9)  # flat: the shared root, then 27 trajectories
    for result in (tree, flat):
        assert result["policy/first_ratio_error"] < 1e-5  # fp32 here; on a GPU it shows the bf16 value
        assert result["lora_adapter_loaded"]
        # the LoRA changes the output measurably, and the stock pipeline reproduces the trained model
        assert result["lora_effect"] > 1e-4
        assert result["lora_reload_max_rel_error"] < 1e-3 * result["lora_effect"] + 1e-6
    # the micro-batch sweep trains the same 13 parents at each size; the throughput check counts rows exactly
    assert [row["micro_batch_size"] for row in tree["micro_batch_sweep"]] == [1, 13]
    assert all(row["train_rows"] == 26 and not row["oom"] for row in tree["micro_batch_sweep"])
    # the tail part: rows of the tree with a 2-step ODE tail; the offload part trains like the tree
    from diffusers_tree import unique_rows

    tail, steps = results["tail"], results["tail"]["model/rollout_rows"]
    assert steps == 2 * unique_rows(10, 3, 3, tail["tree/window_start"], tail_steps=2)
    assert "tree with a 2-step tail vs flat per iteration" in proc.stdout
    # the offload part is the tree run with its text encoders parked between encodes: the same training step
    offload = results["offload"]
    assert "tree, text encoders offloaded" in proc.stdout
    assert offload["model/rollout_rows"] == tree["model/rollout_rows"]
    assert abs(offload["train/grad_norm"] - tree["train/grad_norm"]) <= 1e-5 * tree["train/grad_norm"]
    speed = flat["throughput"]
    assert speed["ours_rows"] == 2 * (1 + 27 * 9) and speed["stock_rows"] == 2 * 27 * 10
    assert "denoiser rows/s at 54 rows per forward" in proc.stdout
