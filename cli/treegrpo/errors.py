"""The three ways a treegrpo command ends early, and their exit codes. Every error a command reports is one of them
(the finer classes, e.g. `RecipeError` or `CheckpointError`, subclass these and only say where it happened), so
`app.py` catches three classes, prints one line and exits with the code.

- `UsageError` (exit 2): the input cannot work: a recipe key, a file, an argument, a model that will not load, an
  output folder in use. Nothing was trained.
- `TrainingError` (exit 1): training itself failed: NaN/Inf, a failing reward, a failed write. The message names
  the checkpoint a `--resume` would start from.
- `Interrupted` (exit 128 + signal): a stop signal; the message says what is on disk.

Imports only the standard library: every module can raise these before the heavy imports.
"""

from __future__ import annotations

import signal


class UsageError(ValueError):
    """Bad input; the message says what is wrong, quoting the value, and what is allowed. Exit code 2."""

    exit_code = 2


class TrainingError(RuntimeError):
    """Training cannot continue (NaN/Inf in rewards, log-probs, loss or weights; a failing reward; a failed write).
    Exit code 1."""

    exit_code = 1


class Interrupted(Exception):
    """A stop signal (SIGINT/SIGTERM/SIGHUP) ended the run; `message` says what is on disk, `exit_code` is
    128 + the signal number (the shell's convention)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.message, self.exit_code = signum, message, 128 + int(signum)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name
