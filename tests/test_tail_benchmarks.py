"""benchmarks/tail.py and benchmarks/iteration.py at their smallest settings, so the numbers in docs/benchmarks.md
keep a working command: the compressed tail's rows follow the formula and the exact row compares equal to itself."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def test_tail_benchmark_smallest_setting():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tail.py"), "--models", "digits", "--tail-steps",
                           "2", "--orders", "2", "--seeds", "0", "--starts", "2"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[2].strip(): line.split("|") for line in proc.stdout.splitlines()
            if line.startswith("| digits |")}
    # s = 2: 2 + 13 + 27·5 rows exact, 2 + 13 + 27·2 with a 2-step tail
    assert float(rows["exact"][3]) == 150 and float(rows["n=2, order 2"][3]) == 69
    assert float(rows["exact"][4]) == 0 and float(rows["exact"][7]) == 1  # no error, advantage correlation 1
    assert 0 < float(rows["n=2, order 2"][4]) < 0.2


def test_iteration_benchmark_smallest_setting():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "iteration.py"), "--models", "digits",
                           "--epochs", "1", "--methods", "tree-tail2", "flat-dancegrpo", "--threads", "1"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split("|")[2].strip(): line.split("|") for line in proc.stdout.splitlines()
             if line.startswith("| digits |")}
    assert set(lines) == {"tree-tail2", "flat-dancegrpo"}
    assert lines["flat-dancegrpo"][8].strip() == "1.00×"
    assert float(lines["flat-dancegrpo"][6]) == 10 * (1 + 27 * 9)  # 10 prompts, flat from one root, no CFG
