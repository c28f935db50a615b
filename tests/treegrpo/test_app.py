import sys

from typer.testing import CliRunner

import diffusers_tree
import treegrpo
from treegrpo.app import app
from treegrpo.commands.envinfo import NOT_INSTALLED, collect_env, package_version, torch_device

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


def test_help_reads_like_a_person_wrote_it():
    """Typer's default help showed `--resume <bool>`, `--set <list[str]>`, `<int range>`: flags take no
    placeholder, values a name that says what goes there."""
    for command in ("run", "check", "sample", "eval", "push", "reward-server"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output
        for placeholder in ("<bool>", "<list[str]>", "<int range>", "<str>  ", "<float>", "<path>  "):
            lines = [line for line in result.output.splitlines() if line.strip().startswith("--")]
            assert not [line for line in lines if placeholder in line], (command, placeholder, result.output)
    run_help = runner.invoke(app, ["run", "--help"]).output
    assert "--set KEY=VALUE" in run_help and "--resume  " in run_help


def test_usage_errors_are_one_error_line_like_every_other():
    """Through the console entry point (`main`), not CliRunner: Typer's boxed "Error" panel became one `error:`
    line with the command's help hint; a bare `treegrpo` prints the help."""
    import os
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for args, expected in ((["sample"], "error: Missing argument 'MODEL'. (see 'treegrpo sample --help')"),
                           (["run", "x.toml", "--nope"], "error: No such option: --nope")):
        done = subprocess.run([sys.executable, "-m", "treegrpo", *args], capture_output=True, text=True, env=env,
                              timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines()[0].startswith(expected), done.stderr
        assert "Traceback" not in done.stderr and "╭" not in done.stderr
    bare = subprocess.run([sys.executable, "-m", "treegrpo"], capture_output=True, text=True, env=env, timeout=120)
    assert bare.returncode == 0 and bare.stdout.startswith("Usage: treegrpo")


def test_check_counts_rows_with_the_models_own_cfg_rule(tmp_path):
    """`check` printed a generic CFG caveat naming Z-Image for every recipe and did not say whether its row count
    included the CFG doubling; a local model's family decides now."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "digits.toml"
    out = ["--set", f'output.dir="{tmp_path / "run"}"']
    plain = runner.invoke(app, ["check", str(recipe), *out], env={"COLUMNS": "250"})
    assert plain.exit_code == 0, plain.output
    line = next(x for x in plain.output.splitlines() if "rollout rows per epoch" in x)
    assert "1 row per node: no CFG for StableDiffusion3Pipeline at guidance 1.0" in line
    rows = int(line.split("│")[2].split()[0])
    guided = runner.invoke(app, ["check", str(recipe), *out, "--set", "sampling.guidance_scale=3.0"],
                           env={"COLUMNS": "250"})
    line = next(x for x in guided.output.splitlines() if "rollout rows per epoch" in x)
    assert "CFG halves included: StableDiffusion3Pipeline guides with CFG at guidance 3.0" in line
    assert abs(int(line.split("│")[2].split()[0]) - 2 * rows) <= 1  # twice the (rounded) average


def test_reward_server_bad_input_is_one_line():
    bad_dtype = runner.invoke(app, ["reward-server", "jpeg", "--dtype", "fp8"])
    assert bad_dtype.exit_code == 2 and "--dtype 'fp8': choose fp32, bf16 or fp16" in bad_dtype.output
    unknown = runner.invoke(app, ["reward-server", "jpg"])
    assert unknown.exit_code == 2 and "Unknown reward kind 'jpg'" in unknown.output
    assert "Traceback" not in unknown.output


def test_a_warning_is_printed_once():
    """The console shows a warning once; the `treegrpo` logger (for applications that configure logging) must not
    reach Python's last-resort handler, which printed every warning a second time (pytest's own log handler hides
    that in-process, so this runs a fresh interpreter)."""
    import subprocess

    code = "from treegrpo.run.reporting import Reporter; Reporter().warn('the reward is flat')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert (result.stdout + result.stderr).count("the reward is flat") == 1, result.stderr
