"""The README as a newcomer reads it: every Python snippet runs (hub ids and CUDA swapped for a tiny local model and
the CPU, each swap asserted so an edited snippet fails here), the test command installs what it needs (as `.ci/run`
does), a typo in a recipe is reported without importing diffusers, and a wrong `--lora` fails before any model
loads. The main command (`treegrpo run recipes/digits.toml`) is run, shortened, by test_digits_recipe.py."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .treegrpo.conftest import REWARD_MODULE, write_recipe

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SD35 = '"stabilityai/stable-diffusion-3.5-medium", dtype=torch.bfloat16'


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.fixture(scope="module")
def tiny_model_and_lora(tmp_path_factory):
    """A tiny SD3 pipeline on disk and a LoRA trained on it by the real trainer (1 epoch)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers_tree.testing import tiny_sd3_pipeline
    from treegrpo.recipe.loading import load_recipe
    from treegrpo.run.reporting import Reporter
    from treegrpo.train.trainer import train

    folder = tmp_path_factory.mktemp("readme")
    tiny_sd3_pipeline().save_pretrained(folder / "tiny_sd3")
    (folder / "prompts.txt").write_text("a red fox in snow\n")
    (folder / "test_rewards.py").write_text(REWARD_MODULE)
    recipe = write_recipe(folder, folder / "tiny_sd3", epochs=1)
    overrides = [f'reward.0.function="{folder / "test_rewards.py"}:brightness"', "data.prompts_per_epoch=1"]
    train(load_recipe(recipe, overrides), reporter=Reporter(enabled=False))
    digits = [f'output.dir="{folder / "digits"}"', "train.epochs=1", "output.samples=false", 'output.log_with="none"']
    train(load_recipe(ROOT / "recipes" / "digits.toml", digits), reporter=Reporter(enabled=False))
    return folder / "tiny_sd3", folder / "run" / "final", folder / "digits" / "final"


def test_every_python_snippet_runs(tiny_model_and_lora, tmp_path, monkeypatch):
    model, lora, digits_lora = tiny_model_and_lora
    monkeypatch.chdir(tmp_path)
    swaps = {  # what only a GPU and the Hub have -> the tiny local model on the CPU
        SD35: f'"{model}", dtype=torch.float32',
        '.to("cuda")': '.to("cpu")',
        '"runs/sd35m_hps/final"': f'"{lora}"',
        '"runs/digits/final"': f'"{digits_lora}"',  # the quickstart's run, shortened to one epoch
    }
    blocks = _blocks("python")
    assert len(blocks) == 5, "README's Python snippets changed: update this test's swaps"
    namespace: dict = {}
    for number, block in enumerate(blocks, 1):
        code = block
        for old, new in swaps.items():
            code = code.replace(old, new)
        assert "stabilityai/" not in code and '"cuda"' not in code, f"snippet {number} needs a swap"
        exec(compile(code, f"README.md python snippet {number}", "exec"), namespace)  # noqa: S102
    # the last snippet (tiny pipeline) printed 27 leaves; check the objects the snippets promise
    assert len(namespace["digits"]) == 4 and namespace["digits"][0].size == (16, 16)
    assert len(namespace["images"]) == 27 and len(namespace["out"].images) == 27
    assert namespace["out"].rows == 300
    assert len(namespace["best"].images) == 1


def test_the_install_lines_get_the_cpu_build_and_ci_runs_the_test_command():
    quickstart = _blocks("bash")[0]
    cpu_torch = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    assert quickstart.startswith(cpu_torch + " && pip install -e .")
    assert "treegrpo run recipes/digits.toml" in quickstart
    tests = "python -m pytest -x -q -n auto --dist worksteal tests"  # one worker per core (tests/conftest.py)
    (command,) = [b for b in _blocks("bash") if "pytest" in b]
    assert command.strip() == f'{cpu_torch} && pip install -e ".[dev]" && {tests}'
    ci = (ROOT / ".ci" / "run").read_text()
    # CI installs torch from its own CPU wheel (PyTorch's index is unreachable there), then exactly the rest
    assert 'pip install -e ".[dev]"' in ci and tests in ci and "torch==2.13.0" in ci
    assert "python .ci/check_install.py" in ci


def test_a_recipe_typo_is_reported_without_importing_diffusers(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text((ROOT / "recipes" / "digits.toml").read_text())
    code = ("import sys; from treegrpo.app import main; sys.argv = ['treegrpo', 'check', sys.argv[1], '--set', "
            "'tree.brnch_factor=2']\ntry:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "print(code, 'diffusers' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.stdout.split()[-3:] == ["2", "False", "False"], done.stdout + done.stderr
    assert "brnch_factor" in done.stderr


def test_a_wrong_lora_fails_before_any_model_loads(monkeypatch):
    from typer.testing import CliRunner

    import treegrpo.commands.inference
    from treegrpo.app import app

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the --lora argument was checked")

    monkeypatch.setattr(treegrpo.commands.inference, "load_pipeline", no_loading)
    monkeypatch.setattr(treegrpo.commands.inference, "build_rewards", no_loading)
    result = CliRunner().invoke(app, ["eval", "builtin:digits", "--lora", "runs/nope/final", "--reward", "digits",
                                      "--prompt", "a handwritten digit one"])
    assert result.exit_code == 2 and "runs/nope/final" in result.output and "no such file" in result.output
    result = CliRunner().invoke(app, ["sample", "builtin:digits", "--lora", "runs/nope/final", "--prompt", "a"])
    assert result.exit_code == 2 and "no such file" in result.output


def test_diversity_is_the_mean_pairwise_rms_pixel_distance():
    import numpy as np
    from PIL import Image

    from treegrpo.commands.inference import within_prompt_diversity

    black, white = (Image.fromarray(np.full((4, 4, 3), v, dtype=np.uint8)) for v in (0, 255))
    # prompt 0: three identical images -> 0; prompt 1: black, black, white -> pairs (0, 1, 1) of 6 ordered -> 2/3
    diversity = within_prompt_diversity([black, black, black, black, black, white], num_images=3)
    assert diversity.tolist() == pytest.approx([0.0, 2 / 3])
