"""The trainer end to end on a tiny SD3 pipeline saved to disk: metrics, row counts, ratio = 1, LoRA export,
exact resume, micro-batch accumulation, baselines, failure behaviour."""

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from diffusers_tree import unique_rows  # noqa: E402
from treegrpo.app import app  # noqa: E402
from treegrpo.recipe.loading import load_recipe  # noqa: E402
from treegrpo.run.reporting import Reporter  # noqa: E402
from treegrpo.run.setup import setup  # noqa: E402
from treegrpo.train.trainer import run_epoch, train  # noqa: E402

from .conftest import write_recipe  # noqa: E402

SPEC_KEYS = {"epoch", "reward/mean", "reward/std", "tree/window_start", "policy/ratio_mean", "policy/clip_frac",
             "time/rollout_s", "time/train_s", "model/rollout_rows", "model/train_rows"}
QUIET = Reporter(enabled=False)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_end_to_end_metrics_rows_ratio(workdir, tiny_sd3_dir):
    recipe = load_recipe(write_recipe(workdir, tiny_sd3_dir, epochs=3), ["output.samples=true"])
    final = train(recipe, reporter=QUIET)
    metrics = read_metrics(workdir / "run")
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    for m in metrics:
        assert SPEC_KEYS <= set(m)
        # 2 prompts × unique nodes for this epoch's window start × 2 CFG halves (guidance 3 > 1)
        assert m["model/rollout_rows"] == 2 * unique_rows(5, 2, 2, m["tree/window_start"]) * 2
        # one forward per parent node: (k^w - 1)/(k - 1) = 3 parents per tree, × 2 CFG halves
        assert m["model/train_rows"] == 2 * 3 * 2 and m["model/trained_edges"] == 2 * 6
    assert metrics[0]["policy/first_ratio_error"] < 1e-5  # the first micro-batch re-scores the sampling policy
    assert abs(metrics[0]["policy/ratio_mean"] - 1) < 1e-5
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    assert (workdir / "run" / "recipe.resolved.toml").is_file() and (workdir / "run" / "reward_curve.png").is_file()
    samples = workdir / "run" / "samples"
    assert (samples / "before.png").is_file() and (samples / "final.png").is_file()
    # the resolved recipe is itself a valid recipe equal to the one that ran
    assert load_recipe(workdir / "run" / "recipe.resolved.toml") == recipe


def test_final_lora_loads_in_stock_pipeline_and_reproduces_trained_model(workdir, tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    from treegrpo.model.loading import save_lora

    recipe = load_recipe(write_recipe(workdir, tiny_sd3_dir), ["train.learning_rate=0.05"])
    run = setup(recipe, QUIET)
    for epoch in range(2):
        run_epoch(run, epoch)
    save_lora(run.pipe, run.denoiser, run.denoiser_name, workdir / "lora")
    kwargs = dict(prompt="a red cat", num_inference_steps=5, height=32, width=32, max_sequence_length=16,
                  guidance_scale=3.0, output_type="pt")
    trained = run.pipe(generator=torch.Generator().manual_seed(0), **kwargs).images

    stock = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    base = stock(generator=torch.Generator().manual_seed(0), **kwargs).images
    stock.load_lora_weights(workdir / "lora")
    assert stock.transformer.peft_config  # the adapter is really there (not silently ignored)
    loaded = stock(generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-4)
    assert (loaded - base).abs().max() > 1e-3  # and training changed the model


def test_resume_equals_uninterrupted_run(workdir, tiny_sd3_dir):
    full = load_recipe(write_recipe(workdir, tiny_sd3_dir, epochs=4, name="full.toml"),
                       [f"output.dir={json.dumps(str(workdir / 'full'))}"])
    train(full, reporter=QUIET)
    first = load_recipe(write_recipe(workdir, tiny_sd3_dir, epochs=2, name="half.toml"),
                        [f"output.dir={json.dumps(str(workdir / 'half'))}"])
    train(first, reporter=QUIET)
    second = load_recipe(workdir / "half.toml", [f"output.dir={json.dumps(str(workdir / 'half'))}", "train.epochs=4"])
    train(second, resume=True, reporter=QUIET)
    a = load_file(workdir / "full" / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(workdir / "half" / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7)
    assert [m["epoch"] for m in read_metrics(workdir / "half")] == [0, 1, 2, 3]
    full_rewards = [m["reward/mean"] for m in read_metrics(workdir / "full")]
    assert [m["reward/mean"] for m in read_metrics(workdir / "half")] == pytest.approx(full_rewards, abs=1e-6)


def test_micro_batches_accumulate_to_the_same_update(workdir, tiny_sd3_dir):
    weights = []
    for micro in (1, 64):
        out = json.dumps(str(workdir / str(micro)))
        recipe = load_recipe(write_recipe(workdir, tiny_sd3_dir, epochs=1),
                             [f"train.micro_batch_size={micro}", f"output.dir={out}"])
        train(recipe, reporter=QUIET)
        weights.append(load_file(workdir / str(micro) / "final" / "pytorch_lora_weights.safetensors"))
    for key in weights[0]:
        # Adam divides by sqrt(v): float-order noise in near-zero gradients moves a weight by ~1e-5 of lr = 1e-2
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-3, atol=2e-5)


@pytest.mark.parametrize("algorithm", ["flat", "mix"])
def test_baselines_in_the_same_loop(workdir, tiny_sd3_dir, algorithm):
    overrides = [f"tree.algorithm={json.dumps(algorithm)}", "tree.timestep_fraction=0.6"]
    recipe = load_recipe(write_recipe(workdir, tiny_sd3_dir, epochs=1), overrides)
    train(recipe, reporter=QUIET)
    (m,) = read_metrics(workdir / "run")
    if algorithm == "flat":  # 4 trajectories from one root, SDE at all 5 steps: 1 + 4·4 nodes per tree
        assert m["model/rollout_rows"] == 2 * (1 + 4 * 4) * 2
        # DanceGRPO's rule: int(0.6 · (5 − 1)) = 2 of steps 0..3 per trajectory (never the last); the shared root
        # edge counts once however many trajectories pick step 0
        assert 2 * (1 + 4 * 1) <= m["model/trained_edges"] <= 2 * 4 * 2
    else:  # split into 4 at the window start, SDE for 2 steps
        s = m["tree/window_start"]
        assert m["model/rollout_rows"] == 2 * (s + 1 + 4 * (5 - s - 1)) * 2
        assert m["model/trained_edges"] == 2 * 4 * 2
    assert abs(m["policy/ratio_mean"] - 1) < 1e-5


def test_ema_weights_are_exported(workdir, tiny_sd3_dir):
    recipe = load_recipe(write_recipe(workdir, tiny_sd3_dir, epochs=2), ["train.ema_decay=0.5"])
    train(recipe, reporter=QUIET)
    plain = load_recipe(write_recipe(workdir, tiny_sd3_dir, epochs=2, name="plain.toml"),
                        [f"output.dir={json.dumps(str(workdir / 'plain'))}"])
    train(plain, reporter=QUIET)
    ema = load_file(workdir / "run" / "final" / "pytorch_lora_weights.safetensors")
    raw = load_file(workdir / "plain" / "final" / "pytorch_lora_weights.safetensors")
    # same trajectory, but the export is the average: for lora_B (zero at init), after steps w1, w2:
    # ema = 0.5·(0.5·0 + 0.5·w1) + 0.5·w2, strictly between 0 and w2 where they move the same way
    key = next(k for k in raw if "lora_B" in k)
    assert not torch.allclose(ema[key], raw[key])
    assert ema[key].abs().sum() < raw[key].abs().sum()


def test_kl_to_reference_runs(workdir, tiny_sd3_dir):
    recipe = load_recipe(write_recipe(workdir, tiny_sd3_dir, epochs=2), ["train.kl_beta=0.1"])
    train(recipe, reporter=QUIET)
    metrics = read_metrics(workdir / "run")
    assert metrics[0]["policy/kl_ref"] == pytest.approx(0.0, abs=1e-8)  # LoRA B starts at zero: policy = reference
    assert metrics[1]["policy/kl_ref"] > 0


# ---- CLI failure behaviour ------------------------------------------------------------------------------------------
runner = CliRunner()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["tree.brnch_factor=2"], "unknown key 'tree.brnch_factor'"),
        (["data.prompts_per_epoch=0"], "data.prompts_per_epoch = 0"),
        (["tree.window_policy=\"fixed\"", "tree.window_start=4"], "tree.window_start=4 does not fit"),
        (["tree.window_width=5"], "window_width=5 must be smaller than sampling.num_inference_steps=5"),
        (["model.pretrained=\"/nowhere/model\""], "neither a diffusers folder"),
        (["reward.0.function=\"no_such_module:f\""], "no_such_module"),
        (["reward.0.kind=\"pikscore\""], "pickscore"),
        (["sampling.sde_type=\"euler\""], "sampling.sde_type"),
    ],
)
def test_bad_input_exits_2_with_one_line(workdir, tiny_sd3_dir, overrides, message):
    path = write_recipe(workdir, tiny_sd3_dir)
    args = ["run", str(path)] + [x for o in overrides for x in ("--set", o)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output


def test_missing_recipe_and_bad_override_exit_2(workdir):
    assert runner.invoke(app, ["check", "nope.toml"]).exit_code == 2
    path = workdir / "x.toml"
    path.write_text("[model\n")
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 2 and "not valid TOML" in result.output


def test_tail_solver_in_training(workdir, tiny_sd3_dir):
    """sampling.tail_steps = 1: the rows are the new schedule's unique nodes, training is untouched (ratio 1), and
    `check` states the tail."""
    recipe = load_recipe(write_recipe(workdir, tiny_sd3_dir, epochs=2),
                         ["sampling.tail_steps=1", "tree.window_policy=\"fixed\"", "tree.window_start=0"])
    train(recipe, reporter=QUIET)
    for m in read_metrics(workdir / "run"):
        assert m["tree/window_start"] == 0
        assert m["model/rollout_rows"] == 2 * unique_rows(5, 2, 2, 0, tail_steps=1) * 2 == 2 * (0 + 3 + 4 * 1) * 2
        assert m["model/train_rows"] == 2 * 3 * 2
        assert m["policy/first_ratio_error"] < 1e-5
    result = runner.invoke(app, ["check", str(write_recipe(workdir, tiny_sd3_dir)), "--set", "sampling.tail_steps=1"])
    assert result.exit_code == 0, result.output
    assert "at most 1 DPM-Solver++ steps (order 2)" in result.output


def test_check_prints_plan(workdir, tiny_sd3_dir):
    result = runner.invoke(app, ["check", str(write_recipe(workdir, tiny_sd3_dir)), "--set", "tree.branch_factor=3"])
    assert result.exit_code == 0, result.output
    assert re.search(r"leaves per prompt\s*│\s*9\s", result.output), result.output  # k^w = 3^2


def test_nan_reward_stops_with_exit_1_and_keeps_checkpoint(workdir, tiny_sd3_dir):
    bad = write_recipe(workdir, tiny_sd3_dir, epochs=3, function="nan_from_second_call")
    result = runner.invoke(app, ["run", str(bad)])
    assert result.exit_code == 1 and "non-finite" in result.output and "Traceback" not in result.output
    # the message names the checkpoint a resume starts from, which exists
    assert "epoch-000001 (1 epochs; continue with --resume)" in result.output, result.output
    assert (workdir / "run" / "checkpoints" / "epoch-000001" / "trainer_state.json").is_file()


def test_ctrl_c_checkpoints_and_exits_130(workdir, tiny_sd3_dir):
    path = write_recipe(workdir, tiny_sd3_dir, epochs=5, function="interrupt_on_second_epoch")
    result = runner.invoke(app, ["run", str(path), "--set", "output.checkpoint_every=10"])
    assert result.exit_code == 130, result.output
    # interrupted while scoring epoch 1: the checkpoint holds the 1 completed epoch, the model untouched since
    state = json.loads((workdir / "run" / "checkpoints" / "epoch-000001" / "trainer_state.json").read_text())
    assert state["epoch"] == 1
    resumed = runner.invoke(app, ["run", str(path), "--resume", "--set", "output.checkpoint_every=10"])
    assert resumed.exit_code == 0, resumed.output
    assert [m["epoch"] for m in read_metrics(workdir / "run")] == [0, 1, 2, 3, 4]


def test_mid_run_samples_and_checkpoint_lora_use_the_ema_weights(workdir, tiny_sd3_dir, monkeypatch):
    import treegrpo.train.trainer

    seen = []
    original = treegrpo.train.trainer.save_samples

    def spy(run, path, prompts, seed, sources=None):
        if path.name.startswith("epoch-"):  # a mid-run grid: the EMA weights must be the ones in the model
            seen.append(all(torch.equal(p, s.to(p.dtype)) for p, s in zip(run.params, run.ema.shadow, strict=True)))
        return original(run, path, prompts, seed, sources)

    monkeypatch.setattr(treegrpo.train.trainer, "save_samples", spy)
    recipe = load_recipe(write_recipe(workdir, tiny_sd3_dir, epochs=2),
                         ["train.ema_decay=0.5", "output.eval_every=1", "output.samples=true"])
    train(recipe, reporter=QUIET)
    assert seen == [True]
    # after 1 epoch from lora_B = 0: EMA B = 0.5 · trained B. The checkpoint's LoRA file (scale alpha/r = 2 baked in)
    # holds the EMA weights; accelerate's model state keeps the trained ones for an exact resume.
    folder = workdir / "run" / "checkpoints" / "epoch-000001"
    exported, trained = load_file(folder / "pytorch_lora_weights.safetensors"), \
        load_file(folder / "accelerate" / "model.safetensors")
    key = next(k for k in exported if "lora_B" in k)
    raw = trained[key.removeprefix("transformer.").replace(".lora_B.", ".lora_B.default.")]
    assert raw.abs().max() > 0
    torch.testing.assert_close(exported[key], 0.5 * 2 * raw, rtol=1e-5, atol=1e-7)


def test_run_logs_to_tensorboard_through_accelerate_with_the_recipe(workdir, tiny_sd3_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = load_recipe(write_recipe(workdir, tiny_sd3_dir, epochs=2),
                         ['output.log_with="tensorboard"', 'output.run_name="first-try"', "output.eval_every=1",
                          "output.samples=true"])
    train(recipe, reporter=QUIET)
    logs = workdir / "run" / "logs" / "treegrpo" / "first-try"
    events = EventAccumulator(str(logs), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("reward/mean")] == [0, 1]
    metrics = read_metrics(workdir / "run")
    assert [e.value for e in events.Scalars("reward/mean")] == pytest.approx([m["reward/mean"] for m in metrics])
    assert events.Tags()["images"] == ["samples"]  # the mid-run grid (epoch 1 of 2)
    # the recipe as hyperparameters (written by add_hparams into a sub-run)
    hparams = b"".join(p.read_bytes() for p in logs.rglob("events.out.tfevents.*"))
    assert b"tree.branch_factor" in hparams and b"train.learning_rate" in hparams


def test_a_tracker_that_is_not_installed_is_one_warning(workdir, tiny_sd3_dir):
    result = runner.invoke(app, ["run", str(write_recipe(workdir, tiny_sd3_dir, epochs=1)), "--set",
                                 'output.log_with="aim"'])
    assert result.exit_code == 0, result.output
    assert "output.log_with = 'aim', but aim is not installed" in result.output
