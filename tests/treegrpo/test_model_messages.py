"""A Hub model that will not load says which of the three it is: a typo (no such model), a gated licence not
accepted, or an offline machine without it in the cache; diffusers' own text says "not fully cached locally … check
out the root cause in the stacktrace above" for all three, with no stack trace. A run whose model did not load
leaves no output folder behind."""

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from treegrpo.app import app  # noqa: E402

from .conftest import write_recipe  # noqa: E402
from .fake_hub import FakeHub  # noqa: E402


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def _sample(model: str, env: dict) -> subprocess.CompletedProcess:
    # HF_ENDPOINT / HF_HUB_OFFLINE are read when huggingface_hub is imported: a fresh process per setting
    return subprocess.run([sys.executable, "-m", "treegrpo", "sample", model, "--prompt", "a cat"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_offline_and_not_cached(tmp_path):
    done = _sample("nosuchorg/nosuchmodel", {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert done.returncode == 2, done.stderr
    (line,) = _error_lines(done.stderr)
    assert line.startswith("error: MODEL = 'nosuchorg/nosuchmodel': not in the local Hub cache")
    assert "HF_HUB_OFFLINE=1" in line and "hf download nosuchorg/nosuchmodel" in line
    assert "stacktrace" not in done.stderr and "model.pretrained" not in done.stderr


@pytest.mark.parametrize("gated", [False, True])
def test_typo_or_gated_licence(tmp_path, gated):
    with FakeHub(tmp_path / "hub") as hub:
        if gated:
            hub.gated.add("org/licensed-model")
        done = _sample("org/licensed-model", {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url,
                                              "HF_HOME": str(tmp_path / "hf")})
    assert done.returncode == 2, done.stderr
    (line,) = _error_lines(done.stderr)
    if gated:
        assert f"a gated model: accept its licence at {hub.url}/org/licensed-model" in line
        assert "hf auth login" in line
    else:
        assert "no such model on the Hub. Check the spelling" in line


def test_a_run_whose_model_does_not_load_leaves_no_folder(workdir, tiny_sd3_dir, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # whatever imported it first
    recipe = write_recipe(workdir, tiny_sd3_dir)
    result = CliRunner().invoke(app, ["run", str(recipe), "--set", 'model.pretrained="nosuchorg/nosuchmodel"'])
    assert result.exit_code == 2, result.output
    (line,) = _error_lines(result.output)
    assert "model.pretrained = 'nosuchorg/nosuchmodel': not in the local Hub cache" in line
    assert not (workdir / "run").exists()  # it held only the lock file before
