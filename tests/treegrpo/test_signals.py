"""Stop signals: the first one is deferred to a safe point while training, a second one (or one during setup) stops
at once; SIGHUP and SIGTERM behave like Ctrl-C; a signal during the final export lets the export finish."""

import os
import signal

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import treegrpo.app  # noqa: E402
import treegrpo.train.export  # noqa: E402
import treegrpo.train.trainer  # noqa: E402
from treegrpo.app import app  # noqa: E402
from treegrpo.run.signals import StopNow, StopSignals, exit_code  # noqa: E402

from .conftest import write_recipe  # noqa: E402

runner = CliRunner()


def test_first_signal_is_deferred_and_a_second_stops_at_once():
    notes = []
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN in a background job
    signals = StopSignals(notify=notes.append).install()
    try:
        signals.deferred = True
        os.kill(os.getpid(), signal.SIGHUP)
        assert signals.received == signal.SIGHUP and "SIGHUP received" in notes[0]
        with pytest.raises(StopNow) as stop:
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.value.args[0] == signal.SIGINT
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGINT) is before
    assert exit_code(signal.SIGTERM) == 143 and exit_code(signal.SIGHUP) == 129


def test_a_signal_during_setup_stops_at_once():
    signals = StopSignals(notify=lambda _: None).install()
    try:
        with pytest.raises(StopNow):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signals.restore()


def test_sigterm_while_loading_exits_143_with_nothing_written(workdir, tiny_sd3_dir, monkeypatch):
    original = treegrpo.app._preflight

    def preflight_then_sigterm(loaded, **kwargs):
        original(loaded, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(treegrpo.app, "_preflight", preflight_then_sigterm)
    result = runner.invoke(app, ["run", str(write_recipe(workdir, tiny_sd3_dir))])
    assert result.exit_code == 143, result.output
    assert "SIGTERM before training started; nothing was written" in result.output
    assert not (workdir / "run").exists()


def test_sigterm_during_the_final_export_lets_it_finish(workdir, tiny_sd3_dir, monkeypatch):
    original = treegrpo.train.trainer.save_lora
    calls = []

    def save_lora_with_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first call is the epoch-1 checkpoint's LoRA, the second the final export
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(treegrpo.train.trainer, "save_lora", save_lora_with_sigterm)  # checkpoints
    monkeypatch.setattr(treegrpo.train.export, "save_lora", save_lora_with_sigterm)  # final/ (and best/)
    # no evaluation: its best/ export would be the second save_lora call
    result = runner.invoke(app, ["run", str(write_recipe(workdir, tiny_sd3_dir, epochs=1)),
                                 "--set", "evaluation.enabled=false"])
    assert result.exit_code == 0, result.output
    assert "SIGTERM arrived during the final export; the export completed" in result.output
    assert (workdir / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_ctrl_c_with_the_output_piped_to_a_reader_that_dies_still_checkpoints(workdir, tiny_sd3_dir):
    """`treegrpo run ... 2>&1 | tee log` and Ctrl-C: tee dies first, and the next write to the pipe (the signal's
    own notice) ended the run with no checkpoint (17 epochs lost in the trial). Here the reader closes the pipe, then
    SIGINT arrives; the run must still reach its safe point, write the checkpoint and exit 130."""
    import subprocess
    import sys

    recipe = write_recipe(workdir, tiny_sd3_dir, epochs=500)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "treegrpo", "run", str(recipe), "--set",
                             "output.checkpoint_every=1000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("epoch 2/"):
                break
        assert seen and seen[-1].startswith("epoch 2/"), "".join(seen)[-3000:]
        proc.stdout.close()  # the reader dies first, as tee does on Ctrl-C
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    checkpoints = sorted((workdir / "run" / "checkpoints").iterdir())
    assert checkpoints, "no checkpoint written"
    assert (checkpoints[-1] / "trainer_state.json").is_file()
