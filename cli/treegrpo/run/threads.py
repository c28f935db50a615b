"""How many intra-op threads a CPU run uses.

torch starts with one thread per physical core. On a machine that is doing other work that is the slowest choice
for our many small ops: every op waits for all its threads, and a thread that lost its core to another process
stalls the rest (measured on 2 cores under load 3-6: the digits flat epoch took 72 s at 2 threads, 1.6 s at 1).
So a CPU run uses the cores that are free when it starts (cores it may run on, minus those other processes kept
busy over a short window, from /proc/stat; the 1-minute load average where that is missing), split between the
processes on this machine, at least 1 and never more than torch's default (physical cores).

An explicit choice always wins: `train.cpu_threads` in the recipe, else `OMP_NUM_THREADS` / `MKL_NUM_THREADS` in
the environment (then torch's own setting is left alone). GPU runs are not touched.

The count is part of a run's numerics (torch's CPU reductions split their work by thread: the same recipe and seed
gave weights differing by up to 0.018 at 1 and 2 threads), so the count a run starts with is recorded in its folder
(`cpu_threads.json`) and a `--resume` reuses it whatever the load then, unless an explicit choice overrides it
(which the run's first line then says).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

THREADS_FILE = "cpu_threads.json"  # in output.dir: the thread count the run started with


@dataclass(frozen=True)
class ThreadChoice:
    threads: int | None  # None: leave torch's setting alone
    reason: str


def choose_cpu_threads(*, recipe_threads: int | None, env: dict, usable_cores: int, load_average: float,
                       default_threads: int, local_processes: int = 1, recorded: int | None = None) -> ThreadChoice:
    """The thread count for a CPU run (pure: every input is an argument). `load_average` = cores busy with other
    work; `recorded` = the count a resumed run started with."""
    if recipe_threads is not None:
        return ThreadChoice(recipe_threads, "train.cpu_threads")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if env.get(name):
            return ThreadChoice(None, f"{name}={env[name]}")
    if recorded is not None:
        return ThreadChoice(recorded, f"as this run started, from {THREADS_FILE}, whatever the load now: the resumed "
                                      "run computes as the uninterrupted one")
    free = usable_cores - round(load_average)
    threads = max(1, min(default_threads, free // max(local_processes, 1)))
    return ThreadChoice(threads, f"{usable_cores} cores, {load_average:.1f} busy elsewhere, {local_processes} "
                                 "process(es) here")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def apply_cpu_threads(recipe_threads: int | None, local_processes: int = 1, recorded: int | None = None
                      ) -> ThreadChoice:
    """Choose for this machine now (or reuse `recorded`) and set torch's intra-op threads. Returns the choice, its
    reason saying so when an explicit choice differs from `recorded` (for the log line)."""
    import torch

    usable = usable_cores()
    load = busy_cores_now()
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    choice = choose_cpu_threads(recipe_threads=recipe_threads, env=dict(os.environ), usable_cores=usable,
                                load_average=load, default_threads=torch.get_num_threads(),
                                local_processes=local_processes, recorded=recorded)
    if choice.threads is not None:
        torch.set_num_threads(choice.threads)
    if recorded is not None and torch.get_num_threads() != recorded:
        return ThreadChoice(choice.threads, f"{choice.reason}; this run started with {recorded}, so its results "
                                            "will not match an uninterrupted run bit for bit")
    return choice


def recorded_cpu_threads(out_dir: Path) -> int | None:
    """The thread count recorded when the run in `out_dir` started, or None (no record, or not a valid one)."""
    try:
        value = json.loads((Path(out_dir) / THREADS_FILE).read_text()).get("cpu_threads")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def record_cpu_threads(out_dir: Path, threads: int) -> None:
    """Record the thread count a run starts with (main process, fresh starts)."""
    (Path(out_dir) / THREADS_FILE).write_text(json.dumps({"cpu_threads": threads}) + "\n")


def busy_cores_now(window_s: float = 0.3) -> float | None:
    """Cores kept busy by other processes over the next `window_s` (this process sleeps meanwhile), from the
    kernel's CPU time counters; None where /proc/stat is not available."""
    import time

    def counters() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = counters()
        time.sleep(window_s)
        total1, idle1 = counters()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)
