"""Stop signals: Ctrl-C (SIGINT), SIGTERM (what SLURM and Kubernetes send before preemption) and SIGHUP (a closed
terminal) all mean "stop": the first one lets the run checkpoint at the next safe point, a second one stops at once.

Exit codes are the shell's 128 + signal number: 130 (SIGINT), 143 (SIGTERM), 129 (SIGHUP). This module imports
only the standard library, so `treegrpo run` installs the handlers before the slow imports of torch and diffusers.
"""

from __future__ import annotations

import os
import signal
import sys

STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


def exit_code(signum: int) -> int:
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopNow(BaseException):  # noqa: N818  (like KeyboardInterrupt: not swallowed by `except Exception`)
    """Raised from the signal handler when the run must stop at once: a second signal, or a first one while there is
    nothing to checkpoint (setup). `args[0]` is the signal number."""


class StopSignals:
    """Records the first stop signal; while `deferred` is False (setup, before any training) or on a second signal,
    raises `StopNow` from the handler instead.

    Usage: `install()` once (main thread), set `deferred = True` while a checkpoint at the next safe point is
    possible, read `received` at safe points, `restore()` at the end."""

    def __init__(self, notify=None):
        self.received: int | None = None
        self.deferred = False
        self.notify = notify or (lambda message: print(message, file=sys.stderr, flush=True))
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner's worker): leave the defaults
                return self
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None or not self.deferred:
            self.received = self.received or signum
            raise StopNow(signum)
        self.received = signum
        self.notify(f"{signal_name(signum)} received: stopping after the current phase with a checkpoint "
                    "(send it again to stop at once).")


class SurvivingStream:
    """A text stream (`sys.stdout` / `sys.stderr`) whose writes never end the run when its reader is gone.

    `treegrpo run ... 2>&1 | tee log` and Ctrl-C: the terminal sends SIGINT to `tee` too, which dies first, and the
    next write to the pipe fails (EPIPE). rich answers that by raising SystemExit and `print` raises BrokenPipeError,
    from wherever the write happened (the signal handler's own notice included), so the run ended before its safe
    point with no checkpoint. Here the first failed write points the file descriptor at /dev/null (so C-level writes
    and the interpreter's flush at exit succeed too) and the run goes on silently to its checkpoint."""

    def __init__(self, stream):
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):  # BrokenPipeError, EIO of a closed terminal, a closed file
                self._to_devnull()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._to_devnull()

    def _to_devnull(self) -> None:
        self.broken = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the real stream's
        return getattr(self._stream, name)


def guard_output_streams() -> None:
    """Make `sys.stdout` and `sys.stderr` survive their readers (see `SurvivingStream`); idempotent."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, SurvivingStream):
            setattr(sys, name, SurvivingStream(stream))
