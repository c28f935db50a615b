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
    "tree-nokl": ["train.kl_beta=0"],
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
    return read_run(folder, method, seed)


def read_run(folder: Path, method: str, seed: int) -> dict:
    """One run's curve from its run folder: judged points with the training CPU seconds before each."""
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    clock, seconds = [], 0.0
    for row in metrics:
        seconds += row["time/epoch_s"]
        clock.append(seconds)
    evals = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]
    curve = [{"epoch": e["epoch"], "seconds": clock[e["epoch"] - 1] if e["epoch"] else 0.0,
              "reward_detector": e["eval/geneval/mean"], "judge": e["eval/judge/mean"],
              # GenEval's overall (the mean over its six categories), logged by runs since 2026-12-07
              "judge_overall": e.get("eval/judge/tag_mean"),
              "judge_by_tag": {k.rsplit("/", 1)[1]: v for k, v in e.items() if k.startswith("eval/judge/tag/")}}
             for e in evals]
    return {"method": method, "seed": seed, "curve": curve,
            "epoch_s": statistics.median(row["time/epoch_s"] for row in metrics)}


def finished(folder: Path, epochs: int) -> bool:
    evals = folder / "eval.jsonl"
    return evals.exists() and any(json.loads(line)["epoch"] == epochs for line in evals.read_text().splitlines())


def first_reaching(curve: list[dict], key: str, target: float) -> dict | None:
    return next((point for point in curve if point[key] >= target), None)


def worst_after(curve: list[dict], key: str, target: float, window: int = 3) -> float | None:
    """The worst mean of `window` consecutive evaluations from the first reaching `target` on: is the level held?"""
    first = next((i for i, point in enumerate(curve) if point[key] >= target), None)
    if first is None or len(curve) - first < window:
        return None
    return min(statistics.mean(p[key] for p in curve[i:i + window]) for i in range(first, len(curve) - window + 1))


def summarize(runs: list[dict], methods: list[str], targets: tuple[float, ...], key: str = "judge") -> str:
    """Medians over seeds; "—" where no seed got there; "(n/N)" how many seeds did. `key`: "judge" (the judge's
    mean over images) or "judge_overall" (GenEval's overall: the mean over categories)."""
    lines = ["| method | s / epoch | " + " | ".join(f"CPU s (epochs) to {key} {t}" for t in targets)
             + f" | worst 3-eval mean after {targets[0]} | final {key} | final reward-detector | best {key} |",
             "|---" * (6 + len(targets)) + "|"]
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        cells = [f"{statistics.median(r['epoch_s'] for r in mine):.1f}"]
        for target in targets:
            hits = [h for h in (first_reaching(r["curve"], key, target) for r in mine) if h]
            reached = f"{len(hits)}/{len(mine)}"
            cells.append(f"{statistics.median(h['seconds'] for h in hits):.0f} "
                         f"({statistics.median(h['epoch'] for h in hits):.0f}) {reached}" if hits else f"— {reached}")
        held = [w for w in (worst_after(r["curve"], key, targets[0]) for r in mine) if w is not None]
        cells.append(f"{statistics.median(held):.3f} ({len(held)})" if held else "—")
        final = [r["curve"][-1] for r in mine]
        cells.append(f"{statistics.median(p[key] for p in final):.3f}")
        cells.append(f"{statistics.median(p['reward_detector'] for p in final):.3f}")
        cells.append(f"{statistics.median(max(p[key] for p in r['curve']) for r in mine):.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "tree-nokl"],
                        choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--targets", nargs="+", type=float, default=[0.6, 0.8])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--metric", default="judge", choices=["judge", "judge_overall"],
                        help="judge: the judge's mean over images; judge_overall: GenEval's overall (category mean)")
    parser.add_argument("--summarize", action="store_true", help="only tabulate the finished runs already in --out "
                        "(a campaign cut short: runs without their last evaluation are left out)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="shapes_methods_"))
    out.mkdir(parents=True, exist_ok=True)
    order = [(m, s) for s in args.seeds for m in args.methods]  # methods interleaved within each seed
    if args.summarize:
        runs = [read_run(out / f"{m}-s{s}", m, s) for m, s in order if finished(out / f"{m}-s{s}", args.epochs)]
        if args.metric == "judge_overall":  # runs from before the category means were logged cannot say
            runs = [r for r in runs if all(p["judge_overall"] is not None for p in r["curve"])]
        args.seeds = sorted({r["seed"] for r in runs})
        args.methods = [m for m in args.methods if any(r["method"] == m for r in runs)]
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(lambda job: run_one(job[0], job[1], args.epochs, args.eval_every, out), order))
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    print(f"{len(args.seeds)} seeds, {args.epochs} epochs, judged every {args.eval_every} on the 42 test prompts "
          f"× 4 ODE samples (GenEval binary; 'judge' = the learned judge, 'reward-detector' = the reward's own)")
    print(summarize(runs, args.methods, tuple(args.targets), args.metric))
    print(f"curves: {out / 'runs.jsonl'}")


if __name__ == "__main__":
    main()
