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
