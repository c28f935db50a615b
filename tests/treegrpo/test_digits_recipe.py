"""The README's main command on the shipped digits model, shortened to 2 epochs (the full run is in
docs/benchmarks.md): it runs from the builtin model with no downloads and logs the digit accuracy."""

import json
import os
from pathlib import Path

from typer.testing import CliRunner

from treegrpo.app import app

ROOT = Path(__file__).resolve().parents[2]


def test_digits_recipe_runs_from_the_builtin_model(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = tmp_path / "digits"
    result = CliRunner().invoke(app, ["run", str(ROOT / "recipes" / "digits.toml"), "--set", "train.epochs=2",
                                      "--set", f"output.dir={json.dumps(str(out))}", "--set", "output.samples=false"])
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    # 10 digit prompts × one 27-leaf tree with (9, 3) children at its 2 window steps and a 3-step tail; no CFG at
    # guidance 1: rows = 10 · (s nodes before the window + 1 + 9 parents + 27 leaves × min(3, steps left))
    s = metrics[0]["tree/window_start"]
    assert metrics[0]["model/rollout_rows"] == 10 * (s + 10 + 27 * min(3, 10 - s - 2))
    assert metrics[0]["model/train_rows"] == 10 * 10
    assert 0.2 < metrics[0]["reward/digits/accuracy"] < 0.8  # the base model follows its prompt only partly
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    # judged during training by the strict judge and the judge, on ODE samples: the untrained model and the last epoch
    evaluations = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in evaluations] == [0, 2]
    assert all(row["eval/strict/accuracy"] <= row["eval/judge/accuracy"] for row in evaluations)
    assert json.loads((out / "best" / "best.json").read_text())["reward"] == "strict"

    # the README's comparison command on that LoRA (2 samples per digit here)
    import subprocess
    import sys

    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "digits_judged.py"), "--lora",
                            f"recipe={out / 'final'}", "--samples", "2", "--grid-dir", str(tmp_path / "grids")],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert table.returncode == 0, table.stderr
    assert "| digit | base | recipe |" in table.stdout and "| **all** |" in table.stdout
    assert (tmp_path / "grids" / "digits_recipe_grid.png").is_file()


def test_lora_steps_benchmark_switches_the_lora_at_exactly_the_listed_steps(tmp_path):
    """benchmarks/digits_lora_steps.py's claim rests on its switch: the denoiser sees the LoRA at the listed steps
    and no others (an off-by-one in the step callback would shift every row by a step), and the images with it on at
    every step are the LoRA model's."""
    import importlib.util

    import torch
    from peft import LoraConfig

    from treegrpo.builtin import load_digits_pipeline

    spec = importlib.util.spec_from_file_location("digits_lora_steps", ROOT / "benchmarks" / "digits_lora_steps.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pipe, meta = load_digits_pipeline()
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    with torch.no_grad():  # peft starts B at zero (a no-op LoRA); a random B makes the switch visible in the images
        for name, weight in pipe.transformer.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.05)
    pipe.set_progress_bar_config(disable=True)
    lora_layers = [m for m in pipe.transformer.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A")]
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(not lora_layers[0].disable_adapters))

    def sample(on):
        seen.clear()
        return bench.sample_with_lora_on(pipe, meta, on, "a handwritten digit four",
                                         [torch.Generator().manual_seed(j) for j in range(2)])

    steps = meta["pipeline_kwargs"]["num_inference_steps"]
    for on in ({0, 1, 2}, {4, 5, 6, 7, 8, 9}, {3}):
        sample(on)
        assert seen == [step in on for step in range(steps)], on
    assert not lora_layers[0].disable_adapters  # left on for whoever uses the pipeline next
    with torch.no_grad():
        lora = pipe("a handwritten digit four", num_images_per_prompt=2, output_type="pt",
                    generator=[torch.Generator().manual_seed(j) for j in range(2)], **meta["pipeline_kwargs"]).images
    torch.testing.assert_close(sample(set(range(steps))), lora, rtol=0, atol=0)
    assert (sample(set()) - lora).abs().max() > 1e-3  # the random LoRA changes the images: the switch matters
    assert set(bench.step_sets(steps)) == {"none", "all", "0-1", "0-2", "0-4", "2-9", "3-9", "5-9"}
