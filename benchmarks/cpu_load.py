"""Seconds per epoch of the digits recipe on the CPU, idle and under a fixed synthetic load, for tree / mix / flat at
1 thread, 2 threads (torch's default on 2 cores, what every run used before the thread policy) and `auto` (the
policy: free cores when the run starts; see cli/treegrpo/run/threads.py).

    python benchmarks/cpu_load.py                        # ~10 min on 2 cores
    python benchmarks/cpu_load.py --epochs 4 --busy 0 2 --threads 1 2 auto

Each configuration is one `treegrpo run recipes/digits_paper.toml` process (real CLI path) for `--epochs` epochs; the
table shows the median `time/epoch_s` over all epochs but the first (warm-up), and the thread count the run chose.
The load is `--busy` processes spinning in pure Python, started before and stopped after each group of runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from treegrpo.run.threads import busy_cores_now

ROOT = Path(__file__).resolve().parents[1]
SPIN = "while True: pass"


def run_digits(out: Path, algorithm: str, threads: str, epochs: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    command = [sys.executable, "-m", "treegrpo", "run", str(ROOT / "recipes" / "digits_paper.toml"),
               "--set", f'tree.algorithm="{algorithm}"', "--set", f"train.epochs={epochs}",
               "--set", f"output.dir={json.dumps(str(out))}", "--set", "output.samples=false",
               "--set", "output.checkpoint_every=1000"]
    if threads != "auto":
        command += ["--set", f"train.cpu_threads={threads}"]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{algorithm} threads={threads} failed:\n{done.stderr[-2000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    chose = next((line for line in done.stderr.splitlines() if "intra-op thread" in line), "")
    return {"s_per_epoch": statistics.median(m["time/epoch_s"] for m in metrics[1:]),
            "wall_s": time.perf_counter() - started, "threads_line": chose.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 2], help="busy processes per load level")
    parser.add_argument("--threads", nargs="+", default=["1", "2", "auto"])
    parser.add_argument("--algorithms", nargs="+", default=["tree", "mix", "flat"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for busy in args.busy:
            spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
            try:
                time.sleep(3 if busy else 0)
                for algorithm in args.algorithms:
                    for threads in args.threads:
                        out = Path(tmp) / f"{busy}-{algorithm}-{threads}"
                        load = busy_cores_now(1.0)
                        result = run_digits(out, algorithm, threads, args.epochs)
                        rows.append((busy, algorithm, threads, load, result))
                        print(f"busy={busy} {algorithm:5s} threads={threads:4s} load={load:.1f} "
                              f"{result['s_per_epoch']:.2f} s/epoch  {result['threads_line']}", flush=True)
            finally:
                for spinner in spinners:
                    spinner.kill()
    print("\n| busy processes | algorithm | threads | busy cores at start | s / epoch (median) |")
    print("|---|---|---|---|---|")
    for busy, algorithm, threads, load, result in rows:
        print(f"| {busy} | {algorithm} | {threads} | {load:.1f} | {result['s_per_epoch']:.2f} |")


if __name__ == "__main__":
    main()
