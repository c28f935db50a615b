"""`treegrpo sample` (plain, best-of-tree, pruned) and `treegrpo eval` on a tiny pipeline saved to disk."""

import json

import pytest
from typer.testing import CliRunner

from treegrpo.app import app

runner = CliRunner()
TINY = ["--steps", "5", "--seed", "1"]


def test_sample_plain_writes_images_and_grid(workdir, tiny_sd3_dir):
    out = workdir / "s"
    result = runner.invoke(app, ["sample", str(tiny_sd3_dir), "--prompt", "a red cat", "--prompt", "a dog",
                                 "--num-images", "2", "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("00*.png"))) == 4 and (out / "grid.png").is_file()


def test_sample_best_of_tree_and_beam(workdir, tiny_sd3_dir):
    for extra in (["--best-of-tree"], ["--beam", "2"]):
        out = workdir / extra[0].strip("-")
        result = runner.invoke(app, ["sample", str(tiny_sd3_dir), "--prompt", "a red cat", "--out", str(out),
                                     "--reward", "python:function=test_rewards:brightness", "--window-start", "1",
                                     "--branch-factor", "2", *extra, *TINY])
        assert result.exit_code == 0, result.output
        assert (out / "grid.png").is_file() and "denoiser rows" in result.output


def test_best_of_tree_with_a_tail_solver_counts_fewer_rows(workdir, tiny_sd3_dir):
    """k 2, w 3, s 1, T 8: the exact tail costs 1 + 7 + 8·4 rows per tree, a 1-step tail 1 + 7 + 8·1."""
    rows = {}
    for tail in ([], ["--tail-steps", "1"]):
        result = runner.invoke(app, ["sample", str(tiny_sd3_dir), "--prompt", "a red cat", "--out",
                                     str(workdir / f"t{len(tail)}"),
                                     "--reward", "python:function=test_rewards:brightness",
                                     "--best-of-tree", "--window-start", "1", "--branch-factor", "2", "--steps", "8",
                                     "--seed", "1", *tail])
        assert result.exit_code == 0, result.output
        rows[len(tail)] = int(result.output.split("best-of-tree: ")[1].split()[0])
    cfg = rows[0] // 40
    assert cfg in (1, 2) and rows == {0: 40 * cfg, 2: 16 * cfg}


def test_sample_errors_exit_2(workdir, tiny_sd3_dir):
    assert runner.invoke(app, ["sample", str(tiny_sd3_dir), *TINY]).exit_code == 2  # no prompts
    result = runner.invoke(app, ["sample", str(tiny_sd3_dir), "--prompt", "x", "--best-of-tree", *TINY])
    assert result.exit_code == 2 and "--reward" in result.output
    result = runner.invoke(app, ["sample", "/no/such/model", "--prompt", "x"])
    assert result.exit_code == 2 and "neither a diffusers folder" in result.output


def test_eval_table_and_json(workdir, tiny_sd3_dir):
    out = workdir / "eval.json"
    result = runner.invoke(app, ["eval", str(tiny_sd3_dir), "--prompts", str(workdir / "prompts.txt"),
                                 "--reward", "jpeg", "--reward", "python:function=test_rewards:brightness",
                                 "--num-images", "2", "--json", str(out), *TINY])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["results"]["base"]) == {"jpeg", "brightness", "diversity"}
    assert data["results"]["base"]["brightness"]["n"] == 8
    assert data["results"]["base"]["diversity"]["n"] == 4 and data["results"]["base"]["diversity"]["mean"] > 0
    assert "brightness" in result.output and "diversity" in result.output
    bad = runner.invoke(app, ["eval", str(tiny_sd3_dir), "--prompt", "x", "--reward", "jpeg:quality"])
    assert bad.exit_code == 2 and "key=value" in bad.output


def test_eval_loads_the_model_once_in_the_asked_dtype(workdir, tiny_sd3_dir, monkeypatch):
    import treegrpo.commands.inference

    from .conftest import write_recipe

    assert runner.invoke(app, ["run", str(write_recipe(workdir, tiny_sd3_dir, epochs=1))]).exit_code == 0
    loads = []
    original = treegrpo.commands.inference.load_pipeline

    def counting(model, **kwargs):
        loads.append(kwargs.get("dtype"))
        return original(model, **kwargs)

    monkeypatch.setattr(treegrpo.commands.inference, "load_pipeline", counting)
    out = workdir / "eval.json"
    result = runner.invoke(app, ["eval", str(tiny_sd3_dir), "--lora", str(workdir / "run" / "final"), "--prompt",
                                 "a red cat", "--reward", "jpeg", "--num-images", "2", "--dtype", "bf16",
                                 "--json", str(out), *TINY])
    assert result.exit_code == 0, result.output
    assert loads == ["bf16"]  # base and base + LoRA from one load
    data = json.loads(out.read_text())
    assert data["dtype"] == "bf16" and set(data["results"]) == {"base", "lora"}
    bad = runner.invoke(app, ["eval", str(tiny_sd3_dir), "--prompt", "x", "--reward", "jpeg", "--dtype", "fp64"])
    assert bad.exit_code == 2 and "--dtype 'fp64'" in bad.output



def test_verbose_shows_library_warnings(monkeypatch):
    import logging

    import transformers

    import treegrpo.app

    monkeypatch.setattr(treegrpo.app, "VERBOSE", [False])
    assert runner.invoke(app, ["--verbose", "info"]).exit_code == 0 and treegrpo.app.VERBOSE == [True]
    treegrpo.app._quiet_libraries()
    assert transformers.utils.logging.get_verbosity() == logging.WARNING
    treegrpo.app.VERBOSE[0] = False
    treegrpo.app._quiet_libraries()
    assert transformers.utils.logging.get_verbosity() == logging.ERROR


def test_sample_refuses_a_video_model_in_one_line(workdir):
    from diffusers_tree.testing import TINY_PIPELINES

    TINY_PIPELINES["wan"][0]().save_pretrained(workdir / "tiny_wan")
    result = runner.invoke(app, ["sample", str(workdir / "tiny_wan"), "--prompt", "a red cat", *TINY])
    assert result.exit_code == 2 and "is a video model (WanPipeline)" in result.output
    assert "Traceback" not in result.output


def test_best_of_tree_takes_a_children_per_step_shape(workdir, tiny_sd3_dir):
    """`--branch-factor 9,3` is the digits recipe's shape: 27 leaves over a 2-step window; rows as the plan says."""
    result = runner.invoke(app, ["sample", str(tiny_sd3_dir), "--prompt", "a red cat", "--out", str(workdir / "b"),
                                 "--reward", "python:function=test_rewards:brightness", "--best-of-tree",
                                 "--window-start", "1", "--branch-factor", "3,2", "--steps", "5", "--seed", "1"])
    assert result.exit_code == 0, result.output
    rows = int(result.output.split("best-of-tree: ")[1].split()[0])
    per_cfg_half = 1 + 1 + 3 + 6 * 2  # step 0; window steps 1 (1 node) and 2 (3 nodes); 6 leaves × 2 tail steps
    assert rows in (per_cfg_half, 2 * per_cfg_half)
    bad = runner.invoke(app, ["sample", str(tiny_sd3_dir), "--prompt", "x", "--branch-factor", "nine"])
    assert bad.exit_code == 2 and "--branch-factor 'nine': give a whole number" in bad.output


def test_sample_names_the_model_argument_not_a_recipe_key():
    result = runner.invoke(app, ["sample", "builtin:nope", "--prompt", "x"])
    assert result.exit_code == 2
    assert "MODEL = 'builtin:nope': unknown built-in model" in result.output
    assert "model.pretrained" not in result.output


def test_eval_reports_each_phase_and_prompt(tiny_sd3_dir):
    """`eval` printed nothing for up to 1.5 minutes; the CLI's bar is fed by these calls."""
    from treegrpo.commands.inference import EvalProgress, Settings, evaluate

    class Recorder(EvalProgress):
        def __init__(self):
            self.events = []

        def phase(self, name, total):
            self.events.append((name, total))

        def advance(self):
            self.events.append("prompt")

    recorder = Recorder()
    evaluate(str(tiny_sd3_dir), ["a cat", "a dog"], ["python:function=test_rewards:brightness"], lora=None,
             num_images=1, settings=Settings(steps=2, seed=0), progress=recorder)
    assert recorder.events == [(f"loading {tiny_sd3_dir}", None), ("sampling base", 2), "prompt", "prompt",
                               ("scoring base", None)]


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_and_eval_choose_cpu_threads_like_run(workdir, tiny_sd3_dir, monkeypatch, command):
    """Under load `eval` ran 10x slower than with the free cores' thread count (93 s vs 8.9 s): the same policy as
    `run` (treegrpo.run.threads) now applies to every command that computes."""
    import treegrpo.run.threads

    calls = []
    monkeypatch.setattr(treegrpo.run.threads, "apply_cpu_threads", lambda *args, **kwargs: calls.append(args))
    args = [command, str(tiny_sd3_dir), "--prompt", "a cat", "--num-images", "1", "--steps", "2"]
    args += ["--out", str(workdir / "o")] if command == "sample" else ["--reward", "jpeg"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls == [(None,)]
