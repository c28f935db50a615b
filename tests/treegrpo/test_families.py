"""The families added after the first four (Qwen-Image, FLUX.2, Z-Image, SANA, Wan), end to end through the trainer:
a 2-epoch `treegrpo` run with a python reward on a tiny pipeline saved to disk in the real layout; the exported
LoRA loads into the family's stock pipeline in a fresh process and changes its output exactly as the trained model
does; the model card names the family."""

import json
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from diffusers_tree import unique_rows  # noqa: E402
from diffusers_tree.adapters import stock_call_kwargs  # noqa: E402
from diffusers_tree.testing import TINY_PIPELINES  # noqa: E402
from treegrpo.recipe.loading import load_recipe  # noqa: E402

from .conftest import REWARD_MODULE, write_recipe  # noqa: E402
from .test_hub import train_capturing  # noqa: E402

FIRST_FOUR = {"sd", "sdxl", "sd3", "flux"}  # covered by test_export.py and test_hub.py
NEW_FAMILIES = [family for family in TINY_PIPELINES if family not in FIRST_FOUR]
PROMPT = "a red cat"
# Runs in a fresh process: the stock pipeline from disk + load_lora_weights(run/final), as a user would
LOAD_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    import diffusers
    diffusers.utils.logging.disable_progress_bar()
    counts = {}
    for job in json.loads(sys.argv[1]):
        pipe = getattr(diffusers, job["pipeline"]).from_pretrained(job["model"])
        pipe.set_progress_bar_config(disable=True)
        args, kwargs = torch.load(job["inputs"])
        with torch.no_grad():
            base = pipe.transformer(*args, **{**kwargs, "return_dict": False})[0]
        pipe.load_lora_weights(job["lora"])
        with torch.no_grad():
            out = pipe.transformer(*args, **{**kwargs, "return_dict": False})[0]
            result = pipe(prompt=job["prompt"], generator=torch.Generator().manual_seed(0), output_type="pt",
                          **job["call"])
        images = result.images if hasattr(result, "images") else result.frames
        torch.save({"denoiser": out, "images": images, "base": base}, job["out"])
        counts[job["out"]] = sum(1 for n, _ in pipe.transformer.named_modules() if n.endswith(".lora_A"))
    print(json.dumps(counts))
""")


def call_kwargs(family) -> dict:
    """The stock pipeline's call with the tiny run's settings (write_recipe's guidance 3.0), as the CLI calls it."""
    return dict(height=32, width=32, num_inference_steps=3, guidance_scale=3.0, **TINY_PIPELINES[family][1])


def recipe_overrides(family) -> list[str]:
    """The family's tiny-pipeline call kwargs as recipe keys (token length, frames)."""
    return [f"sampling.{key}={json.dumps(value)}" for key, value in TINY_PIPELINES[family][1].items()
            if key in ("max_sequence_length", "num_frames")]


def clone(value):
    """Tensors copied inside lists and dicts (Z-Image's transformer takes lists of per-sample tensors)."""
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(clone(v) for v in value)
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    return value


def reference_outputs(run, family, folder) -> dict:
    """The trained model's denoiser output on the first step's inputs of a stock pipeline call, and its images."""
    pipe, denoiser, seen = run.pipe, run.denoiser, []

    def hook(module, args, kwargs):
        if not seen:
            seen.append((clone(list(args)), {k: clone(v) for k, v in kwargs.items() if k != "return_dict"}))

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        result = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt",
                      **stock_call_kwargs(pipe, call_kwargs(family)))
    handle.remove()
    args, kwargs = seen[0]
    with torch.no_grad():
        out = denoiser(*args, **{**kwargs, "return_dict": False})[0]
    torch.save((args, kwargs), folder / f"{family}-inputs.pt")
    images = result.images if hasattr(result, "images") else result.frames
    return {"denoiser": out, "images": images,
            "lora_layers": sum(1 for n, _ in denoiser.named_modules() if n.endswith(".lora_A"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each new family: a tiny pipeline saved to disk, 2 epochs of the real trainer, its reference outputs, then one
    fresh process that loads every exported LoRA into the stock pipeline."""
    root = tmp_path_factory.mktemp("families")
    (root / "prompts.txt").write_text(f"{PROMPT}\na blue dog\na green tree\na white house\n")
    (root / "test_rewards.py").write_text(REWARD_MODULE)
    state = {"root": root, "runs": {}, "reference": {}, "jobs": []}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.syspath_prepend(str(root))
        sys.modules.pop("test_rewards", None)
        torch.set_num_threads(1)
        for family in NEW_FAMILIES:
            model = root / f"tiny_{family}"
            pipe = TINY_PIPELINES[family][0]()
            pipe.save_pretrained(model)
            path = write_recipe(root, model, epochs=2, name=f"{family}.toml")
            recipe = load_recipe(path, [*recipe_overrides(family), f"output.dir={json.dumps(str(root / family))}",
                                        "output.samples=true"])
            run = train_capturing(recipe)
            state["runs"][family] = run
            state["reference"][family] = reference_outputs(run, family, root)
            state["jobs"].append({"pipeline": type(pipe).__name__, "model": str(model), "family": family,
                                  "lora": str(root / family / "final"), "inputs": str(root / f"{family}-inputs.pt"),
                                  "out": str(root / f"{family}-loaded.pt"), "prompt": PROMPT,
                                  "call": stock_call_kwargs(pipe, call_kwargs(family))})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, json.dumps(state["jobs"])], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state["counts"] = json.loads(done.stdout.strip().splitlines()[-1])
    return state


def test_every_new_family_is_covered():
    assert {"qwenimage", "sana", "zimage", "flux2", "wan"} <= set(NEW_FAMILIES)


def test_two_epoch_run_trains_every_family(trained):
    for family in NEW_FAMILIES:
        folder = trained["root"] / family
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in metrics] == [0, 1], family
        # rows: the unique-node count of the epoch's plan (2 prompts, T = 5, k = w = 2; × 2 where guidance 3 is CFG)
        run = trained["runs"][family]
        cfg = 2 if run.encode(["a red cat"]).do_cfg else 1
        for m in metrics:
            assert m["model/rollout_rows"] == 2 * cfg * unique_rows(5, 2, 2, m["tree/window_start"]), family
            assert abs(m["policy/first_ratio_error"]) < 1e-4, family  # ratio 1 before the first update
        assert (folder / "final" / "pytorch_lora_weights.safetensors").is_file(), family
        assert (folder / "samples" / "final.png").is_file(), family


def test_stock_pipeline_in_fresh_process_reproduces_every_trained_family(trained):
    for job in trained["jobs"]:
        expected, got = trained["reference"][job["family"]], torch.load(job["out"])
        assert trained["counts"][job["out"]] == expected["lora_layers"] > 0, job["family"]
        # Z-Image's transformer returns a list of per-sample outputs
        base, loaded, trained_out = (torch.stack(list(x)) if isinstance(x, (list, tuple)) else x
                                     for x in (got["base"], got["denoiser"], expected["denoiser"]))
        assert (base - trained_out).abs().max() > 1e-5, job["family"]  # training changed the denoiser
        torch.testing.assert_close(loaded, trained_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["images"], expected["images"], rtol=1e-4, atol=1e-4)


def test_card_names_the_family_and_video_task(trained):
    from treegrpo.hub.card import model_card
    from treegrpo.hub.summary import read_run

    for family in NEW_FAMILIES:
        summary = read_run(trained["root"] / family)
        card = str(model_card(summary, f"user/{family}-lora"))
        assert f"from diffusers import {summary.family.pipeline_class}" in card, family
        assert summary.family.name == family.removesuffix("_klein"), family
        if family == "wan":
            assert "pipeline_tag: text-to-video" in card and "export_to_video" in card
        else:
            assert "pipeline_tag: text-to-image" in card and ".images[0]" in card


def test_image_size_rule_comes_from_the_family(trained):
    """SANA's pipeline wants multiples of 32 pixels whatever its VAE (its adapter's pixels_per_patch): 48 fails at
    setup with one line, before any rollout."""
    from treegrpo.run.reporting import Reporter
    from treegrpo.run.setup import SetupError, setup

    root = trained["root"]
    recipe = load_recipe(root / "sana.toml", ["sampling.height=48", f"output.dir={json.dumps(str(root / 'bad'))}",
                                              *recipe_overrides("sana")])
    message = r"^sampling\.height=48: this SanaPipeline needs multiples of 32 pixels\.$"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        with pytest.raises(SetupError, match=message):
            setup(recipe, Reporter(enabled=False))
