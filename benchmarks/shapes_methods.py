"""TreeGRPO against the baselines on the shapes task (builtin:shapes, GenEval's six categories), judged on the
held-out test prompts by GenEval's binary verdict with the reward's detector AND with the learned judge no run trains
on (`geneval` with `detector = "shapes_judge"`).

    python benchmarks/shapes_methods.py                                     # 5 seeds × 5 methods, 2 jobs
    python benchmarks/shapes_methods.py --seeds 0 --methods tree flat-dancegrpo --epochs 30   # a quick look

Every run is `treegrpo run recipes/shapes.toml` (one CPU thread) with only the method's overrides (`METHODS`), the
seed, and a second evaluation reward: the judge. The trainer's own evaluation (ODE samples of the stock pipeline on
the 42 test prompts, the same noise for every method and evaluation) gives the curves. Wall clock is the sum of the
epochs' `time/epoch_s` (evaluations not counted). Methods are interleaved within each seed; `--jobs` run side by
side. Prints a markdown table and writes every run's curve to `<out>/runs.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# overrides of recipes/shapes.toml (the tree: (9, 3) children over a 2-step window, 27 leaves, a 3-step ODE tail)
METHODS: dict[str, list[str]] = {
    "tree": [],
    "tree-paper": ["tree.branch_factor=3", "tree.window_width=3"],
    "mix-fast": ['tree.algorithm="mix"', "tree.branch_factor=5", "tree.window_width=2"],
    "flat-dancegrpo": ['tree.algorithm="flat"', "tree.branch_factor=3", "tree.window_width=3",
                       'sampling.sde_type="dance_sde"', "sampling.eta=0.3", "tree.timestep_fraction=0.6"],
    "flat-flowgrpo": ['tree.algorithm="flat"', "tree.branch_factor=1", "tree.window_width=1", "tree.num_trees=27",
                      "tree.timestep_fraction=1.0"],
}
JUDGE = '[{kind="geneval", score="binary", name="geneval"}, {kind="geneval", detector="shapes_judge", ' \
        'score="binary", name="judge"}]'


def run_one(method: str, seed: int, epochs: int, every: int, out: Path) -> dict:
    folder = out / f"{method}-s{seed}"
    overrides = [*METHODS[method], f"train.seed={seed}", f"train.epochs={epochs}", "train.cpu_threads=1",
                 f"evaluation.every={every}", f"eval_reward={JUDGE}", f"output.dir={json.dumps(str(folder))}",
                 "output.samples=false", "output.checkpoint_every=1000"]
    command = [sys.executable, "-m", "treegrpo", "run", str(ROOT / "recipes" / "shapes.toml"), "--overwrite"]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    clock, seconds = [], 0.0
    for row in metrics:
        seconds += row["time/epoch_s"]
        clock.append(seconds)
    evals = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]
    curve = [{"epoch": e["epoch"], "seconds": clock[e["epoch"] - 1] if e["epoch"] else 0.0,
              "reward_detector": e["eval/geneval/mean"], "judge": e["eval/judge/mean"]} for e in evals]
    return {"method": method, "seed": seed, "curve": curve}


def first_reaching(curve: list[dict], key: str, target: float) -> dict | None:
    return next((point for point in curve if point[key] >= target), None)


def summarize(runs: list[dict], methods: list[str], targets: tuple[float, ...]) -> str:
    lines = ["| method | " + " | ".join(f"CPU s to judge {t}" for t in targets)
             + " | final judge | final reward-detector | best judge |", "|---" * (4 + len(targets)) + "|"]
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        cells = []
        for target in targets:
            hits = [first_reaching(r["curve"], "judge", target) for r in mine]
            times = sorted(h["seconds"] for h in hits if h)
            reached = f"{len(times)}/{len(mine)}"
            cells.append(f"{statistics.median(times):.0f} ({reached})" if times else f"— ({reached})")
        final = [r["curve"][-1] for r in mine]
        cells.append(f"{statistics.median(p['judge'] for p in final):.3f}")
        cells.append(f"{statistics.median(p['reward_detector'] for p in final):.3f}")
        cells.append(f"{statistics.median(max(p['judge'] for p in r['curve']) for r in mine):.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--targets", nargs="+", type=float, default=[0.6, 0.8])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="shapes_methods_"))
    out.mkdir(parents=True, exist_ok=True)
    order = [(m, s) for s in args.seeds for m in args.methods]  # methods interleaved within each seed
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda job: run_one(job[0], job[1], args.epochs, args.eval_every, out), order))
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    print(f"{len(args.seeds)} seeds, {args.epochs} epochs, judged every {args.eval_every} on the 42 test prompts "
          f"× 4 ODE samples (GenEval binary; 'judge' = the learned judge, 'reward-detector' = the reward's own)")
    print(summarize(runs, args.methods, tuple(args.targets)))
    print(f"curves: {out / 'runs.jsonl'}")


if __name__ == "__main__":
    main()
