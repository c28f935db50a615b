"""Seconds per training iteration (one epoch: rollout, scoring, training), methods interleaved round-robin in one
process, on the digits model and on the 9M-parameter CPU SD3 of `benchmarks/rollout.py`.

Methods (overrides of one base recipe per model, `recipes/digits_paper.toml` for digits; see `METHODS`):
- tree: TreeGRPO k 3, w 3, Eq. 7 window, exact ODE tail.
- tree-tail2 / tree-tail3: the same with the ODE tail after the window integrated by DPM-Solver++(2M) in at most
  2 / 3 steps (`sampling.tail_steps`).
- tree-9-3-tail3: (9, 3) children at a 2-step window and a 3-step tail (the defaults of `recipes/digits.toml`).
- flat-dancegrpo: DanceGRPO (27 trajectories from one noise, `dance_sde` η 0.3 at every step, int(0.6·(T−1)) = 5
  random steps of 0..8 trained per trajectory).
- mix-fast: Flow-GRPO-Fast-like (25 trajectories split at an Eq. 7 window start, 2 SDE steps trained).

Each method is set up once through the trainer (`treegrpo.run.setup.setup`), warmed up for one epoch, then the
methods
take turns epoch by epoch, so background load hits them alike. Prints medians [min–max] of `time/epoch_s`, its
rollout and training parts, the rows, and the speedup over flat-dancegrpo.

    python benchmarks/iteration.py                        # digits 8 epochs, sd3-large 3 (~10 min on 2 cores)
    python benchmarks/iteration.py --models digits --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
METHODS: dict[str, list[str]] = {
    "tree": [],
    "tree-tail3": ["sampling.tail_steps=3"],
    "tree-tail2": ["sampling.tail_steps=2"],
    "tree-9-3-tail3": ["tree.branch_factor=[9, 3]", "tree.window_width=2", "sampling.tail_steps=3"],
    "flat-dancegrpo": ['tree.algorithm="flat"', 'sampling.sde_type="dance_sde"', "sampling.eta=0.3",
                       "tree.timestep_fraction=0.6"],
    "mix-fast": ['tree.algorithm="mix"', "tree.branch_factor=5", "tree.window_width=2"],
}
BASELINE = "flat-dancegrpo"

LARGE_RECIPE = """
[model]
pretrained = "{model}"
[model.lora]
rank = 16
alpha = 32
[sampling]
num_inference_steps = 10
guidance_scale = 4.5
height = 64
width = 64
max_sequence_length = 16
max_batch_size = 128
[tree]
branch_factor = 3
window_width = 3
timestep_fraction = 0.6
[[reward]]
kind = "jpeg"
[data]
prompts = "{prompts}"
prompts_per_epoch = 1
[train]
epochs = 1000
learning_rate = 1e-4
micro_batch_size = 32
[output]
dir = "{out}"
log_with = "none"
samples = false
checkpoint_every = 100000
eval_every = 100000
"""


def recipe_for(model: str, tmp: Path) -> Path:
    if model == "digits":
        return ROOT / "recipes" / "digits_paper.toml"
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from rollout import large_sd3_pipeline

    folder = tmp / "sd3-large"
    large_sd3_pipeline().save_pretrained(folder)
    (tmp / "prompts.txt").write_text("a photo of a red cat\na blue dog on grass\na bowl of fruit\na city at night\n")
    path = tmp / "large.toml"
    path.write_text(LARGE_RECIPE.format(model=folder, prompts=tmp / "prompts.txt", out=tmp / "run"))
    return path


def bench(model: str, methods: list[str], epochs: int, threads: int) -> list[str]:
    from treegrpo.recipe.loading import load_recipe
    from treegrpo.run.reporting import Reporter
    from treegrpo.run.setup import setup
    from treegrpo.train.trainer import run_epoch

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        path = recipe_for(model, Path(tmp))
        runs = {}
        for method in methods:
            overrides = METHODS[method] + [f"output.dir={json.dumps(str(Path(tmp) / method))}",
                                           "output.samples=false", f"train.cpu_threads={threads}"]
            runs[method] = setup(load_recipe(path, overrides), Reporter(enabled=False))
            run_epoch(runs[method], 0)  # warm-up
        logs = {m: [] for m in methods}
        for epoch in range(1, epochs + 1):
            for method in methods:
                logs[method].append(run_epoch(runs[method], epoch))
    base = statistics.median(m["time/epoch_s"] for m in logs[BASELINE]) if BASELINE in logs else None
    for method in methods:
        def cell(key, log=logs[method]):
            values = [m[key] for m in log]
            return f"{statistics.median(values):.2f} [{min(values):.2f}–{max(values):.2f}]"

        median = statistics.median(m["time/epoch_s"] for m in logs[method])
        rows = statistics.mean(m["model/rollout_rows"] for m in logs[method])
        train_rows = statistics.mean(m["model/train_rows"] for m in logs[method])
        speedup = f"{base / median:.2f}×" if base else ""
        lines.append(f"| {model} | {method} | {cell('time/epoch_s')} | {cell('time/rollout_s')} | "
                     f"{cell('time/train_s')} | {rows:.0f} | {train_rows:.0f} | {speedup} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits", "sd3-large"], choices=["digits", "sd3-large"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", type=int, default=8, help="timed epochs per method (after one warm-up)")
    parser.add_argument("--large-epochs", type=int, default=3, help="the same for sd3-large")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    print(f"{args.epochs} timed epochs per method after one warm-up, interleaved; torch {torch.__version__}, "
          f"{args.threads} threads; 1-min load average at start {os.getloadavg()[0]:.1f}")
    print(f"| model | method | s / epoch | rollout s | train s | rollout rows | train rows | speedup vs {BASELINE} |")
    print("|" + "---|" * 8)
    for model in args.models:
        epochs = args.large_epochs if model == "sd3-large" else args.epochs
        for line in bench(model, args.methods, epochs, args.threads):
            print(line, flush=True)


if __name__ == "__main__":
    main()
