"""Editing through the trainer (FLUX.1 Kontext): `.jsonl` prompts that name a source image, the embedding cache keyed
by source, rewards that see the source (python `source_images`, the built-in `preservation`, the http payload), the
one-line errors of `check`, and a 2-epoch run whose exported LoRA loads into the stock `FluxKontextPipeline` in a
fresh process and edits exactly as the trained model does."""

import json
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from diffusers_tree import unique_rows  # noqa: E402
from diffusers_tree.testing.flux_kontext import tiny_flux_kontext_pipeline  # noqa: E402
from treegrpo.model.loading import stock_call  # noqa: E402
from treegrpo.recipe.loading import load_recipe  # noqa: E402
from treegrpo.run.seeds import sample_generators  # noqa: E402

from .conftest import write_recipe  # noqa: E402
from .test_hub import train_capturing  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "grey": (128, 128, 128)}
REWARD_MODULE = textwrap.dedent('''
    import json, numpy as np

    def kept(images, prompts, source_images):
        """Similarity to the source; logs which source each prompt's images came with."""
        with open("seen.jsonl", "a") as log:
            for prompt, source in zip(prompts, source_images):
                log.write(json.dumps([prompt, [round(float(c)) for c in np.asarray(source).mean((0, 1))]]) + "\\n")
        return [1 - float(np.abs(np.asarray(i, np.float32) - np.asarray(s.resize(i.size), np.float32)).mean()) / 255
                for i, s in zip(images, source_images)]
''')
LOAD_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from PIL import Image
    torch.set_num_threads(1)
    import diffusers
    diffusers.utils.logging.disable_progress_bar()
    job = json.loads(sys.argv[1])
    pipe = getattr(diffusers, job.get("pipeline", "FluxKontextPipeline")).from_pretrained(job["model"])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(job["lora"])
    sources = [Image.open(path).convert("RGB") for path in job["sources"]]
    with torch.no_grad():
        images = pipe(image=sources if len(sources) > 1 else sources[0], prompt=job["prompt"], output_type="pt",
                      generator=torch.Generator().manual_seed(0), **job["call"]).images
    torch.save(images, job["out"])
""")


def write_sources(root) -> None:
    """Four 32×32 sources (a coloured square on a coloured ground) and an edit .jsonl naming them relatively."""
    (root / "sources").mkdir()
    lines = []
    for index, (name, colour) in enumerate(COLOURS.items()):
        image = Image.new("RGB", (32, 32), colour)
        image.paste((250, 250, 250), (8, 8, 24, 24))
        image.save(root / "sources" / f"{name}.png")
        lines.append({"prompt": f"make the square {['black', 'yellow'][index % 2]}", "image": f"sources/{name}.png",
                      "edit_region": [0.25, 0.25, 0.75, 0.75]})
    # the same instruction over two sources: two cache entries
    lines.append({"prompt": "make the square black", "image": "sources/blue.png"})
    (root / "edits.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def edit_recipe(root, name="edit.toml", extra=()):
    path = write_recipe(root, root / "tiny_kontext", epochs=2, function="kept", name=name,
                        evaluation={"every": 1, "images_per_prompt": 1})
    text = path.read_text().replace('prompts = "prompts.txt"', 'prompts = "edits.jsonl"\neval_prompts = "edits.jsonl"')
    text = text.replace("test_rewards:kept", "edit_rewards:kept")
    text = text.replace("[sampling]", "[sampling]\nauto_resize = false")
    text += '\n[[reward]]\nkind = "preservation"\nweight = 0.5\n'
    path.write_text(text)
    return load_recipe(path, [f"output.dir={json.dumps(str(root / name.removesuffix('.toml')))}",
                              "output.samples=true", *extra])


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    root = tmp_path_factory.mktemp("editing")
    tiny_flux_kontext_pipeline().save_pretrained(root / "tiny_kontext")
    write_sources(root)
    (root / "edit_rewards.py").write_text(REWARD_MODULE)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.syspath_prepend(str(root))
        torch.set_num_threads(1)
        recipe = edit_recipe(root)
        run = train_capturing(recipe)
        call = {**stock_call(run.pipe, run.sampling.as_kwargs()), "num_inference_steps": 5}
        source = root / "sources" / "green.png"
        with torch.no_grad():
            reference = run.pipe(image=Image.open(source).convert("RGB"), prompt="make the square yellow",
                                 output_type="pt", generator=torch.Generator().manual_seed(0), **call).images
    job = {"model": str(root / "tiny_kontext"), "lora": str(root / "edit" / "final"), "sources": [str(source)],
           "prompt": "make the square yellow", "call": {k: v for k, v in call.items() if v is not None},
           "out": str(root / "loaded.pt")}
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, json.dumps(job)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "run": run, "reference": reference, "loaded": torch.load(job["out"])}


def test_two_epoch_edit_run_trains_on_rows_of_the_formula(edited):
    root = edited["root"]
    metrics = [json.loads(line) for line in (root / "edit" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1]
    for m in metrics:
        # FLUX.1 is guidance-distilled (one row per node) and the source tokens are no rows: 2 prompts, T 5, k w 2
        assert m["model/rollout_rows"] == 2 * unique_rows(5, 2, 2, m["tree/window_start"])
        assert abs(m["policy/first_ratio_error"]) < 1e-4
        assert 0 < m["reward/preservation/mean"] <= 1 and 0 < m["reward/python/mean"] <= 1
        assert "eval/python/mean" in m and "eval/preservation/mean" in m
    assert (root / "edit" / "samples" / "final.png").is_file()


def test_every_image_is_scored_against_its_own_source(edited):
    lines = [json.loads(line) for line in (edited["root"] / "seen.jsonl").read_text().splitlines()]
    expected = {}
    for record in (json.loads(line) for line in (edited["root"] / "edits.jsonl").read_text().splitlines()):
        with Image.open(edited["root"] / record["image"]) as image:
            expected.setdefault(record["prompt"], set()).add(tuple(round(float(c)) for c in
                                                                   np.asarray(image.convert("RGB")).mean((0, 1))))
    assert len(lines) > 8
    for prompt, colour in lines:
        assert tuple(colour) in expected[prompt], (prompt, colour)


def test_exported_lora_edits_in_the_stock_pipeline_as_trained(edited):
    torch.testing.assert_close(edited["loaded"], edited["reference"], rtol=1e-4, atol=1e-4)


def test_cache_keys_on_prompt_and_source(edited):
    """One instruction over two sources is two entries; each equals a direct encode with its own source."""
    from treegrpo.run.prompt_cache import PromptEmbeddingCache

    run, root = edited["run"], edited["root"]
    cache = PromptEmbeddingCache(run.encode_with_encoders_ready, "cpu")
    sources = [str(root / "sources" / "red.png"), str(root / "sources" / "blue.png")]
    joined = cache(["make the square black"] * 2, sources)
    assert cache.encoded_prompts == 2
    cache(["make the square black"], sources[1:])
    assert cache.encoded_prompts == 2
    for index, source in enumerate(sources):
        alone = run.encode_with_encoders_ready(["make the square black"], [source])
        torch.testing.assert_close(joined.cond["source_latents"][index], alone.cond["source_latents"][0])
    assert not torch.equal(joined.cond["source_latents"][0], joined.cond["source_latents"][1])


def test_preservation_reward_counts_only_outside_the_edited_region():
    from treegrpo.rewards import build_reward

    reward = build_reward("preservation")
    source = Image.new("RGB", (10, 10), (0, 0, 0))
    edit = source.copy()
    edit.paste((255, 255, 255), (0, 0, 5, 10))  # the left half white: 50 of 100 pixels differ by 1
    no_region = reward([edit], ["p"], source_images=[source])
    left = reward([edit], ["p"], metadata=[{"edit_region": [0, 0, 0.5, 1]}], source_images=[source])
    right = reward([edit], ["p"], metadata=[{"edit_region": [0.5, 0, 1, 1]}], source_images=[source])
    torch.testing.assert_close(no_region, torch.tensor([0.5]))  # 1 - 50/100
    torch.testing.assert_close(left, torch.tensor([1.0]))  # every changed pixel inside the region
    torch.testing.assert_close(right, torch.tensor([0.0]))  # the kept half is all changed
    with pytest.raises(ValueError, match="the prompts name none"):
        reward([edit], ["p"])
    with pytest.raises(ValueError, match=r"must be \[x0, y0, x1, y1\]"):
        reward([edit], ["p"], metadata=[{"edit_region": [0.6, 0, 0.5, 1]}], source_images=[source])


def test_http_payload_carries_each_source(edited):
    """Client → server: the sources travel with the images (json and multipart) and reach the served reward."""
    from treegrpo.commands.reward_service import answer_score, scorer_and_config
    from treegrpo.rewards import build_reward
    from treegrpo.rewards.remote import decode_request, encode_request

    images = [Image.new("RGB", (8, 8), (200, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 0))]
    sources = [Image.new("RGB", (8, 8), (200, 0, 0)), Image.new("RGB", (8, 8), (255, 255, 255))]
    for body in ("json", "multipart"):
        data, content_type = encode_request(images, ["a", "b"], [{}, {}], body, sources)
        _, _, _, decoded = decode_request(data, content_type)
        assert [np.asarray(s).tolist() for s in decoded] == [np.asarray(s).tolist() for s in sources]
        scorer, config = scorer_and_config(build_reward("preservation"), token=None, max_batch=64,
                                           max_body_bytes=10**7, max_pixels=10**6)
        try:
            status, answer = answer_score(scorer, config, data, content_type)
        finally:
            scorer.close()
        assert status == 200 and answer["scores"] == pytest.approx([1.0, 0.0])
    _, _, _, none = decode_request(*encode_request(images, ["a", "b"], [{}, {}], "json"))
    assert none is None


def test_http_payload_sends_a_shared_source_once():
    """A tree's leaves share their prompt's source (each a separate copy, as the trainer passes them): the request
    holds each distinct source once plus every image's index, decodes to one source per image again, and the older
    one-per-image form is still read; a bad index is refused with what is expected."""
    import json

    from treegrpo.rewards.remote import decode_request, encode_request

    red, white = Image.new("RGB", (8, 8), (200, 0, 0)), Image.new("RGB", (8, 8), (255, 255, 255))
    sources = [red.copy() for _ in range(27)] + [white.copy() for _ in range(27)]
    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(54)]
    data, content_type = encode_request(images, ["p"] * 54, [{}] * 54, "json", sources)
    payload = json.loads(data)
    assert len(payload["source_images"]) == 2 and payload["source_index"] == [0] * 27 + [1] * 27
    multipart, multipart_type = encode_request(images, ["p"] * 54, [{}] * 54, "multipart", sources)
    assert multipart.count(b'; name="source_') == 2
    for body, kind in ((data, content_type), (multipart, multipart_type)):
        _, _, _, decoded = decode_request(body, kind)
        assert [np.asarray(s).tolist() for s in decoded] == [np.asarray(s).tolist() for s in sources]
        assert decoded[0] is not decoded[1]  # copies, as the trainer's: a reward that draws on one changes no other
    old_form = {"prompts": ["a", "b"], "images": payload["images"][:2],
                "source_images": [payload["source_images"][0], payload["source_images"][1]]}
    _, _, _, decoded = decode_request(json.dumps(old_form).encode(), "application/json")
    assert [s.getpixel((0, 0)) for s in decoded] == [(200, 0, 0), (255, 255, 255)]
    for index in ([0, 2], [0], [0, True], "0"):
        bad = {**old_form, "source_index": index}
        with pytest.raises(ValueError, match=r'"source_index" must list, for each of the 2 images, the index of its '
                                             r"source among the 2 sent"):
            decode_request(json.dumps(bad).encode(), "application/json")
    unsourced = {"prompts": ["a"], "images": payload["images"][:1], "source_index": [0]}
    with pytest.raises(ValueError, match='"source_index" without "source_images"'):
        decode_request(json.dumps(unsourced).encode(), "application/json")


@pytest.mark.parametrize("case, message", [
    ("missing", r"line 1: source image 'sources/nope.png' \(.*nope.png\) does not exist; image paths are relative"),
    ("unreadable", r"line 1: source image .*broken.png' is not a readable image"),
    ("sizes", r"the source images differ in size \(line 1: 32x32, line 2: 48x32\)"),
    ("no image", r"line 2 has no \"image\" \(1 lines lack one\); FluxKontextPipeline edits a source image"),
    ("tiny", r"line 1: source image 'sources/tiny.png' is 8x8 pixels; sources need at least 16"),
    ("two", r"line 1 names 2 source images; FluxKontextPipeline takes 1 per prompt\."),
    ("empty list", r"line 1 has \"image\": \[\]; give the source image as a path string"),
])
def test_check_names_the_bad_line(edited, tmp_path, monkeypatch, case, message):
    from treegrpo.recipe.preflight import PreflightError, preflight
    from treegrpo.sources import SourceImageError

    root = edited["root"]
    (tmp_path / "sources").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "sources" / "a.png")
    Image.new("RGB", (48, 32)).save(tmp_path / "sources" / "wide.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "sources" / "tiny.png")
    (tmp_path / "sources" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    first = {"missing": "sources/nope.png", "unreadable": "sources/broken.png", "tiny": "sources/tiny.png",
             "two": ["sources/a.png", "sources/a.png"], "empty list": []}
    lines = [{"prompt": "edit", "image": first.get(case, "sources/a.png")},
             {"prompt": "edit", **({"image": "sources/wide.png"} if case == "sizes" else {}),
              **({"image": "sources/a.png"} if case not in ("sizes", "no image") else {})}]
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(root / "edit.toml", [f"model.pretrained={json.dumps(str(root / 'tiny_kontext'))}",
                                              f"data.prompts={json.dumps(str(tmp_path / 'edits.jsonl'))}",
                                              "data.eval_prompts=null",
                                              f"output.dir={json.dumps(str(tmp_path / 'o'))}"])
    with pytest.raises((PreflightError, SourceImageError), match=message):
        preflight(recipe)


def test_text_to_image_model_refuses_sources(edited, tmp_path, monkeypatch, tiny_sd3_dir):
    from treegrpo.recipe.preflight import preflight
    from treegrpo.sources import SourceImageError

    root = edited["root"]
    monkeypatch.chdir(root)
    recipe = load_recipe(root / "edit.toml", [f"model.pretrained={json.dumps(str(tiny_sd3_dir))}",
                                              f"output.dir={json.dumps(str(tmp_path / 'o'))}"])
    with pytest.raises(SourceImageError, match=r"line 1 names a source image but StableDiffusion3Pipeline is a "
                                               r"text-to-image pipeline"):
        preflight(recipe)


def test_sample_edits_the_given_source_and_refuses_one_for_text_to_image(edited, tiny_sd3_dir):
    """`treegrpo sample --image`: the stock editing pipeline with the trained LoRA edits the source (its output is
    the in-process stock call's); a text-to-image model refuses a source in one line, before loading."""
    from typer.testing import CliRunner

    from treegrpo.app import app

    root = edited["root"]
    source = root / "sources" / "green.png"
    out = root / "sampled"
    result = CliRunner().invoke(app, ["sample", str(root / "tiny_kontext"), "--lora", str(root / "edit" / "final"),
                                      "--prompt", "make the square yellow", "--image", str(source), "--steps", "5",
                                      "--guidance", "3",
                                      "--height", "32", "--width", "32", "--num-images", "1", "--keep-size",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "grid.png").is_file() and len(list(out.glob("*.png"))) == 2
    (sampled,) = [path for path in out.glob("*.png") if path.name != "grid.png"]
    pixels = torch.from_numpy(np.asarray(Image.open(sampled).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    run = edited["run"]  # the trained model in memory, sampled with the noise `sample` draws for image 0
    with torch.no_grad():
        expected = run.pipe(image=Image.open(source).convert("RGB"), prompt="make the square yellow",
                            output_type="pt", generator=sample_generators(0, 0, 0, 1),
                            **stock_call(run.pipe, {"height": 32, "width": 32, "guidance_scale": 3.0,
                                                    "auto_resize": False, "num_inference_steps": 5})).images
    assert (pixels - expected[0]).abs().max() <= 1 / 255 + 1e-6  # the saved PNG's rounding only
    refused = CliRunner().invoke(app, ["sample", str(tiny_sd3_dir), "--prompt", "a cat", "--image", str(source)])
    assert refused.exit_code == 2
    assert "names a source image but StableDiffusion3Pipeline is a text-to-image pipeline" in refused.output
    missing = CliRunner().invoke(app, ["sample", str(root / "tiny_kontext"), "--prompt", "make it red"])
    assert missing.exit_code == 2 and "FluxKontextPipeline edits a source image" in missing.output


def test_card_of_an_edit_run_loads_the_lora_into_the_editing_pipeline(edited):
    from treegrpo.hub.card import model_card
    from treegrpo.hub.summary import read_run

    summary = read_run(edited["root"] / "edit")
    card = str(model_card(summary, "user/kontext-edit-lora"))
    assert "pipeline_tag: image-to-image" in card and "from diffusers import FluxKontextPipeline" in card
    # the first line's instruction, not the JSON line itself (the card printed the raw .jsonl line before)
    assert 'image = pipe(image=source, prompt="make the square black", num_inference_steps=5' in card
    assert "load_image(" in card


def test_best_of_tree_edits_score_each_leaf_against_its_source(edited):
    """`treegrpo sample --best-of-tree --image`: the tree edits the source (kept at its size) and the scorer sees it
    (`preservation` refuses to score without a source), so a best leaf's score in (0, 1] comes back."""
    from typer.testing import CliRunner

    from treegrpo.app import app

    root = edited["root"]
    out = root / "best"
    result = CliRunner().invoke(app, ["sample", str(root / "tiny_kontext"), "--prompt", "make the square yellow",
                                      "--image", str(root / "sources" / "green.png"), "--keep-size",
                                      "--best-of-tree", "--reward", "preservation", "--branch-factor", "2",
                                      "--window-width", "2", "--steps", "4", "--height", "32", "--width", "32",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    score = float(result.output.split()[0])
    assert 0 < score <= 1 and (out / "grid.png").is_file()


def test_flux2_reference_run_trains_and_reloads(tmp_path_factory):
    """FLUX.2 [dev] with TWO reference images per prompt (a list in the line's "image"; optional for FLUX.2: every
    line or none): a 2-epoch run on the tiny pipeline saved to disk, rows of the formula (the references' tokens are
    none), the reward sees each line's first reference, and the exported LoRA in the stock `Flux2Pipeline` given
    both references in a fresh process edits as the trained model does; a file that gives references on some lines
    only, or different numbers of them, is refused in one line."""
    from diffusers_tree.testing import tiny_flux2_pipeline
    from treegrpo.recipe.preflight import preflight
    from treegrpo.sources import SourceImageError

    root = tmp_path_factory.mktemp("flux2_refs")
    tiny_flux2_pipeline().save_pretrained(root / "tiny_kontext")  # the recipe helper's folder name
    (root / "sources").mkdir()
    lines = []
    for name, colour in list(COLOURS.items())[:3]:
        Image.new("RGB", (64, 64), colour).save(root / "sources" / f"{name}.png")  # FLUX.2 takes 64 px and more
        lines.append({"prompt": f"a cat in {name}", "image": [f"sources/{name}.png", "sources/grey.png"]})
    Image.new("RGB", (64, 64), COLOURS["grey"]).save(root / "sources" / "grey.png")
    (root / "edits.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    (root / "edit_rewards.py").write_text(REWARD_MODULE)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.syspath_prepend(str(root))
        sys.modules.pop("edit_rewards", None)
        torch.set_num_threads(1)
        recipe = edit_recipe(root, extra=["sampling.max_sequence_length=48"])
        run = train_capturing(recipe)
        call = {**stock_call(run.pipe, run.sampling.as_kwargs()), "num_inference_steps": 5}
        sources = [root / "sources" / "green.png", root / "sources" / "grey.png"]
        with torch.no_grad():
            reference = run.pipe(image=[Image.open(p).convert("RGB") for p in sources], prompt="a cat in green",
                                 output_type="pt", generator=torch.Generator().manual_seed(0), **call).images
        (root / "mixed.jsonl").write_text(json.dumps(lines[0]) + "\n" + json.dumps({"prompt": "a cat"}) + "\n")
        mixed = load_recipe(root / "edit.toml", ['data.prompts="mixed.jsonl"', "data.eval_prompts=null"])
        with pytest.raises(SourceImageError, match=r"line 2 has no \"image\" but other lines do .* Flux2Pipeline "
                                                   r"takes a reference image on every line of a run or on none"):
            preflight(mixed)
        (root / "counts.jsonl").write_text(json.dumps(lines[0]) + "\n" + json.dumps(
            {"prompt": "a cat", "image": "sources/red.png"}) + "\n")
        counts = load_recipe(root / "edit.toml", ['data.prompts="counts.jsonl"', "data.eval_prompts=null"])
        with pytest.raises(SourceImageError, match=r"line 1 names 2 source image\(s\), line 2 1; one run's lines "
                                                   r"must name as many"):
            preflight(counts)
    seen = [json.loads(line) for line in (root / "seen.jsonl").read_text().splitlines()]
    assert {tuple(colour) for prompt, colour in seen} <= {COLOURS[n] for n in ("red", "green", "blue")}  # the first
    assert all(tuple(colour) == COLOURS[prompt.rsplit(" ", 1)[1]] for prompt, colour in seen)
    metrics = [json.loads(line) for line in (root / "edit" / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        assert m["model/rollout_rows"] == 2 * unique_rows(5, 2, 2, m["tree/window_start"])
        assert abs(m["policy/first_ratio_error"]) < 1e-4
    job = {"pipeline": "Flux2Pipeline", "model": str(root / "tiny_kontext"), "lora": str(root / "edit" / "final"),
           "sources": [str(p) for p in sources], "prompt": "a cat in green", "out": str(root / "loaded.pt"),
           "call": {k: v for k, v in call.items() if v is not None}}
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, json.dumps(job)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(torch.load(job["out"]), reference, rtol=1e-4, atol=1e-4)
