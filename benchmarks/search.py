"""Best-of-tree and pruned tree search vs best-of-N at equal budgets of denoiser rows, on a toy scorer.

Tiny random-weight SD3 (`diffusers_tree.testing.tiny_sd3_pipeline`), 32×32 images, T = 10, CFG 7.0, (k, w) = (3, 3)
with the SDE window at steps 2-4 (`flow_sde`, η = 0.7). The scorer rewards closeness of the image to a fixed target
colour: score = -1000 · mean((pixel - target)²), pixels in [0, 1], higher is better.

Methods (rows per prompt, CFG halves counted):
- best-of-tree: the full 27-leaf tree, every leaf scored (2·150 = 300 rows);
- pruned `tree_search` with beam b = 1, 2, 3: at each window depth and before the ODE tail only the best b nodes per
  prompt (scored on their decoded x̂0 prediction) go on: 2·(6 + 10·b) = 32, 52, 72 rows;
- `best_of_n`: N independent ODE samples with the stock pipeline, 2·10·N rows. N = 1 … 4 bracket the pruned budgets
  (best-of-N cannot hit 32, 52 or 72 exactly), N = 15 matches best-of-tree exactly.

Every method runs on the same prompts and generator seeds; each (prompt, seed) is one case. Reported: mean ± std of
the best score over cases, the gain over a single sample (best-of-1) paired by case with its standard error, and
paired comparisons of each pruned search against the best-of-N just below and just above its budget. The pruned
search also decodes and scores the x̂0 of frontier nodes; that cost is not in the denoiser rows and is reported as
"images scored" (VAE decodes + scorer calls). Scores are deterministic; no timings are printed (see rollout.py).

    python benchmarks/search.py              # about 1 minute on 2 idle CPU cores
    python benchmarks/search.py --seeds 16
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffusers_tree import TreeRolloutPipeline  # noqa: E402
from diffusers_tree.search import best_of_n, best_of_tree, tree_search  # noqa: E402
from diffusers_tree.testing import tiny_sd3_pipeline  # noqa: E402

PROMPTS = [
    "a red cat", "a blue dog", "a green tree", "a photo of a house", "a white horse", "a yellow flower",
    "the sea at night", "a small bird",
]  # fmt: skip
TARGET = np.array([0.9, 0.6, 0.2], dtype=np.float32)  # an orange: far from the tiny model's grey-ish mean image
CALL = {"num_inference_steps": 10, "guidance_scale": 7.0, "height": 32, "width": 32, "max_sequence_length": 16}
K, W, S = 3, 3, 2


class ColourScorer:
    """-1000 · mean squared distance of the image to `TARGET`; counts the images it scores."""

    def __init__(self):
        self.images = 0

    def __call__(self, images, prompts) -> list[float]:
        self.images += len(images)
        return [-1000.0 * float(((np.asarray(im, dtype=np.float32) / 255.0 - TARGET) ** 2).mean()) for im in images]


@dataclass
class Result:
    name: str
    rows: float  # per prompt
    scored: float  # images scored per prompt (final candidates, plus decoded x̂0 predictions for the pruned search)
    scores: list[float]  # best score of each case, cases in (seed, prompt) order


def run_method(name: str, fn: Callable, seeds: list[int]) -> Result:
    scorer, scores, rows = ColourScorer(), [], 0
    for seed in seeds:
        out = fn(PROMPTS, scorer, generator=torch.Generator().manual_seed(seed), **CALL)
        scores += out.scores.tolist()
        rows += out.rows
    cases = len(seeds) * len(PROMPTS)
    return Result(name, rows / cases, scorer.images / cases, scores)


def mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8, help="generator seeds; cases = seeds × 8 prompts")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    load = os.getloadavg()[0]

    pipe = tiny_sd3_pipeline()
    tree = TreeRolloutPipeline.from_pipe(pipe, branch_factor=K, window_width=W, window_start=S)
    methods: dict[str, Callable] = {"best-of-tree": partial(best_of_tree, tree)}
    methods.update({f"tree_search beam {b}": partial(tree_search, tree, beam=b) for b in (1, 2, 3)})
    methods.update({f"best-of-{n}": partial(best_of_n, pipe, n=n) for n in (1, 2, 3, 4, 15)})
    with torch.no_grad():
        results = {name: run_method(name, fn, seeds) for name, fn in methods.items()}

    cases = len(seeds) * len(PROMPTS)
    base = results["best-of-1"].scores
    target = tuple(round(c, 2) for c in TARGET.tolist())
    print(f"tiny SD3, T = 10, CFG 7.0, (k, w) = ({K}, {W}), window_start = {S}; {len(PROMPTS)} prompts × "
          f"{len(seeds)} seeds = {cases} cases; score = -1000·MSE to RGB {target}; "
          f"torch {torch.__version__}, {args.threads} threads; 1-min load average at start: {load:.1f}\n")
    print("| method | denoiser rows / prompt | images scored / prompt | best score, mean ± std "
          "| gain over best-of-1, mean ± s.e. |")
    print("|---|---|---|---|---|")
    for r in sorted(results.values(), key=lambda r: r.rows):
        gain, se = mean_se([s - b for s, b in zip(r.scores, base, strict=True)])
        print(f"| {r.name} | {r.rows:.0f} | {r.scored:.0f} | {statistics.fmean(r.scores):.3f} ± "
              f"{statistics.stdev(r.scores):.3f} | {gain:+.3f} ± {se:.3f} |")

    print("\nPaired by case: difference of best scores (search − best-of-N), mean ± s.e., and search wins / cases.\n")
    print("| search (rows / prompt) | vs best-of-N (rows / prompt) | difference | wins |")
    print("|---|---|---|---|")
    pairs = [("tree_search beam 1", (1, 2)), ("tree_search beam 2", (2, 3)), ("tree_search beam 3", (3, 4)),
             ("best-of-tree", (15,))]
    for search_name, ns in pairs:
        search = results[search_name]
        for n in ns:
            other = results[f"best-of-{n}"]
            diffs = [s - o for s, o in zip(search.scores, other.scores, strict=True)]
            diff, se = mean_se(diffs)
            wins = sum(d > 0 for d in diffs)
            print(f"| {search_name} ({search.rows:.0f}) | best-of-{n} ({other.rows:.0f}) | {diff:+.3f} ± {se:.3f} "
                  f"| {wins} / {cases} |")


if __name__ == "__main__":
    main()
