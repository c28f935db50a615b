"""`treegrpo push` against a loopback fake Hub, then a stock pipeline in a fresh process loads the LoRA by repo id
(online, then from the offline cache) and reproduces the trained model: SD3 and SD1.5 runs trained by the trainer.
Also: the model card, re-push, the errors (exit 2, one line), `load_lora_into`."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import treegrpo.train.trainer  # noqa: E402
from treegrpo.hub.lora import load_lora_into  # noqa: E402
from treegrpo.hub.push import push_run  # noqa: E402
from treegrpo.hub.summary import LORA_WEIGHT_NAME, LoraLoadError, read_run  # noqa: E402
from treegrpo.recipe.loading import load_recipe  # noqa: E402
from treegrpo.run.reporting import Reporter  # noqa: E402

from .conftest import REWARD_MODULE, write_recipe  # noqa: E402
from .fake_hub import FakeHub  # noqa: E402

PROMPT = "a red cat"
# per family: recipe overrides for the tiny run, the stock pipeline class, call kwargs of the comparison
FAMILIES = {
    "sd3": ([], "StableDiffusion3Pipeline",
            {"guidance_scale": 3.0, "max_sequence_length": 16}),
    "sd": (['sampling.guidance_scale=7.5', 'sampling.max_sequence_length=77'], "StableDiffusionPipeline",
           {"guidance_scale": 7.5}),
    "sdxl": (['sampling.guidance_scale=5.0'], "StableDiffusionXLPipeline", {"guidance_scale": 5.0}),
    "flux": ([], "FluxPipeline", {"max_sequence_length": 16}),
}
# Runs in a fresh process: stock pipeline + LoRA from the (fake or cached) Hub; writes what it computed.
LOAD_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)  # 2 threads spin-wait badly on a busy 2-core machine
    import diffusers
    diffusers.utils.logging.disable_progress_bar()
    spec = json.loads(sys.argv[1])
    results = {}
    for job in spec["jobs"]:
        pipe = getattr(diffusers, job["pipeline"]).from_pretrained(job["model"])
        pipe.set_progress_bar_config(disable=True)
        if job["how"] == "load_lora_into":
            from treegrpo.hub.lora import load_lora_into
            load_lora_into(pipe, job["lora"])
        elif job["how"] == "weight_name":
            pipe.load_lora_weights(job["lora"], weight_name="pytorch_lora_weights.safetensors")
        else:
            pipe.load_lora_weights(job["lora"])  # exactly what a user types
        denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
        args, kwargs = torch.load(job["inputs"])
        with torch.no_grad():
            out = denoiser(*args, **{**kwargs, "return_dict": False})[0]
            images = pipe(job["prompt"], generator=torch.Generator().manual_seed(0), output_type="pt",
                          **job["call"]).images
        torch.save({"denoiser": out, "images": images}, job["out"])
        results[job["out"]] = sum(1 for n, _ in denoiser.named_modules() if n.endswith(".lora_A"))
    print(json.dumps(results))
""")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and 2 threads spin-wait badly on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def call_kwargs(family):
    return dict(height=32, width=32, num_inference_steps=3, **FAMILIES[family][2])


def subprocess_env(home: Path, **extra) -> dict:
    """A child environment with the Hub settings chosen before huggingface_hub is imported there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1", **extra)
    return env


def treegrpo_cli(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "treegrpo", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=120)


def load_in_fresh_process(jobs, env) -> dict:
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, json.dumps({"jobs": jobs})], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_capturing(recipe):
    """Train with the real trainer and keep the trained pipeline (in memory, unexported) as the reference."""
    captured = {}
    original = treegrpo.train.trainer.finish

    def finish(run, *args, **kwargs):
        captured["run"] = run
        return original(run, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(treegrpo.train.trainer, "finish", finish)
        treegrpo.train.trainer.train(recipe, reporter=Reporter(enabled=False))
    return captured["run"]


def reference_outputs(run, family, folder: Path) -> dict:
    """Denoiser output on the fixed inputs of a pipeline call's first step, and the images, of the trained model."""
    pipe, denoiser, seen = run.pipe, run.denoiser, []

    def hook(module, args, kwargs):
        if not seen:
            seen.append(([a.clone() for a in args], {k: v.clone() if torch.is_tensor(v) else v
                                                     for k, v in kwargs.items() if k != "return_dict"}))

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt",
                      **call_kwargs(family)).images
    handle.remove()
    args, kwargs = seen[0]
    with torch.no_grad():
        out = denoiser(*args, **{**kwargs, "return_dict": False})[0]
    torch.save((args, kwargs), folder / f"{family}-inputs.pt")
    return {"denoiser": out, "images": images, "lora_layers": sum(1 for n, _ in denoiser.named_modules()
                                                                  if n.endswith(".lora_A"))}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with FakeHub(tmp_path_factory.mktemp("fake_hub")) as fake:
        yield fake


@pytest.fixture(scope="module")
def pushed(hub, tiny_sd3_dir, tmp_path_factory):
    """Train a tiny run of each family (SD3, SD1.5, SDXL, FLUX), push each with `treegrpo push` in subprocesses, load
    them back by repo
    id in a fresh process (online), then again with HF_HUB_OFFLINE=1 from the cache that load filled."""
    from diffusers_tree.testing import tiny_flux_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("hub_runs")
    (root / "prompts.txt").write_text(f"{PROMPT}\na blue dog\na green tree\na white house\n")
    (root / "test_rewards.py").write_text(REWARD_MODULE)
    models = {"sd3": tiny_sd3_dir, "sd": root / "tiny_sd", "sdxl": root / "tiny_sdxl", "flux": root / "tiny_flux"}
    tiny_sd_pipeline().save_pretrained(models["sd"])
    tiny_sdxl_pipeline().save_pretrained(models["sdxl"])
    tiny_flux_pipeline().save_pretrained(models["flux"])
    env = subprocess_env(root / "hf_home", HF_ENDPOINT=hub.url, HF_TOKEN=hub.token)
    state = {"root": root, "env": env, "models": models, "reference": {}, "push": {}, "cards": {}}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.syspath_prepend(str(root))
        sys.modules.pop("test_rewards", None)
        for family, (overrides, _, _) in FAMILIES.items():
            # evaluation as by default: the training reward judges ODE samples; eval.jsonl goes on the card
            path = write_recipe(root, models[family], epochs=2, name=f"{family}.toml", evaluation={})
            out = json.dumps(str(root / f"run-{family}"))
            recipe = load_recipe(path, [*overrides, f"output.dir={out}", "output.samples=true"])
            state["reference"][family] = reference_outputs(train_capturing(recipe), family, root)
    for family in FAMILIES:
        extra = ["--base-model", "user/tiny-sd3"] if family == "sd3" else []
        state["push"][family] = treegrpo_cli("push", root / f"run-{family}", "--repo", f"user/{family}-lora", *extra,
                                             env=env)
        assert state["push"][family].returncode == 0, state["push"][family].stderr
        state["cards"][family] = hub.file(f"user/{family}-lora", "README.md").decode()

    def jobs(how, tag):
        made = []
        for family, (_, pipeline, _) in FAMILIES.items():
            hows = [how, "load_lora_into"] if family == "sd3" else [how]
            made += [{"pipeline": pipeline, "model": str(models[family]), "lora": f"user/{family}-lora", "how": h,
                      "inputs": str(root / f"{family}-inputs.pt"), "out": str(root / f"{family}-{tag}-{h}.pt"),
                      "prompt": PROMPT, "call": call_kwargs(family), "family": family} for h in hows]
        return made

    state["online"] = jobs("stock", "online")
    state["online_counts"] = load_in_fresh_process(state["online"], env)
    # offline: the cache that the online load filled, and an endpoint where nothing listens
    offline_env = subprocess_env(root / "hf_home", HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    state["offline"] = jobs("weight_name", "offline")
    state["offline_counts"] = load_in_fresh_process(state["offline"], offline_env)
    return state


def check_reproduces(state, job, counts):
    family = job["family"]
    expected, got = state["reference"][family], torch.load(job["out"])
    assert counts[job["out"]] == expected["lora_layers"] > 0  # the adapter is really there
    torch.testing.assert_close(got["denoiser"], expected["denoiser"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["images"], expected["images"], rtol=1e-4, atol=1e-4)


def test_stock_pipeline_in_fresh_process_loads_repo_id_and_reproduces_training(pushed):
    assert {job["family"] for job in pushed["online"]} == {"sd3", "sd", "sdxl", "flux"}  # all four families
    for job in pushed["online"]:
        check_reproduces(pushed, job, pushed["online_counts"])


def test_offline_cache_with_weight_name_reproduces_training(pushed):
    for job in pushed["offline"]:
        check_reproduces(pushed, job, pushed["offline_counts"])
    # the offline path needs weight_name: without it diffusers must ask the Hub for the file list
    code = ("import diffusers, sys; p = diffusers.StableDiffusionPipeline.from_pretrained(sys.argv[1]); "
            "p.load_lora_weights('user/sd-lora')")
    env = subprocess_env(pushed["root"] / "hf_home", HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    done = subprocess.run([sys.executable, "-c", code, str(pushed["models"]["sd"])], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "weight_name" in done.stderr


def test_card_names_base_model_and_reads_as_adapter(pushed, hub):
    card = pushed["cards"]["sd3"]
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "user/tiny-sd3" and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert {"lora", "treegrpo", "sd3", "template:sd-lora", "diffusers-training"} <= set(meta["tags"])
    assert meta["widget"] == [{"text": PROMPT, "output": {"url": "samples/final.png"}}]  # the Hub's gallery
    # the local copy it was trained from is named, by its folder name only: no local paths on the Hub
    assert "`<local>/tiny_sd3`" in card or f"`<local>/{pushed['models']['sd3'].name}`" in card
    assert str(pushed["root"]) not in card and str(pushed["root"]) not in hub.file("user/sd3-lora",
                                                                                    "recipe.resolved.toml").decode()
    assert 'pretrained = "<local>/' in hub.file("user/sd3-lora", "recipe.resolved.toml").decode()
    assert "from diffusers import StableDiffusion3Pipeline" in card and 'load_lora_weights("user/sd3-lora")' in card
    assert "python" in card and "brightness" in card  # the reward
    metrics = [json.loads(x) for x in (pushed["root"] / "run-sd3" / "metrics.jsonl").read_text().splitlines()]
    assert f"{metrics[0]['reward/mean']:.4g} | {metrics[-1]['reward/mean']:.4g}" in card
    for image in ("samples/final.png", "samples/before.png", "reward_curve.png"):
        assert f"]({image})" in card
    evaluations = [json.loads(x) for x in (pushed["root"] / "run-sd3" / "eval.jsonl").read_text().splitlines()]
    judged = evaluations[0]["eval/python/mean"]  # the training reward judges when there is no [[eval_reward]]
    assert f"| `eval/python/mean` | {judged:.4g} | {evaluations[-1]['eval/python/mean']:.4g} |" in card
    files = hub.files("user/sd3-lora")
    assert {"README.md", LORA_WEIGHT_NAME, "recipe.resolved.toml", "metrics.jsonl", "eval.jsonl", "samples/final.png",
            "samples/before.png", "reward_curve.png"} <= set(files)
    assert hub.file("user/sd3-lora", LORA_WEIGHT_NAME) == \
        (pushed["root"] / "run-sd3" / "final" / LORA_WEIGHT_NAME).read_bytes()
    # a local base without --base-model: named in the text, and the card says how to link it
    sd_card = pushed["cards"]["sd"]
    assert "from diffusers import StableDiffusionPipeline" in sd_card and "--base-model" in sd_card
    assert f"<local>/{pushed['models']['sd'].name}" in sd_card and str(pushed["root"]) not in sd_card
    assert "stable-diffusion" in yaml.safe_load(sd_card.split("---")[1])["tags"]
    assert pushed["push"]["sd3"].stdout.strip().endswith("/user/sd3-lora")


def test_repush_updates_card_and_lora(pushed, hub):
    root, env = pushed["root"], pushed["env"]
    with pytest.MonkeyPatch.context() as patch:  # one more epoch on the SD1.5 run, then push again
        patch.chdir(root)
        patch.syspath_prepend(str(root))
        overrides = [*FAMILIES["sd"][0], f"output.dir={json.dumps(str(root / 'run-sd'))}", "train.epochs=3"]
        treegrpo.train.trainer.train(load_recipe(root / "sd.toml", overrides), resume=True,
                                     reporter=Reporter(enabled=False))
    before = hub.files("user/sd-lora")
    done = treegrpo_cli("push", root / "run-sd", "--repo", "user/sd-lora", env=env)
    assert done.returncode == 0, done.stderr
    card = hub.file("user/sd-lora", "README.md").decode()
    assert card != pushed["cards"]["sd"] and "| epochs | 3 |" in card
    last = json.loads((root / "run-sd" / "metrics.jsonl").read_text().splitlines()[-1])["reward/mean"]
    assert f"| {last:.4g} |" in card
    assert hub.files("user/sd-lora")[LORA_WEIGHT_NAME] != before[LORA_WEIGHT_NAME]
    assert hub.file("user/sd-lora", LORA_WEIGHT_NAME) == (root / "run-sd" / "final" / LORA_WEIGHT_NAME).read_bytes()


def test_push_to_revision_and_private(pushed, hub):
    done = treegrpo_cli("push", pushed["root"] / "run-sd3", "--repo", "user/branchy", "--revision", "v1",
                        "--private", env=pushed["env"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("/user/branchy/tree/v1")
    assert hub.repos["user/branchy"].private
    assert LORA_WEIGHT_NAME in hub.files("user/branchy", "v1") and LORA_WEIGHT_NAME not in hub.files("user/branchy")


@pytest.mark.parametrize("case,message", [
    ("not_logged_in", "not logged in"),
    ("bad_token", "rejected the token"),
    ("no_run_dir", "no such run folder"),
    ("no_lora", "no LoRA in"),
    ("bad_repo", "expected a Hub repo id"),
    ("other_namespace", "no write access"),
])
def test_push_errors_exit_2_with_one_line(pushed, tmp_path, case, message):
    run, repo, env = pushed["root"] / "run-sd3", "user/errors", dict(pushed["env"])
    if case == "not_logged_in":
        env = subprocess_env(tmp_path / "empty_home", HF_ENDPOINT=env["HF_ENDPOINT"])
    elif case == "bad_token":
        env["HF_TOKEN"] = "hf_wrong"
    elif case == "no_run_dir":
        run = tmp_path / "nowhere"
    elif case == "no_lora":
        run = tmp_path / "unfinished"
        run.mkdir()
        (run / "recipe.resolved.toml").write_text((pushed["root"] / "run-sd3" / "recipe.resolved.toml").read_text())
    elif case == "bad_repo":
        repo = "no-slash"
    else:
        repo = "someone-else/repo"
    done = treegrpo_cli("push", run, "--repo", repo, env=env)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("builtin", "pipeline_class", "loader"), [
    ("builtin:digits", "StableDiffusion3Pipeline", "load_digits_pipeline"),
    ("builtin:shapes", "FluxPipeline", "load_shapes_pipeline"),
])
def test_read_run_for_a_builtin_model_names_the_shipped_model(pushed, tmp_path, builtin, pipeline_class, loader):
    import shutil

    run = tmp_path / "builtin-run"
    shutil.copytree(pushed["root"] / "run-sd3", run, ignore=shutil.ignore_patterns("checkpoints"))
    recipe = (run / "recipe.resolved.toml").read_text()
    (run / "recipe.resolved.toml").write_text(recipe.replace(f'"{pushed["models"]["sd3"]}"', f'"{builtin}"'))
    summary = read_run(run)
    assert summary.family.pipeline_class == pipeline_class and summary.base_model is None
    from treegrpo.hub.card import model_card

    card = str(model_card(summary, "user/tiny"))
    assert builtin in card and "shipped with treegrpo" in card and loader in card


def test_load_lora_into_accepts_folders_files_and_rejects_junk(pushed, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    final = pushed["root"] / "run-sd3" / "final"
    for source in (final, final.parent, final / LORA_WEIGHT_NAME):  # folder, run folder, file
        pipe = StableDiffusion3Pipeline.from_pretrained(pushed["models"]["sd3"])
        assert load_lora_into(pipe, str(source)).startswith("default")
        assert pipe.transformer.peft_config
    pipe = StableDiffusion3Pipeline.from_pretrained(pushed["models"]["sd3"])
    with pytest.raises(LoraLoadError, match="no such file or folder"):
        load_lora_into(pipe, str(tmp_path / "missing" / "x"))
    with pytest.raises(LoraLoadError, match="no pytorch_lora_weights.safetensors"):
        load_lora_into(pipe, str(tmp_path))
    # a UNet LoRA into an SD3 pipeline: diffusers only logs a warning, we refuse
    with pytest.raises(LoraLoadError, match="recognizes"):
        load_lora_into(pipe, str(pushed["root"] / "run-sd" / "final"))
    # an SD3 LoRA into a FLUX pipeline: diffusers raises a shape error deep inside
    from diffusers_tree.testing import tiny_flux_pipeline

    with pytest.raises(LoraLoadError, match="FluxPipeline"):
        load_lora_into(tiny_flux_pipeline(), str(final))
    # a repo id offline that is not cached (this process has HF_HUB_OFFLINE=1)
    with pytest.raises(LoraLoadError, match="user/not-cached"):
        load_lora_into(pipe, "user/not-cached")


def test_push_run_python_api_not_logged_in(pushed, monkeypatch):
    import huggingface_hub

    from treegrpo.hub.summary import PushError

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PushError, match="hf auth login"):
        push_run(pushed["root"] / "run-sd3", "user/x")


def test_push_after_training_error_says_how_to_retry(tmp_path):
    from treegrpo.hub.push import push_after_training
    from treegrpo.hub.summary import PushError

    with pytest.raises(PushError, match=r"run itself is complete; retry with `treegrpo push .* --repo user/x`"):
        push_after_training(tmp_path / "missing", "user/x")


def test_base_model_hub_id_from_recipe_value():
    from treegrpo.hub.summary import _hub_id

    assert _hub_id("stabilityai/stable-diffusion-3.5-medium") == "stabilityai/stable-diffusion-3.5-medium"
    cache = "/root/.cache/huggingface/hub/models--black-forest-labs--FLUX.1-dev/snapshots/0123abcd"
    assert _hub_id(cache) == "black-forest-labs/FLUX.1-dev"
    assert _hub_id("/data/my-model") is None and _hub_id("builtin:digits") is None


def test_weight_name_constant_matches_the_exporter():
    import treegrpo.hub.summary
    import treegrpo.model.loading

    assert treegrpo.hub.summary.LORA_WEIGHT_NAME == treegrpo.model.loading.LORA_WEIGHT_NAME


def test_the_card_reads_each_family_from_its_adapter():
    """Family knowledge for the card lives in the adapters: every family declares its Hub tags, and a LoRA's keys
    are claimed by at most one family (FLUX.1 by its single-stream blocks, SD3 otherwise; UNet LoRAs by none)."""
    from diffusers_tree.adapters import registered_adapters
    from treegrpo.hub.summary import family_of

    for name, adapter in registered_adapters().items():
        family = family_of(name)
        assert adapter.hub_tags and family.tags == adapter.hub_tags and family.pipeline_class == name
    assert family_of("WanPipeline").task == "text-to-video" and family_of("FluxPipeline").task == "text-to-image"
    assert family_of("FluxPipeline").sequence_length and not family_of("StableDiffusionXLPipeline").sequence_length

    def claims(keys):
        return [name for name, adapter in registered_adapters().items() if adapter.claims_lora_keys(keys)]

    block = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    assert claims([block, "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"]) == ["FluxPipeline"]
    assert claims([block]) == ["StableDiffusion3Pipeline"]
    assert claims(["unet.down_blocks.0.attentions.0.to_q.lora_A.weight"]) == [] and claims([]) == []
