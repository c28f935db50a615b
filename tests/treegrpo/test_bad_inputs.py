"""Bad input: one readable line and exit code 2 (1 when training itself fails), never a traceback; `check` catches
what `run` would, except what needs the model's weights (LoRA targets), which `run` reports right after loading."""

import errno
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from treegrpo.app import app  # noqa: E402
from treegrpo.run.folder import RunLock  # noqa: E402

from .conftest import write_recipe  # noqa: E402

runner = CliRunner()

BAD_REWARDS = '''
import sys

def raises_key_error(images, prompts):
    raise KeyError("score")

def exits(images, prompts):
    sys.exit(0)
'''


def _one_error_line(result, code: int, expected: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert re.search(expected, errors[0]), errors[0]


@pytest.fixture
def recipe(workdir, tiny_sd3_dir):
    (workdir / "bad_rewards.py").write_text(BAD_REWARDS)
    return write_recipe(workdir, tiny_sd3_dir, epochs=1)


# (override or setup name, expected message) judged by `check` and by `run` alike, before any model loads
BEFORE_LOADING = [
    (["train.adam_betas=[2, -1]"], r"beta must be in \[0, 1\)"),
    (["train.seed=99999999999999999999"], r"train\.seed"),
    (["reward.0.weight=nan"], r"reward\.0\.weight"),
    (["train.learning_rate=inf"], r"train\.learning_rate"),
    (["tree.branch_factor=1000"], r"tree\.branch_factor"),
    (["tree.branch_factor=20", "tree.window_width=3"], r"8000 leaves per tree"),
    (["sampling.height=65536"], r"sampling\.height"),
    (['output.dir=""'], r"output\.dir"),
    (['tree.branch_factor="nine"'], r"tree\.branch_factor = 'nine': expected a whole number or a list of whole "
                                    r"numbers, e\.g\. \[9, 3\]"),
    (['train.learning_rate="3e-4"'], r"train\.learning_rate = '3e-4': a string; write the number without quotes "
                                     r"\(learning_rate = 3e-4\)"),
    (["sampling.height=17"], r"sampling\.height=17: this StableDiffusion3Pipeline needs multiples of 4"),
    (['data.prompts="missing.txt"'], r"data\.prompts = '/.+/missing\.txt': no such file \(a relative path in a "
                                     r"recipe is read from the current folder, else from the recipe's folder\)"),
    (['data.eval_prompts="missing.txt"'], r"data\.eval_prompts = '/.+/missing\.txt': no such file"),
    (['data.prompts="binary.txt"'], r"data\.prompts = 'binary\.txt' is not a UTF-8 text file"),
    (['data.prompts="long.txt"'], r"prompt 1 has 5000 characters"),
    (['model.pretrained="no_such_folder/x/y"'], r"model\.pretrained = 'no_such_folder/x/y' is neither"),
    (['model.pretrained="empty_model"'], r"lists no components"),
    (['reward.0.function="no_such_module:f"'], r"reward\.0\.function = 'no_such_module:f': cannot import"),
    (['output.dir="a_file"'], r"output\.dir = 'a_file' is a file"),
]


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("overrides, expected", BEFORE_LOADING, ids=[" ".join(o) for o, _ in BEFORE_LOADING])
def test_bad_values_and_files_are_one_line_before_loading(workdir, recipe, command, overrides, expected):
    (workdir / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    (workdir / "long.txt").write_text("x" * 5000 + "\n")
    (workdir / "empty_model").mkdir()
    (workdir / "empty_model" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (workdir / "a_file").write_text("not a folder")
    args = [command, str(recipe)] + [x for o in overrides for x in ("--set", o)]
    _one_error_line(runner.invoke(app, args), 2, expected)
    assert not (workdir / "run" / "checkpoints").exists()


@pytest.mark.parametrize("command", ["check", "run"])
def test_kl_with_full_fine_tuning_is_refused_before_loading(workdir, recipe, command):
    """The KL's reference is the model with its LoRA disabled; without [model.lora] the run crashed after the first
    rollout ('No adapter loaded')."""
    text = recipe.read_text().replace("[model.lora]\nrank = 4\nalpha = 8\n", "")
    assert "[model.lora]" not in text
    recipe.write_text(text)
    result = runner.invoke(app, [command, str(recipe), "--set", "train.kl_beta=0.01"])
    _one_error_line(result, 2, r"train\.kl_beta=0\.01 needs a reference policy.*\[model\.lora\]")
    assert not (workdir / "run" / "checkpoints").exists()


def test_recipe_that_is_binary_or_a_folder(workdir):
    (workdir / "binary.toml").write_bytes(b"\xff\xfe\x00garbage")
    _one_error_line(runner.invoke(app, ["check", str(workdir / "binary.toml")]), 2, "not a UTF-8 text file")
    _one_error_line(runner.invoke(app, ["run", str(workdir)]), 2, "is a folder")


def test_zero_processes_is_a_usage_error(recipe):
    result = runner.invoke(app, ["check", str(recipe), "--num-processes", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_bad_lora_target_names_the_family_default_after_loading(recipe):
    result = runner.invoke(app, ["run", str(recipe), "--set", 'model.lora.target_modules=["nope"]'])
    _one_error_line(result, 2, r"\['nope'\] not found in the transformer.*default for this family is \['to_q'")


@pytest.mark.parametrize("function, expected", [
    ("raises_key_error", r"reward 'python' failed: KeyError: 'score'"),
    ("exits", r"reward 'python' failed: SystemExit: 0"),
])
def test_a_failing_python_reward_stops_with_exit_1(recipe, function, expected):
    result = runner.invoke(app, ["run", str(recipe), "--set", f'reward.0.function="bad_rewards:{function}"'])
    _one_error_line(result, 1, expected)
    assert "no checkpoint has been written yet" in result.output


def test_one_run_per_folder(workdir, recipe):
    assert runner.invoke(app, ["run", str(recipe)]).exit_code == 0
    # a fresh run into a finished run's folder is refused, its files untouched
    before = (workdir / "run" / "metrics.jsonl").read_text()
    _one_error_line(runner.invoke(app, ["run", str(recipe)]), 2, r"already holds a run .*--resume.*--overwrite")
    assert (workdir / "run" / "metrics.jsonl").read_text() == before
    # resuming with a recipe that changes the trajectory says what differs
    result = runner.invoke(app, ["run", str(recipe), "--resume", "--set", "train.seed=1",
                                 "--set", "tree.branch_factor=3"])
    _one_error_line(result, 2, r"different recipe \(train\.seed: 0 → 1; tree\.branch_factor: 2 → 3\)")
    # a checkpoint written before a field existed (an older treegrpo) resumes when the field is at its default,
    # and says so when it is not
    import json

    state_file = sorted((workdir / "run" / "checkpoints").glob("epoch-*"))[-1] / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["recipe"]["sampling.auto_resize"], state["recipe"]["sampling.rollout_groups"]
    state_file.write_text(json.dumps(state))
    result = runner.invoke(app, ["run", str(recipe), "--resume", "--set", "sampling.auto_resize=false"])
    _one_error_line(result, 2, r"different recipe \(sampling\.auto_resize: 'unset' → False\)")
    assert runner.invoke(app, ["run", str(recipe), "--resume", "--set", "train.epochs=3"]).exit_code == 0
    # while another run holds the folder, nothing starts there
    lock = RunLock(workdir / "run").acquire()
    try:
        _one_error_line(runner.invoke(app, ["run", str(recipe), "--overwrite"]), 2, r"in use by another treegrpo run "
                        rf"\(pid {os.getpid()}")
    finally:
        lock.release()
    # --overwrite replaces it
    assert runner.invoke(app, ["run", str(recipe), "--overwrite"]).exit_code == 0


def test_refuses_to_write_through_a_symlink(workdir, recipe, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (workdir / "run").mkdir()
    (workdir / "run" / "final").symlink_to(elsewhere)
    _one_error_line(runner.invoke(app, ["run", str(recipe)]), 2, r"final is a symlink; refusing to write through it")
    assert list(elsewhere.iterdir()) == []


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_earlier_ones(workdir, tiny_sd3_dir, monkeypatch):
    import errno

    from accelerate import Accelerator

    original = Accelerator.save_state

    def full_disk_at_epoch_2(self, output_dir=None, **kwargs):
        if "epoch-000002" in str(output_dir):
            raise OSError(errno.ENOSPC, "No space left on device", str(output_dir))
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_disk_at_epoch_2)
    recipe = write_recipe(workdir, tiny_sd3_dir, epochs=3)
    result = runner.invoke(app, ["run", str(recipe)])
    _one_error_line(result, 1, r"could not write .*\.tmp-epoch-000002: No space left on device \(\d+\.\d+ GiB free")
    checkpoints = workdir / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch-000001"]  # temp folder removed
    assert "epoch-000001 (1 epochs; continue with --resume)" in result.output


def test_non_finite_weights_are_never_checkpointed(workdir, tiny_sd3_dir, monkeypatch):
    import treegrpo.train.trainer

    original = treegrpo.train.trainer.train_on_record

    def poisoned_update(**kwargs):
        stats = original(**kwargs)
        for param in kwargs["params"]:
            param.data.fill_(float("nan"))
        return stats

    monkeypatch.setattr(treegrpo.train.trainer, "train_on_record", poisoned_update)
    result = runner.invoke(app, ["run", str(write_recipe(workdir, tiny_sd3_dir, epochs=2))])
    _one_error_line(result, 1, r"non-finite trainable weights after 1 epochs.*no checkpoint has been written yet")
    checkpoints = workdir / "run" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


@pytest.mark.parametrize(("code", "refused"), [(errno.EWOULDBLOCK, True), (errno.ENOLCK, False),
                                               (errno.EOPNOTSUPP, False)])
def test_a_filesystem_without_locks_warns_instead_of_refusing_every_run(tmp_path, monkeypatch, caplog, code, refused):
    """A shared filesystem without flock (some NFS, Lustre, CIFS mounts) answered every run "in use by another
    treegrpo run (unknown process)"; only a lock held by someone else refuses now."""
    import fcntl

    from treegrpo.run.folder import RunFolderError

    def flock(handle, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock)
    if refused:
        with pytest.raises(RunFolderError, match="in use by another treegrpo run"):
            RunLock(tmp_path / "run").acquire()
        return
    with caplog.at_level("WARNING", logger="treegrpo.run.folder"):
        lock = RunLock(tmp_path / "run").acquire()
    assert "does not support file locks" in caplog.text and "start only one" in caplog.text
    lock.release()
