"""What a digits model draws, judged three ways, per digit: the reward's classifier, the judge (a classifier no run
trains on) and the strict judge (the judge's class AND a typical digit of it: as close to a real digit of that
class as 99 % of real digits are: the `digits` reward with `strict = true`), plus within-prompt diversity (the
trainer's `leaf_diversity`); and a
grid of every digit per model, to look at.

    python benchmarks/digits_judged.py --lora tuned=runs/digits/final --lora kl0=runs/digits_kl0/final \\
        --grid-dir docs/img --samples 20

The base model is always the first column. Samples are the stock pipeline's ODE with `load_lora_weights`, image j
of digit c drawn from seed 1000·c + j, so every model is judged on the same noise.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from treegrpo.builtin import load_digits_pipeline  # noqa: E402
from treegrpo.rewards import build_reward  # noqa: E402
from treegrpo.rewards.digits import DIGIT_WORDS, images_to_pixels, pixels_to_images  # noqa: E402
from treegrpo.run.metrics import image_grid  # noqa: E402
from treegrpo.train.diagnostics import leaf_diversity  # noqa: E402


def judge_digits(sample, samples: int) -> tuple[dict[int, dict[str, float]], torch.Tensor]:
    """Per digit: the three accuracies (the `digits` reward as the trainer builds it) and the diversity of
    `sample(prompt, generators)`'s images, image j of digit c from seed 1000·c + j; and every sample's pixels
    `[10 · samples, 1, 16, 16]`."""
    judges = {"reward": build_reward("digits"), "judge": build_reward("digits", classifier="judge"),
              "strict": build_reward("digits", classifier="judge", strict=True)}
    table, pixels = {}, []
    for digit, word in enumerate(DIGIT_WORDS):
        prompt = f"a handwritten digit {word}"
        images = sample(prompt, [torch.Generator().manual_seed(1000 * digit + j) for j in range(samples)])
        table[digit] = {name: judge.score_and_accuracy(images, [prompt] * samples)[1]
                        for name, judge in judges.items()}
        diversity, _ = leaf_diversity(images, torch.zeros(samples, dtype=torch.long))  # one group: this digit
        table[digit]["diversity"] = diversity
        pixels.append(images_to_pixels(images))
    return table, torch.cat(pixels)


def judge_model(lora: str | None, samples: int) -> tuple[dict[int, dict[str, float]], torch.Tensor]:
    """`judge_digits` on the stock pipeline's ODE samples, with `lora` loaded if given."""
    pipe, meta = load_digits_pipeline()
    if lora:
        pipe.load_lora_weights(lora)

    def sample(prompt, generators):
        with torch.no_grad():
            return pipe(prompt=prompt, num_images_per_prompt=len(generators), generator=generators,
                        output_type="pt", **meta["pipeline_kwargs"]).images

    return judge_digits(sample, samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", help="a LoRA to judge")
    parser.add_argument("--samples", type=int, default=20, help="samples per digit")
    parser.add_argument("--grid-dir", type=Path, default=None, help="write digits_<name>_grid.png here")
    parser.add_argument("--grid-columns", type=int, default=8, help="samples per digit in the grid")
    args = parser.parse_args()
    models = [("base", None)] + [tuple(item.split("=", 1)) for item in args.lora]
    results = {}
    for name, lora in models:
        results[name], pixels = judge_model(lora, args.samples)
        if args.grid_dir:
            columns = min(args.grid_columns, args.samples)
            shown = pixels.view(10, args.samples, 1, 16, 16)[:, :columns].flatten(0, 1)
            labels = [DIGIT_WORDS[d] if j == 0 else "" for d in range(10) for j in range(columns)]
            grid = image_grid(pixels_to_images(shown), columns, labels, scale=4)
            args.grid_dir.mkdir(parents=True, exist_ok=True)
            grid.save(args.grid_dir / f"digits_{name}_grid.png")
    names = [name for name, _ in models]
    print(f"{args.samples} ODE samples per digit; accuracy: reward's classifier / judge / strict judge; diversity\n")
    print("| digit | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for digit, word in enumerate(DIGIT_WORDS):
        cells = [f"{r['reward']:.2f} / {r['judge']:.2f} / **{r['strict']:.2f}** / {r['diversity']:.3f}"
                 for r in (results[name][digit] for name in names)]
        print(f"| {word} | " + " | ".join(cells) + " |")
    means = []
    for name in names:
        rows = results[name].values()
        mean = {key: sum(r[key] for r in rows) / 10 for key in ("reward", "judge", "strict", "diversity")}
        means.append(f"{mean['reward']:.3f} / {mean['judge']:.3f} / **{mean['strict']:.3f}** / "
                     f"{mean['diversity']:.3f}")
    print("| **all** | " + " | ".join(means) + " |")


if __name__ == "__main__":
    main()
