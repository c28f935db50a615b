"""The whole suite takes its CPU threads like `treegrpo run` does (treegrpo.run.threads): on a busy machine torch's
default of one thread per core made the suite 5x slower (29 min vs 5 min 51 s idle). OMP_NUM_THREADS, when set (as
`.ci/run` does), still wins; under `pytest -n N` (the README's command) each worker takes its share of the cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    from treegrpo.run.threads import apply_cpu_threads, usable_cores

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        # `pytest -n N`: the cores split between the workers, and the same count for the runs they start in
        # subprocesses (the environment wins there too); two workers at two threads each on two cores stall
        # every small op (treegrpo.run.threads)
        share = max(1, usable_cores() // workers)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(share)
    if "PYTEST_XDIST_WORKER" in os.environ:
        # xdist starts its workers with COLUMNS=80 / LINES=24, which rich reads once, when a Console is made (the
        # CLI's is made at import): the tables that tests read at COLUMNS=250 would wrap at 80 under `-n`
        os.environ.pop("COLUMNS", None)
        os.environ.pop("LINES", None)

    choice = apply_cpu_threads(None)
    config.cpu_threads_reason = choice.reason


def pytest_report_header(config):
    import torch

    return f"cpu threads: {torch.get_num_threads()} ({getattr(config, 'cpu_threads_reason', '?')})"
