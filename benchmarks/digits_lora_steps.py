"""Where a tuned digits LoRA acts: the stock ODE sampler with the LoRA switched on at some denoising steps only
(`callback_on_step_end` enables it for the next step, disables it otherwise), judged per set of steps as
`digits_judged.py` judges a model (the strict judge, the judge, within-prompt diversity):

    python benchmarks/digits_lora_steps.py runs/digits/final --samples 16

If the narrowing (diversity lost for accuracy) came from the deterministic steps after the SDE window, which no KL
term and no log-prob sees, the LoRA on the late steps alone would narrow; if it is the window's own steps, the LoRA on
the early steps alone reproduces the whole model. Image j of digit c is drawn from seed 1000·c + j (as
`digits_judged.py`), so every row is judged on the same noise. Results: docs/benchmarks.md, "Judged strictly".
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from treegrpo.builtin import load_digits_pipeline  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark, as gpu_check.py does
from digits_judged import judge_digits  # noqa: E402


def step_sets(steps: int) -> dict[str, set[int]]:
    """Named sets of 0-based denoising steps with the LoRA on: none, all, early prefixes and late suffixes."""
    half = steps // 2
    sets = {"none": set(), "all": set(range(steps))}
    for last in (1, 2, half - 1):
        sets[f"0-{last}"] = set(range(last + 1))
    for first in (2, 3, half):
        sets[f"{first}-{steps - 1}"] = set(range(first, steps))
    return sets


def sample_with_lora_on(pipe, meta, on: set[int], prompt: str, generators: list) -> torch.Tensor:
    """The stock ODE's images `[N, 3, H, W]` for `prompt`, one per generator, with the LoRA on at steps `on` only."""
    def switch(pipeline, step, timestep, tensors):  # called after `step`: set the LoRA for the next one
        (pipeline.enable_lora if step + 1 in on else pipeline.disable_lora)()
        return tensors

    (pipe.enable_lora if 0 in on else pipe.disable_lora)()
    try:
        with torch.no_grad():
            return pipe(prompt=prompt, num_images_per_prompt=len(generators), generator=generators, output_type="pt",
                        callback_on_step_end=switch, **meta["pipeline_kwargs"]).images
    finally:
        pipe.enable_lora()


def judge_with_lora_on(pipe, meta, on: set[int], samples: int) -> dict[str, float]:
    """Means over digits of `digits_judged.judge_digits`'s accuracies and diversity, the LoRA on at steps `on`."""
    table, _ = judge_digits(lambda prompt, generators: sample_with_lora_on(pipe, meta, on, prompt, generators),
                            samples)
    return {key: sum(row[key] for row in table.values()) / len(table) for key in ("strict", "judge", "diversity")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lora", help="a LoRA folder (a run's final/ or best/)")
    parser.add_argument("--samples", type=int, default=16, help="samples per digit")
    args = parser.parse_args()
    pipe, meta = load_digits_pipeline()
    pipe.load_lora_weights(args.lora)
    pipe.set_progress_bar_config(disable=True)
    steps = meta["pipeline_kwargs"]["num_inference_steps"]
    print(f"{args.samples} ODE samples per digit, LoRA on at the listed steps (0-based, of {steps})\n")
    print("| LoRA on at steps | strict judge | judge | diversity |\n|---|---|---|---|")
    for name, on in step_sets(steps).items():
        row = judge_with_lora_on(pipe, meta, on, args.samples)
        print(f"| {name} | {row['strict']:.3f} | {row['judge']:.3f} | {row['diversity']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
