"""The whole suite takes its CPU threads like `treegrpo run` does (treegrpo.run.threads): on a busy machine torch's
default of one thread per core made the suite 5x slower (29 min vs 5 min 51 s idle). OMP_NUM_THREADS, when set (as
`.ci/run` does), still wins."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    from treegrpo.run.threads import apply_cpu_threads

    choice = apply_cpu_threads(None)
    config.cpu_threads_reason = choice.reason


def pytest_report_header(config):
    import torch

    return f"cpu threads: {torch.get_num_threads()} ({getattr(config, 'cpu_threads_reason', '?')})"
