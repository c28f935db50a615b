"""The reward server's two backends under load and abuse on loopback, each a real `treegrpo reward-server jpeg`
process (no model, so the server itself is measured): requests/s and p99 latency at 1, 16 and 100 concurrent
clients, with keep-alive and with a new connection per request; then what a 200 MB body and 500 stalled clients cost
the server process (its peak RSS and threads, from /proc) and whether a normal request still gets through.

    python benchmarks/reward_server_load.py                  # both backends, ~2 min
    python benchmarks/reward_server_load.py --backends uvicorn --repeats 3
    python benchmarks/reward_server_load.py --client         # the http reward's client: today's vs urllib's

`--client` times the `http` reward itself (240 images in batches of 4, `parallel` 1 and 16) against a uvicorn
server, with today's client (`rewards/transport.py`: kept-alive connections) and with the urllib client it replaced
(`post` from `rewards/remote.py` as of `--before`, 2b8b3b7, loaded from git; a connection per batch), same
encoding, decoding and thread pool.

The clients are threads of this process (one 64-px PNG per request), the same for both backends; on a small
machine they share its cores with the server, so compare rows, not absolute numbers.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from PIL import Image
from reward_server import request as one_request  # benchmarks/reward_server.py: one timed POST

from treegrpo.rewards.remote import encode_request


def start_server(backend: str) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    process = subprocess.Popen([sys.executable, "-m", "treegrpo", "reward-server", "jpeg", "--port", "0",
                                "--backend", backend], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env)
    port = int(re.search(r"127\.0\.0\.1:(\d+)/score", process.stdout.readline()).group(1))
    for _ in range(400):  # until it answers
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{backend} server did not start")


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS, kB), VmRSS (kB) and Threads of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) for key in ("VmHWM", "VmRSS", "Threads")}


def load(port: int, clients: int, per_client: int, keep_alive: bool, body: bytes, content_type: str) -> dict:
    latencies, failures, lock = [], [0], threading.Lock()

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(per_client):
            try:
                status, ms = one_request(connection, body, content_type)
            except (OSError, http.client.HTTPException):
                status, ms = 0, 0.0
            with lock:
                latencies.append(ms) if status == 200 else None
                failures[0] += status != 200
            if not keep_alive or status != 200:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"req/s": len(latencies) / elapsed, "p99 ms": latencies[int(0.99 * (len(latencies) - 1))] if latencies
            else float("nan"), "failed": failures[0]}


def big_body(port: int, megabytes: int) -> tuple[int, float]:
    """A `megabytes` MB JSON body (an image that is not a PNG): status and seconds to the answer."""
    junk = b"A" * (megabytes * 1_000_000 - 60)
    body = b'{"prompts": ["p"], "images": ["' + junk + b'"]}'
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    status, _ = one_request(connection, body, "application/json")
    connection.close()
    return status, time.perf_counter() - start


def stalled_clients(port: int, count: int) -> list[socket.socket]:
    """`count` connections that each start a 1,000-byte body, send 10 bytes and stall."""
    sockets = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port), timeout=10)
        connection.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
        sockets.append(connection)
    return sockets


def measure(backend: str, body: bytes, content_type: str) -> tuple[list[dict], dict]:
    process, port = start_server(backend)
    try:
        rows = []
        for clients, per_client in ((1, 300), (16, 30), (100, 6)):
            for keep_alive in (True, False):
                rows.append({"backend": backend, "clients": clients, "keep-alive": keep_alive,
                             **load(port, clients, per_client, keep_alive, body, content_type)})
        base = proc_status(process.pid)
        status, seconds = big_body(port, 200)
        after_big = proc_status(process.pid)
        sockets = stalled_clients(port, 500)
        time.sleep(1.0)
        stalled = proc_status(process.pid)
        during = load(port, 1, 20, True, body, content_type)
        for connection in sockets:
            connection.close()
        abuse = {"backend": backend, "200 MB body": f"{status} in {seconds:.1f} s",
                 "peak RSS growth MB": (after_big["VmHWM"] - base["VmHWM"]) / 1024,
                 "500 stalled: threads": stalled["Threads"], "500 stalled: RSS MB": stalled["VmRSS"] / 1024,
                 "a client meanwhile: req/s": during["req/s"], "its failures": during["failed"]}
        return rows, abuse
    finally:
        process.terminate()
        process.wait(timeout=30)


def client_rows(before: str, repeats: int) -> list[dict]:
    import importlib.util
    import tempfile

    from treegrpo.rewards import build_reward

    source = subprocess.run(["git", "show", f"{before}:cli/treegrpo/rewards/remote.py"], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    file = Path(tempfile.mkdtemp()) / "remote_before.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location("remote_before", file)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    images = [Image.new("RGB", (64, 64), (i, 30, 200)) for i in range(240)]
    prompts = ["a square"] * len(images)
    process, port = start_server("uvicorn")
    url = f"http://127.0.0.1:{port}/score"
    rows = []
    try:
        for parallel in (1, 16):
            times: dict[str, list[float]] = {"urllib (before)": [], "http.client, kept alive": []}
            for _ in range(repeats):
                for name in times:
                    reward = build_reward("http", url=url, batch_size=4, parallel=parallel)
                    if name.startswith("urllib"):
                        reward.transport.post = lambda data, kind: (old.post(
                            url, data, kind, timeout=120, retries=0, backoff=0.0), url)
                    reward(images[:8], prompts[:8])  # warm-up
                    start = time.perf_counter()
                    reward(images, prompts)
                    times[name].append(time.perf_counter() - start)
            rows += [{"client": name, "parallel": parallel, "60 batches s": statistics.median(values),
                      "batches/s": 60 / statistics.median(values)} for name, values in times.items()]
    finally:
        process.terminate()
        process.wait(timeout=30)
    return rows


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()) + " |"
              for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["stdlib", "uvicorn"], choices=["stdlib", "uvicorn"])
    parser.add_argument("--repeats", type=int, default=1, help="runs per backend, interleaved; medians printed")
    parser.add_argument("--client", action="store_true", help="time the http reward's client instead")
    parser.add_argument("--before", default="2b8b3b7", help="commit whose urllib client --client compares")
    args = parser.parse_args()
    if args.client:
        print(table(client_rows(args.before, args.repeats)))
        return
    body, content_type = encode_request([Image.new("RGB", (64, 64), (120, 30, 200))], ["a purple square"], [{}])
    runs: dict[str, list] = {backend: [] for backend in args.backends}
    for _ in range(args.repeats):
        for backend in args.backends:
            runs[backend].append(measure(backend, body, content_type))
    load_rows, abuse_rows = [], []
    for results in runs.values():
        for i, row in enumerate(results[0][0]):
            load_rows.append({**row, **{key: statistics.median(r[0][i][key] for r in results)
                                        for key in ("req/s", "p99 ms")}})
        abuse_rows.append(results[-1][1])
    print(f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}, {args.repeats} run(s) per backend (medians)\n")
    print(table(load_rows) + "\n\n" + table(abuse_rows))


if __name__ == "__main__":
    main()
