"""Best-of-tree and pruned tree search vs best-of-N on the shipped digits model, at equal denoiser rows.

    python benchmarks/digits_search.py            # 10 digits × 10 seeds, ~1 min on 2 cores

The digit reward (probability of the prompted digit under the shipped classifier) is the scorer; the table reports
the accuracy of the image each method returns, judged by the same classifier's argmax. The judge and the scorer are
the same model, so this measures how well each method spends its rows on the scorer, not an independent quality.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cli"))
sys.path.insert(0, str(ROOT / "src"))

from diffusers_tree import TreeRolloutPipeline, TreeSDEScheduler  # noqa: E402
from diffusers_tree.search import best_of_n  # noqa: E402
from treegrpo.builtin import load_digits_pipeline  # noqa: E402
from treegrpo.rewards.digits import DigitsReward  # noqa: E402

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def main(seeds: int = 10) -> None:
    torch.set_num_threads(2)
    pipe, meta = load_digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: v for k, v in meta["pipeline_kwargs"].items() if k != "num_inference_steps"}
    steps = meta["pipeline_kwargs"]["num_inference_steps"]
    reward = DigitsReward()
    prompts = [f"a handwritten digit {w}" for w in WORDS]
    results: dict[str, list[tuple[float, int]]] = {}

    def record(name, out):
        accuracy = reward.accuracy(out.images, prompts)
        results.setdefault(name, []).append((accuracy, out.rows / len(prompts)))

    for seed in range(seeds):
        scheduler = TreeSDEScheduler.from_scheduler(pipe.scheduler, branch_factor=3, window_width=3, window_start=2)
        tree = TreeRolloutPipeline(pipe, scheduler)
        g = torch.Generator().manual_seed(seed)
        record("best-of-tree (k=3, w=3, s=2)", tree.best_of_tree(prompts, reward, num_inference_steps=steps,
                                                                  generator=g, **kwargs))
        for beam in (1, 2, 3):
            g = torch.Generator().manual_seed(seed)
            record(f"pruned tree search, beam {beam}", tree.tree_search(prompts, reward, beam=beam,
                                                                         num_inference_steps=steps, generator=g,
                                                                         **kwargs))
        for n in (1, 3, 5, 15):
            g = torch.Generator().manual_seed(1000 + seed)
            record(f"best-of-N, N = {n}", best_of_n(pipe, prompts, reward, n=n, num_inference_steps=steps,
                                                   generator=g, **kwargs))

    print(f"\n| method | denoiser rows per prompt | accuracy of the returned image (mean ± s.d. over {seeds} seeds) |")
    print("|---|---|---|")
    for name, values in results.items():
        accuracies = [a for a, _ in values]
        rows = statistics.mean(r for _, r in values)
        print(f"| {name} | {rows:.0f} | {statistics.mean(accuracies):.1%} ± {statistics.stdev(accuracies):.1%} |")


if __name__ == "__main__":
    main()
