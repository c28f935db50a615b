"""Does a shapes LoRA win GenEval by drawing MORE objects? GenEval's rules only ask that the named objects be there
(extra objects pass every category but counting), and the learned judge applies the same rules, so a policy that
fills the picture games both. This counts every object the world's deterministic detector finds, against what
each prompt asks, and scores "judged correct with nothing extra" beside the judge's plain accuracy.

    python benchmarks/shapes_clutter.py --lora recipe=runs/shapes/final --lora nokl=/tmp/nokl/final

Samples the held-out test prompts (`--per-prompt` each, the same noise for every model) with the stock pipeline,
base first. Prints one line per model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from treegrpo.builtin import load_shapes_pipeline
from treegrpo.builtin.shapes_world import SHAPES
from treegrpo.rewards.detectors import ShapesDetector
from treegrpo.rewards.geneval import GenEvalReward

ROOT = Path(__file__).resolve().parents[1]


def clutter_report(images, metadata: list[dict], prompts: list[str]) -> dict:
    """Objects per image, the share with objects beyond those asked, and the judge's accuracy plain and strict."""
    asked = [sum(item["count"] for item in m["include"]) for m in metadata]
    found = [len(ShapesDetector().detect(image, list(SHAPES))) for image in images]
    extra = [max(0, f - a) for f, a in zip(found, asked, strict=True)]
    judge = GenEvalReward(detector="shapes_judge", score="binary")
    _, accuracy = judge.score_and_accuracy(images, prompts, metadata)
    strict = [v.correct and e == 0 for v, e in zip(judge.last_verdicts, extra, strict=True)]
    return {"objects_per_image": sum(found) / len(found), "with_extra": sum(e > 0 for e in extra) / len(extra),
            "judge": accuracy, "judge_nothing_extra": sum(strict) / len(strict)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", help="a LoRA to compare")
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = [json.loads(line) for line in (ROOT / "recipes/prompts/shapes_test.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in records for _ in range(args.per_prompt)]
    metadata = [{k: v for k, v in r.items() if k != "prompt"} for r in records for _ in range(args.per_prompt)]
    for label, lora in [("base", None), *(item.split("=", 1) for item in args.lora)]:
        pipe, meta = load_shapes_pipeline()
        if lora:
            pipe.load_lora_weights(lora)
        with torch.no_grad():
            noise = torch.Generator().manual_seed(args.seed)
            images = pipe(prompts, generator=noise, **meta["pipeline_kwargs"]).images
        r = clutter_report(images, metadata, prompts)
        print(f"{label}: {r['objects_per_image']:.2f} objects an image, {r['with_extra']:.1%} with objects not "
              f"asked for; judged accuracy {r['judge']:.3f}, judged correct with nothing extra "
              f"{r['judge_nothing_extra']:.3f}")


if __name__ == "__main__":
    main()
