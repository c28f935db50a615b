"""The reference reward server on loopback, before and after the hardening, side by side in one process: per-request
latency on one keep-alive connection, throughput and p99 under concurrent clients, and what a decompression bomb
(a 546-byte PNG claiming 12,000² pixels) costs the server.

    python benchmarks/reward_server.py                   # both servers, jpeg reward (no model), ~1 min
    python benchmarks/reward_server.py --before COMMIT   # the "before" server from another commit (default bc074db)

"Before" is `treegrpo/commands/reward_server.py` and its request decoder (`rewards/remote.py`) as of `--before`,
loaded from git next to today's modules; both score with the same reward.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import importlib.util
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

from PIL import Image

from treegrpo.commands import reward_server as current
from treegrpo.rewards import build_reward
from treegrpo.rewards.remote import encode_request

ROOT = Path(__file__).resolve().parents[1]


def load_from_git(commit: str, path: str, name: str):
    """A module's source as of `commit`, loaded beside today's under another name."""
    source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_before(commit: str):
    """The server as of `commit`, with that commit's request decoder too."""
    server = load_from_git(commit, "cli/treegrpo/commands/reward_server.py", "reward_server_before")
    old_decode = load_from_git(commit, "cli/treegrpo/rewards/remote.py", "remote_before").decode_request
    server.decode_request = lambda *args, **kwargs: (*old_decode(*args, **kwargs), None)[:4]  # (…, no sources)
    return server


def bomb_png(side: int = 12000) -> bytes:
    """A real, decodable PNG of side² black pixels, compressed to a few hundred bytes."""
    packer, row = zlib.compressobj(9), b"\0" + bytes(side * 3)  # row by row: the 432 MB never exist here
    raw = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def request(connection: http.client.HTTPConnection, body: bytes, content_type: str) -> tuple[int, float]:
    start = time.perf_counter()
    connection.request("POST", "/score", body=body, headers={"Content-Type": content_type})
    response = connection.getresponse()
    response.read()
    return response.status, (time.perf_counter() - start) * 1000


def measure(module, name: str, body: bytes, content_type: str, bomb: tuple[bytes, str]) -> dict:
    server = module.make_server(build_reward("jpeg"), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(5):
            request(connection, body, content_type)
        sequential = [request(connection, body, content_type)[1] for _ in range(100)]
        connection.close()
        latencies, lock = [], threading.Lock()

        def client():
            own = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for _ in range(30):
                status, ms = request(own, body, content_type)
                with lock:
                    latencies.append(ms)
            own.close()

        start = time.perf_counter()
        clients = [threading.Thread(target=client) for _ in range(12)]
        for worker in clients:
            worker.start()
        for worker in clients:
            worker.join()
        elapsed = time.perf_counter() - start
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        bomb_status, bomb_ms = request(connection, *bomb)
        connection.close()
        rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    finally:
        server.shutdown()
        server.server_close()
    latencies.sort()
    return {"server": name, "keep-alive p50 ms": statistics.median(sequential),
            "12 clients req/s": len(latencies) / elapsed, "12 clients p99 ms": latencies[int(0.99 * len(latencies))],
            "bomb status": bomb_status, "bomb ms": bomb_ms, "peak RSS growth MB": rss_growth}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="bc074db", help="commit whose reward_server.py is 'before'")
    args = parser.parse_args()
    image = Image.new("RGB", (64, 64), (120, 30, 200))
    body, content_type = encode_request([image], ["a purple square"], [{}])
    bomb = bomb_png()
    bomb_body = json.dumps({"prompts": ["p"], "images": [base64.b64encode(bomb).decode()]}).encode()
    rows = [measure(current, "after (HEAD)", body, content_type, (bomb_body, "application/json")),
            measure(load_before(args.before), f"before ({args.before})", body, content_type,
                    (bomb_body, "application/json"))]
    print(f"one 64-px PNG per request, jpeg reward; bomb: a {len(bomb)}-byte PNG of 12000² pixels "
          f"(python {sys.version.split()[0]}, {io.DEFAULT_BUFFER_SIZE} B buffers)\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
