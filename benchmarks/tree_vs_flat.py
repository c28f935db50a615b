"""Tree vs flat vs mix on the digits task, same seed, prompts and leaves per prompt; and the (k, w) ablation.

    python benchmarks/tree_vs_flat.py                      # 3 algorithms × 3 seeds + the ablation, ~20 min on 2 cores
    python benchmarks/tree_vs_flat.py --seeds 0 --epochs 10 --no-ablation   # a quick look

Prints markdown tables (per-iteration wall clock split into rollout / scoring / training, denoiser rows, final
reward and accuracy, time to reach the flat run's final reward) and writes PNG curves of reward and accuracy
against wall clock. Every run is `treegrpo.train.trainer.train` on `recipes/digits_paper.toml` with
`--set`-style overrides; nothing about the baselines is tuned down: flat trains DanceGRPO's `timestep_fraction` of
every trajectory's steps (the recipe's value, 0.6 by default here) with the same optimizer, rewards and leaves per
prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cli"))
sys.path.insert(0, str(ROOT / "src"))

from treegrpo.recipe.loading import load_recipe  # noqa: E402
from treegrpo.run.metrics import plot_curves  # noqa: E402
from treegrpo.run.reporting import Reporter  # noqa: E402
from treegrpo.train.trainer import train  # noqa: E402


def run_one(recipe_path: Path, overrides: list[str], out_dir: Path) -> list[dict]:
    overrides = overrides + [f"output.dir={json.dumps(str(out_dir))}", "output.samples=false",
                             'output.log_with="none"', "output.checkpoint_every=100000"]
    recipe = load_recipe(recipe_path, overrides)
    train(recipe, reporter=Reporter(enabled=False))
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def ode_accuracy(final_dir: Path, samples_per_digit: int, seed: int) -> float:
    """Prompted-digit accuracy of ODE samples (the stock pipeline's own sampler) of the trained model."""
    from treegrpo.builtin import load_digits_pipeline
    from treegrpo.commands.inference import generate
    from treegrpo.rewards.digits import DigitsReward

    pipe, meta = load_digits_pipeline()
    pipe.load_lora_weights(str(final_dir))
    pipe.set_progress_bar_config(disable=True)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    prompts = [f"a handwritten digit {w}" for w in words]
    kwargs = dict(meta["pipeline_kwargs"])
    images = generate(pipe, prompts, samples_per_digit, kwargs, seed + 1000)
    return DigitsReward().accuracy(images, [p for p in prompts for _ in range(samples_per_digit)])


def summarize(name: str, metrics: list[dict], accuracy: float) -> dict:
    steady = metrics[1:] or metrics  # the first epoch includes one-off warm-up
    clock = [sum(m["time/epoch_s"] for m in metrics[: i + 1]) for i in range(len(metrics))]
    acc_key = next((k for k in metrics[-1] if k.endswith("/accuracy")), None)
    return {
        "name": name,
        "iter_s": statistics.mean(m["time/epoch_s"] for m in steady),
        "rollout_s": statistics.mean(m["time/rollout_s"] for m in steady),
        "score_s": statistics.mean(m["time/score_s"] for m in steady),
        "train_s": statistics.mean(m["time/train_s"] for m in steady),
        "rollout_rows": statistics.mean(m["model/rollout_rows"] for m in metrics),
        "train_rows": statistics.mean(m["model/train_rows"] for m in metrics),
        "final_reward": statistics.mean(m["reward/mean"] for m in metrics[-3:]),
        "ode_accuracy": accuracy,
        "curve": [(c, m["reward/mean"]) for c, m in zip(clock, metrics, strict=True)],
        "acc_curve": [(c, m[acc_key]) for c, m in zip(clock, metrics, strict=True)] if acc_key else [],
    }


def time_to_reach(curve: list[tuple[float, float]], target: float, window: int = 3) -> float | None:
    """Wall clock at which the moving average (over `window` epochs) of the reward first reaches `target`."""
    for i in range(len(curve)):
        values = [v for _, v in curve[max(0, i - window + 1): i + 1]]
        if statistics.mean(values) >= target:
            return curve[i][0]
    return None


def spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "not reached"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "digits_paper.toml")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the recipe's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tree-epochs", type=int, default=None,
                        help="epochs for tree only (e.g. as many as fit in flat's wall clock), for time-to-target")
    parser.add_argument("--samples-per-digit", type=int, default=20)
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--plots", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    torch.set_num_threads(2)
    extra = [f"train.epochs={args.epochs}"] if args.epochs else []
    work = Path(tempfile.mkdtemp(prefix="tree_vs_flat_"))
    results: dict[str, list[dict]] = {"tree": [], "flat": [], "mix": []}
    started = time.perf_counter()
    for seed in args.seeds:
        for algorithm in results:
            out = work / f"{algorithm}-{seed}"
            epochs = [f"train.epochs={args.tree_epochs}"] if algorithm == "tree" and args.tree_epochs else []
            metrics = run_one(args.recipe, extra + epochs + [f'tree.algorithm="{algorithm}"', f"train.seed={seed}"],
                              out)
            accuracy = ode_accuracy(out / "final", args.samples_per_digit, seed)
            results[algorithm].append(summarize(algorithm, metrics, accuracy))
            print(f"# {algorithm} seed {seed}: {results[algorithm][-1]['iter_s']:.2f} s/iter, "
                  f"final reward {results[algorithm][-1]['final_reward']:.3f}, ODE accuracy {accuracy:.1%} "
                  f"({time.perf_counter() - started:.0f} s elapsed)", flush=True)

    print("\n## Tree vs flat vs mix (digits, k = 3, w = 3, 27 leaves per prompt)\n")
    print("| algorithm | s / iter | rollout s | scoring s | training s | rollout rows | train rows | "
          "final reward | ODE accuracy | time to flat's final reward (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        reach = [time_to_reach(r["curve"], flat["final_reward"]) for r, flat in zip(runs, results["flat"],
                                                                                     strict=True)]
        print(f"<!-- {name}: time to flat's final reward per seed: {reach} -->")
        print(f"| {name} | {spread([r['iter_s'] for r in runs])} | {spread([r['rollout_s'] for r in runs])} | "
              f"{spread([r['score_s'] for r in runs])} | {spread([r['train_s'] for r in runs])} | "
              f"{statistics.mean(r['rollout_rows'] for r in runs):.0f} | "
              f"{statistics.mean(r['train_rows'] for r in runs):.0f} | "
              f"{spread([r['final_reward'] for r in runs])} | {spread([r['ode_accuracy'] for r in runs])} | "
              f"{spread(reach)} |")
    flat_iter = statistics.mean(r["iter_s"] for r in results["flat"])
    tree_iter = statistics.mean(r["iter_s"] for r in results["tree"])
    print(f"\nper-iteration speed-up of tree over flat: {flat_iter / tree_iter:.2f}x")
    args.plots.mkdir(parents=True, exist_ok=True)
    plot_curves({f"{n} (seed {args.seeds[0]})": runs[0]["curve"] for n, runs in results.items()},
                args.plots / "tree_vs_flat_reward.png", title="digits: reward vs wall clock",
                x_label="seconds", y_label="mean prompted-digit probability")
    if results["tree"][0]["acc_curve"]:
        plot_curves({f"{n} (seed {args.seeds[0]})": runs[0]["acc_curve"] for n, runs in results.items()},
                    args.plots / "tree_vs_flat_accuracy.png", title="digits: leaf accuracy vs wall clock",
                    x_label="seconds", y_label="prompted-digit accuracy of rollout leaves")

    if args.no_ablation:
        return
    print("\n## (k, w) ablation (tree, seed 0)\n")
    print("| (k, w) | leaves | s / iter | rollout rows | train rows | final reward | ODE accuracy |")
    print("|---|---|---|---|---|---|---|")
    for k, w in ((2, 3), (2, 4), (3, 3), (4, 3)):
        out = work / f"ablation-{k}-{w}"
        metrics = run_one(args.recipe, extra + [f"tree.branch_factor={k}", f"tree.window_width={w}",
                                                f"train.seed={args.seeds[0]}"], out)
        summary = summarize(f"({k}, {w})", metrics, ode_accuracy(out / "final", args.samples_per_digit,
                                                                 args.seeds[0]))
        print(f"| ({k}, {w}) | {k ** w} | {summary['iter_s']:.2f} | {summary['rollout_rows']:.0f} | "
              f"{summary['train_rows']:.0f} | {summary['final_reward']:.3f} | {summary['ode_accuracy']:.1%} |",
              flush=True)


if __name__ == "__main__":
    main()
