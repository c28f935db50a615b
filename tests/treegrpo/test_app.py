import sys

from typer.testing import CliRunner

import diffusers_tree
import treegrpo
from treegrpo.app import app
from treegrpo.envinfo import NOT_INSTALLED, collect_env, package_version, torch_device

runner = CliRunner()


def test_version_prints_both_package_versions():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"treegrpo {treegrpo.__version__} (diffusers_tree {diffusers_tree.__version__})"


def test_info_lists_packages_and_device():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    for name in ("python", "treegrpo", "diffusers_tree", "torch", "diffusers", "transformers", "accelerate", "peft"):
        assert name in result.output
    assert "cpu" in result.output  # the "cpu threads" row is always there; the device row says cpu on CI


def test_unknown_command_exits_with_code_2():
    result = runner.invoke(app, ["no-such-command"])
    assert result.exit_code == 2
    assert "no-such-command" in result.output


def test_missing_package_reads_not_installed(monkeypatch):
    assert package_version("surely-no-such-distribution-xyz") == NOT_INSTALLED
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    assert torch_device() == f"torch {NOT_INSTALLED}"
    assert {row.name for row in collect_env()} >= {"torch device", "cpu threads"}
