"""Rewards off the critical path: epoch time with the leaves scored after the rollout against scored group by group
while the next group rolls out (`sampling.rollout_groups`, `sampling.overlap_scoring`).

    python benchmarks/overlap.py                       # slow python reward and the same reward served over HTTP
    python benchmarks/overlap.py --ms-per-image 0.5 --repeats 5

Every run is `treegrpo run recipes/digits.toml` (270 leaves an epoch, evaluation off) with a reward that stands for
a reward model on another device or machine: it waits `--ms-per-image` per image (the GIL released, as a GPU
kernel, a remote call or torch's CPU kernels release it), then scores the image's brightness. "python" calls it in
the trainer's process; "http" calls it through a real `treegrpo reward-server python` process on loopback. The
configurations run interleaved, `--repeats` times each; the table gives the median and range over repeats of each
run's median epoch time (epoch 0, the warm-up, left out) and its rollout / exposed-scoring split.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLOW_REWARD = '''
import time
import numpy as np

def slow_brightness(images, prompts):
    time.sleep({seconds_per_image} * len(images))  # a reward model elsewhere: the GIL is free while it works
    return [float(np.asarray(image, dtype=np.float32).mean()) / 255.0 for image in images]
'''
CONFIGS = {  # name: overrides of the rollout grouping
    "1 group": ["sampling.rollout_groups=1"],
    "5 groups, scored after": ["sampling.rollout_groups=5", "sampling.overlap_scoring=false"],
    "5 groups, overlapped": ["sampling.rollout_groups=5"],
    "2 groups, overlapped": ["sampling.rollout_groups=2"],
}


def start_server(folder: Path) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "PYTHONPATH": str(folder)}
    process = subprocess.Popen([sys.executable, "-m", "treegrpo", "reward-server", "python", "--port", "0",
                                "--option", "function=slow_reward:slow_brightness", "--max-batch", "512"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=folder)
    port = int(re.search(r"127\.0\.0\.1:(\d+)/score", process.stdout.readline()).group(1))
    for _ in range(400):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the reward server did not start")


def run_one(folder: Path, name: str, reward: str, config: str, epochs: int, threads: int) -> dict:
    out = folder / "runs" / f"{name}-{config.replace(' ', '_').replace(',', '')}"
    command = [sys.executable, "-m", "treegrpo", "run", str(ROOT / "recipes" / "digits.toml"), "--overwrite"]
    for override in [f"reward={reward}", f"train.epochs={epochs}", "evaluation.enabled=false",
                     f"train.cpu_threads={threads}", "output.samples=false", "output.checkpoint_every=1000",
                     f"output.dir={json.dumps(str(out))}", *CONFIGS[config]]:
        command += ["--set", override]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(folder)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder)
    if result.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return {key: statistics.median(row[f"time/{key}"] for row in rows)
            for key in ("epoch_s", "rollout_s", "score_s", "scoring_work_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ms-per-image", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="the trainer's CPU threads")
    parser.add_argument("--rewards", nargs="+", default=["python", "http"], choices=["python", "http"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="overlap_"))
    (folder / "slow_reward.py").write_text(SLOW_REWARD.format(seconds_per_image=args.ms_per_image / 1000))
    server, port = start_server(folder) if "http" in args.rewards else (None, 0)
    rewards = {"python": '[{kind="python", function="slow_reward:slow_brightness"}]',
               "http": f'[{{kind="http", url="http://127.0.0.1:{port}/score", batch_size=512}}]'}
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        for _ in range(args.repeats):
            for reward in args.rewards:
                for config in args.configs:  # interleaved: every configuration sees the same machine load
                    results.setdefault((reward, config), []).append(
                        run_one(folder, reward, rewards[reward], config, args.epochs, args.threads))
    finally:
        if server is not None:
            server.terminate()
    print(f"digits recipe, 270 leaves an epoch, reward waits {args.ms_per_image} ms per image; {args.epochs - 1} "
          f"epochs per run, {args.repeats} runs per cell, trainer threads {args.threads}; medians (range)\n")
    print("| reward | rollout | epoch s | rollout s | exposed scoring s | scoring work s | epoch vs 1 group |")
    print("|---|---|---|---|---|---|---|")
    for reward in args.rewards:
        base = statistics.median(r["epoch_s"] for r in results[(reward, args.configs[0])])
        for config in args.configs:
            runs = results[(reward, config)]

            def cell(key: str, runs=runs) -> str:
                values = [r[key] for r in runs]
                return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"

            epoch = statistics.median(r["epoch_s"] for r in runs)
            print(f"| {reward} | {config} | {cell('epoch_s')} | {cell('rollout_s')} | {cell('score_s')} | "
                  f"{cell('scoring_work_s')} | {epoch / base:.2f}× |")


if __name__ == "__main__":
    main()
