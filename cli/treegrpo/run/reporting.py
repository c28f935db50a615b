"""Console output of a run: a rich progress bar over epochs with the current phase, one summary line per epoch,
loud warnings. Only the main process prints."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

logger = logging.getLogger("treegrpo")


class Reporter:
    def __init__(self, console: Console | None = None, enabled: bool | None = None):
        # soft_wrap: one line stays one line in SLURM logs and pipes (rich wraps at 80 columns when not a terminal)
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.enabled = int(os.environ.get("RANK", "0")) == 0 if enabled is None else enabled
        self._progress: Progress | None = None
        self._task = None
        self.current_phase = "setup"  # what the run is doing now, for errors that name it (out of memory)

    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)

    def warn(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[bold yellow]WARNING[/]: {message}")
        logger.warning(message)

    def phase(self, name: str) -> None:
        self.current_phase = name
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, phase=name)

    @contextmanager
    def epochs(self, total: int, start: int):
        reporter = self

        class _Epochs:
            def epoch_done(self, metrics: dict) -> None:
                reporter.info(summary_line(metrics, total))
                if reporter._progress is not None:
                    reporter._progress.advance(reporter._task)

        if not self.enabled:
            yield _Epochs()
            return
        columns = [TextColumn("[bold]epochs"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[phase]}"),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        # rich estimates speed from the last `speed_estimate_period` seconds (30 by default): with epochs longer than
        # that it never has two samples and the ETA stays "-:--:--". Use the whole run.
        with Progress(*columns, console=self.console, transient=True, speed_estimate_period=7 * 24 * 3600) as progress:
            self._progress = progress
            self._task = progress.add_task("epochs", total=total, completed=start, phase="")
            try:
                yield _Epochs()
            finally:
                self._progress, self._task = None, None


def summary_line(m: dict, total: int) -> str:
    """One labelled line under 80 columns; everything else is in metrics.jsonl:
    `epoch 3/20  reward 0.512 ± 0.210  acc 0.85  ratio 1.000  window 2  2.1 s`"""
    accuracy = next((value for key, value in m.items() if key.endswith("/accuracy")), None)
    return (f"epoch {m['epoch'] + 1}/{total}  reward {m['reward/mean']:.3f} ± {m['reward/std']:.3f}"
            + (f"  acc {accuracy:.2f}" if accuracy is not None else "")
            + f"  ratio {m['policy/ratio_mean']:.3f}  window {m['tree/window_start']}  {m['time/epoch_s']:.1f} s")
