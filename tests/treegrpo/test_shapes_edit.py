"""The shipped editing model (builtin:shapes_edit, a real FluxKontextPipeline) and its recipe: the prompt files name
sources that hold the object each instruction names, inside its `edit_region`; the base model follows the
instructions only partly; the recipe runs from the shipped files with no download (2 epochs here) and
`treegrpo eval` edits each test source."""

import json

import torch
from PIL import Image
from typer.testing import CliRunner

from treegrpo.app import app
from treegrpo.builtin import builtin_metadata, load_shapes_edit_pipeline
from treegrpo.rewards import build_reward
from treegrpo.rewards.detectors import ShapesDetector

from .test_shapes_recipe import ROOT, read_jsonl, run_shortened

PROMPTS = ROOT / "recipes" / "prompts"


def test_every_instruction_names_an_object_of_its_source_inside_its_region():
    detector = ShapesDetector()
    for split, count in (("train", 96), ("test", 48)):
        lines = read_jsonl(PROMPTS / f"shapes_edit_{split}.jsonl")
        assert len(lines) == count
        for line in lines:
            _, _, colour, shape, new = line["prompt"].split()  # "make the red circle blue"
            assert line["include"] == [{"class": shape, "count": 1, "color": new}] and colour != new
            with Image.open(PROMPTS / line["image"]) as image:
                assert image.size == (32, 32)
                found = detector.detect(image.convert("RGB"))
            (named,) = [d for d in found if d.cls == shape]  # one object of each shape per scene
            assert named.color == colour
            x0, y0, x1, y1 = (v * 32 for v in line["edit_region"])
            half = named.size / 2
            assert x0 <= named.x - half + 1 and named.x + half - 1 <= x1 and y0 <= named.y - half + 1 \
                and named.y + half - 1 <= y1, (line, named)


def test_base_model_follows_the_instructions_only_partly():
    """Recorded at build time (96 held-out edits) below 0.7 and well above chance, and a fresh sample of the test
    split agrees roughly; the rest of the scene is mostly kept."""
    meta = builtin_metadata("builtin:shapes_edit")
    assert 0.2 < meta["base_edit"]["detector"] < 0.7 and 0.2 < meta["base_edit"]["judge"] < 0.7
    pipe, meta = load_shapes_edit_pipeline()
    lines = read_jsonl(PROMPTS / "shapes_edit_test.jsonl")[:16]
    images, sources = [], []
    for index, line in enumerate(lines):
        sources.append(Image.open(PROMPTS / line["image"]).convert("RGB"))
        images += pipe(image=sources[-1], prompt=line["prompt"], generator=torch.Generator().manual_seed(index),
                       **meta["pipeline_kwargs"]).images
    prompts = [line["prompt"] for line in lines]
    metadata = [{k: v for k, v in line.items() if k != "prompt"} for line in lines]
    accuracy = float(build_reward("geneval", score="binary").score(images, prompts, metadata).mean())
    assert 0.05 < accuracy < 0.95
    kept = build_reward("preservation")(images, prompts, metadata=metadata, source_images=sources)
    assert float(kept.mean()) > 0.9


def test_shapes_edit_recipe_runs_and_eval_edits_the_test_sources(tmp_path):
    out = tmp_path / "edit"
    metrics = run_shortened("shapes_edit.toml", out)
    assert 0.0 <= metrics[0]["reward/geneval/mean"] <= 1.0 and 0.5 < metrics[0]["reward/preservation/mean"] <= 1.0
    evaluations = read_jsonl(out / "eval.jsonl")
    assert {"eval/judge/accuracy", "eval/preservation/mean"} <= set(evaluations[-1])
    judged = CliRunner().invoke(app, ["eval", "builtin:shapes_edit", "--lora", str(out / "final"), "--prompts",
                                      str(PROMPTS / "shapes_edit_test.jsonl"), "--reward", "geneval:score=binary",
                                      "--reward", "preservation", "--num-images", "1", "--json",
                                      str(tmp_path / "eval.json")])
    assert judged.exit_code == 0, judged.output
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["prompts"] == 48 and set(data["results"]) == {"base", "lora"}
    assert 0 < data["results"]["base"]["preservation"]["mean"] <= 1
    from treegrpo.hub.card import model_card
    from treegrpo.hub.summary import read_run

    card = str(model_card(read_run(out), "user/shapes-edit-lora"))
    assert "from treegrpo.builtin import load_shapes_edit_pipeline" in card and "pipeline_tag: image-to-image" in card
    assert 'images = pipe(image=source, prompt=["make the' in card
