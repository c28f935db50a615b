"""The shipped shapes model (builtin:shapes, a real FluxPipeline) and its recipe, shortened to 2 epochs: it runs
from the builtin model with no downloads, rewards with GenEval's rules on the deterministic detector, is judged on
the held-out test prompts, and `treegrpo eval` prints GenEval's table for the LoRA."""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from treegrpo.app import app
from treegrpo.builtin import builtin_metadata, load_shapes_pipeline
from treegrpo.builtin.shapes_world import CATEGORIES, split_prompts
from treegrpo.rewards import build_reward

ROOT = Path(__file__).resolve().parents[2]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_shipped_prompt_files_are_the_worlds_splits():
    for name, records in split_prompts().items():
        assert read_jsonl(ROOT / "recipes" / "prompts" / f"shapes_{name}.jsonl") == records


def test_base_model_follows_its_prompts_only_partly():
    """The issue's bar: overall well below 70 %, counting and position weaker than single objects (recorded at
    build time on 8 images per prompt), and a fresh sample of the test split agrees roughly."""
    meta = builtin_metadata("builtin:shapes")
    recorded = meta["base_geneval"]["test"]
    assert recorded["overall"] < 0.7
    for split in meta["base_geneval"].values():
        assert split["counting"] < split["single_object"] and split["position"] < split["single_object"]
    pipe, meta = load_shapes_pipeline()
    records = split_prompts()["test"]
    prompts = [r["prompt"] for r in records for _ in range(2)]
    metadata = [{k: v for k, v in r.items() if k != "prompt"} for r in records for _ in range(2)]
    import torch

    images = pipe(prompts, generator=torch.Generator().manual_seed(5), **meta["pipeline_kwargs"]).images
    assert images[0].size == (32, 32)
    _, accuracy = build_reward("geneval").score_and_accuracy(images, prompts, metadata)
    assert 0.05 < accuracy < 0.7


def test_text_conditioning_tells_a_prompt_from_its_swapped_binding():
    """FLUX gives text tokens no position, so the denoiser sees the T5 tokens as a set: with the frozen random
    encoders the first build shipped, "a red circle and a blue square" and "a blue circle and a red square" gave
    nearly the same set (nearest-token distance 0.10-0.14 of a one-word change's), and no fine-tuning could learn
    colour attribution or position (docs/benchmarks.md, "Why the plateau"). The shipped T5 is pretrained on the
    prompts' words first (scripts/train_shapes.py, `pretrain_t5`); swapped prompts must now differ at least half as
    much as a changed word does."""
    import torch

    pipe, _ = load_shapes_pipeline()

    def token_set_distance(a: str, b: str) -> float:
        embeds, _, _ = pipe.encode_prompt(prompt=[a, b], prompt_2=None, max_sequence_length=12)
        return torch.cdist(embeds[0], embeds[1]).min(1).values.mean().item()

    one_word = token_set_distance("a photo of a red circle", "a photo of a blue circle")
    colour_swap = token_set_distance("a photo of a red circle and a blue square",
                                     "a photo of a blue circle and a red square")
    position_swap = token_set_distance("a photo of a red circle left of a blue square",
                                       "a photo of a blue square left of a red circle")
    assert colour_swap > 0.5 * one_word and position_swap > 0.5 * one_word, (colour_swap, position_swap, one_word)


def run_shortened(recipe: str, out: Path) -> list[dict]:
    """A shipped shapes recipe (`shapes.toml`, `shapes_edit.toml`) through `treegrpo run`, cut to 2 epochs of 3
    prompts; its metrics, after checking the rows: one 27-leaf tree per prompt, (9, 3) children, 3-step tail, no
    CFG (a Kontext source's tokens are no rows)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["run", str(ROOT / "recipes" / recipe), "--set", "train.epochs=2",
                                      "--set", "data.prompts_per_epoch=3", "--set", "evaluation.images_per_prompt=1",
                                      "--set", f"output.dir={json.dumps(str(out))}", "--set", "output.samples=false"])
    assert result.exit_code == 0, result.output
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == 2
    s = metrics[0]["tree/window_start"]
    assert metrics[0]["model/rollout_rows"] == 3 * (s + 10 + 27 * min(3, 10 - s - 2))
    return metrics


def test_shapes_recipe_runs_and_eval_prints_genevals_table(tmp_path):
    out = tmp_path / "shapes"
    metrics = run_shortened("shapes.toml", out)
    assert 0.0 <= metrics[0]["reward/geneval/mean"] <= 1.0
    evaluations = read_jsonl(out / "eval.jsonl")
    assert [row["epoch"] for row in evaluations] == [0, 2]
    assert all(0.0 <= row["eval/geneval/mean"] <= 1.0 for row in evaluations)
    for row in evaluations:  # the clutter GenEval's rules let through, reported by every evaluation reward
        for name in ("strict", "geneval", "judge"):
            assert 0.0 <= row[f"eval/{name}/with_extra"] <= row[f"eval/{name}/extra_objects"] <= 4 * 4
        # forbidding extras fails exactly GenEval's correct images that hold one (same detector, same images)
        allowed, extra = row["eval/geneval/mean"], row["eval/geneval/with_extra"]
        assert allowed - extra - 1e-9 <= row["eval/strict/mean"] <= allowed + 1e-9
    assert json.loads((out / "best" / "best.json").read_text())["reward"] == "strict"

    table = CliRunner().invoke(app, ["eval", "builtin:shapes", "--lora", str(out / "final"), "--prompts",
                                     str(ROOT / "recipes" / "prompts" / "shapes_test.jsonl"), "--reward", "geneval",
                                     "--num-images", "1", "--json", str(tmp_path / "eval.json")])
    assert table.exit_code == 0, table.output
    assert "GenEval overall" in table.output and all(tag in table.output for tag in CATEGORIES)
    assert "with extra objects" in table.output
    data = json.loads((tmp_path / "eval.json").read_text())
    for label in ("base", "lora"):
        entry = data["results"][label]["geneval"]
        by_tag = entry["by_tag"]
        assert set(by_tag) == set(CATEGORIES)
        assert entry["overall"] == pytest.approx(sum(by_tag.values()) / len(by_tag))  # GenEval's: mean of categories
        counts = {tag: sum(r["tag"] == tag for r in split_prompts()["test"]) for tag in CATEGORIES}
        weighted = sum(by_tag[t] * counts[t] for t in CATEGORIES) / sum(counts.values())
        assert entry["accuracy"] == pytest.approx(weighted)
        assert 0.0 <= entry["subscores"]["with_extra"] <= entry["subscores"]["extra_objects"]


def test_best_of_tree_scores_each_leaf_against_its_prompts_geneval_metadata(tmp_path):
    records = [r for r in split_prompts()["test"] if r["tag"] in ("colors", "counting")][:2]
    prompts_file = tmp_path / "two.jsonl"
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = CliRunner().invoke(app, ["sample", "builtin:shapes", "--prompts", str(prompts_file), "--best-of-tree",
                                      "--reward", "geneval", "--out", str(tmp_path / "best")])
    assert result.exit_code == 0, result.output
    printed = {r["prompt"]: float(line.split()[0]) for r in records for line in result.output.splitlines()
               if line.strip().endswith(r["prompt"])}
    # the saved best leaf (lossless PNG) re-scored against its prompt's metadata gives the printed score: the
    # metadata reached the scorer (before, geneval failed there for want of it)
    from PIL import Image

    saved = sorted((tmp_path / "best").glob("0*.png"))
    rescored = build_reward("geneval").score([Image.open(p).convert("RGB") for p in saved],
                                             [r["prompt"] for r in records],
                                             [{k: v for k, v in r.items() if k != "prompt"} for r in records])
    assert rescored.tolist() == pytest.approx([printed[r["prompt"]] for r in records], abs=1e-6)
