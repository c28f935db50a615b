"""Compressed ODE tails against the exact tail, on the same noise and the same SDE window.

For every window start s (weighted by Eq. 7, r = 0.5, T = 10, k = w = 3) and every tail setting (`tail_steps` n,
solver order), the same trees are rolled out twice, with the exact one-step-per-timestep tail and with the
compressed one, and the leaves are compared:

- image error: mean and max |Δ| of the decoded images in [0, 1];
- reward: mean |Δ reward|, and the correlation of the group-normalized leaf advantages (Eq. 9) between the two, which
  is what training sees (1 = the same advantages);
- digits model only: the prompted-digit accuracy of the leaves (reward classifier) with each tail;
- rows per tree, E over Eq. 7 (per CFG half).

Models: `builtin:digits` (the shipped trained tiny SD3, digits reward) and `sd3-large` (the CPU-sized random-weight
MMDiT of `benchmarks/rollout.py`, JPEG-compressibility reward, 32×32 latents).

    python benchmarks/tail.py                       # both models, n = 1, 2, 3, 4, orders 1 and 2
    python benchmarks/tail.py --models digits --tail-steps 2 3
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from diffusers_tree import TreeRolloutPipeline, group_normalize, unique_rows, window_probs  # noqa: E402
from treegrpo.rewards import to_pil  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
T, K, W, RATIO = 10, 3, 3, 0.5


def digits_setup():
    from treegrpo.builtin import digits_metadata
    from treegrpo.model.loading import load_pipeline
    from treegrpo.rewards.digits import DIGIT_WORDS, DigitsReward

    pipe = load_pipeline("builtin:digits").pipe
    kwargs = {k: v for k, v in digits_metadata()["pipeline_kwargs"].items() if k != "num_inference_steps"}
    reward = DigitsReward().load()
    prompts = [f"a handwritten digit {word}" for word in DIGIT_WORDS]
    return pipe, kwargs, prompts, reward


def large_setup():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from rollout import large_sd3_pipeline

    from treegrpo.rewards import build_reward

    pipe = large_sd3_pipeline()
    kwargs = {"height": 64, "width": 64, "guidance_scale": 4.5, "max_sequence_length": 16}
    reward = build_reward("jpeg")
    return pipe, kwargs, ["a photo of a red cat"], reward


def rollout(pipe, kwargs, prompts, start, tail_steps, order, seed):
    tree = TreeRolloutPipeline.from_pipe(pipe, branch_factor=K, window_width=W, window_start=start,
                                         tail_steps=tail_steps, tail_solver_order=order)
    tree.set_progress_bar_config(disable=True)
    out = tree(prompts, num_inference_steps=T, generator=torch.Generator().manual_seed(seed), output_type="pt",
               return_record=False, **kwargs)
    return out.images, out.rows


def compare(name, setup, tail_settings, seeds, starts):
    pipe, kwargs, prompts, reward = setup()
    probs = window_probs(T, W, RATIO)
    group = torch.arange(len(prompts)).repeat_interleave(K**W)
    labels = [p for p in prompts for _ in range(K**W)]
    rows, exact_leaves = [], {}
    for tail_steps, order in [(None, 1), *tail_settings]:
        stats = {"mean_err": [], "max_err": [], "reward_diff": [], "adv_corr": [], "acc": []}
        expected_rows = 0.0
        for start in starts:
            weight = float(probs[start])
            expected_rows += weight * unique_rows(T, K, W, start, tail_steps=tail_steps) / float(probs[starts].sum())
            for seed in seeds:
                if (start, seed) not in exact_leaves:
                    exact_leaves[start, seed] = rollout(pipe, kwargs, prompts, start, None, 1, seed)[0]
                exact = exact_leaves[start, seed]
                images, n_rows = rollout(pipe, kwargs, prompts, start, tail_steps, order, seed)
                assert n_rows == len(prompts) * unique_rows(T, K, W, start, tail_steps=tail_steps) * (
                    2 if kwargs.get("guidance_scale", 1) > 1 else 1)
                diff = (images - exact).abs()
                r_exact, r_fast = reward(to_pil(exact), labels).float(), reward(to_pil(images), labels).float()
                a_exact, a_fast = group_normalize(r_exact, group), group_normalize(r_fast, group)
                corr = float(torch.corrcoef(torch.stack([a_exact, a_fast]))[0, 1])
                for key, value in (("mean_err", float(diff.mean())), ("max_err", float(diff.max())),
                                   ("reward_diff", float((r_fast - r_exact).abs().mean())), ("adv_corr", corr)):
                    stats[key].append((weight, value))
                if hasattr(reward, "accuracy"):
                    stats["acc"].append((weight, reward.accuracy(to_pil(images), labels)))

        def weighted(key, stats=stats):
            pairs = stats[key]
            return sum(w * v for w, v in pairs) / sum(w for w, _ in pairs) if pairs else float("nan")

        label = "exact" if tail_steps is None else f"n={tail_steps}, order {order}"
        rows.append((name, label, expected_rows, weighted("mean_err"), weighted("max_err"), weighted("reward_diff"),
                     weighted("adv_corr"), min(v for _, v in stats["adv_corr"]), weighted("acc")))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits", "sd3-large"], choices=["digits", "sd3-large"])
    parser.add_argument("--tail-steps", nargs="+", type=int, default=[1, 2, 3, 4])
    parser.add_argument("--orders", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--starts", nargs="+", type=int, default=list(range(T - W)),
                        help="window starts compared (weighted by Eq. 7); default all")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    settings = [(n, order) for n in args.tail_steps for order in args.orders if not (n == 1 and order > 1)]
    setups = {"digits": digits_setup, "sd3-large": large_setup}
    print(f"T {T}, k {K}, w {W}, window start drawn by Eq. 7 (r {RATIO}); seeds {args.seeds}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | tail | rows per tree (E over Eq. 7) | mean abs image error | max abs image error | "
          "mean abs reward diff | advantage corr. (mean) | advantage corr. (worst) | leaf accuracy |")
    print("|" + "---|" * 9)
    for model in args.models:
        for row in compare(model, setups[model], settings, args.seeds, args.starts):
            name, label, rows, mean_err, max_err, rdiff, corr, worst, acc = row
            print(f"| {name} | {label} | {rows:.1f} | {mean_err:.4f} | {max_err:.3f} | {rdiff:.4f} | {corr:.3f} | "
                  f"{worst:.3f} | {'' if acc != acc else f'{acc:.3f}'} |", flush=True)


if __name__ == "__main__":
    main()
