"""What the uvicorn backend adds over the standard-library server, on real loopback sockets: slow and idle clients
cost no thread, a stalled body is answered 408, a chunked body is cut off at the limit, and `treegrpo reward-server`
serves on either backend. (Both backends pass the limits, token, batching and IPv6 tests of
`test_reward_server_limits.py`.)"""

import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

from treegrpo.commands.reward_server import pick_backend
from treegrpo.errors import UsageError
from treegrpo.rewards import build_reward

from .test_remote import IMAGES, PROMPTS
from .test_reward_server_limits import json_body, serving_on


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_answer(connection: socket.socket) -> bytes:
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def test_two_hundred_idle_clients_hold_no_threads_and_others_are_still_served():
    with serving_on("uvicorn", build_reward("jpeg"), max_connections=300) as url:
        before = threading.active_count()
        idle = [connect(url) for _ in range(200)]
        for connection in idle[:100]:  # half of them start a request and stall in its body
            connection.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
        try:
            time.sleep(0.3)
            assert threading.active_count() - before < 10  # the stdlib server: one thread each
            scores = build_reward("http", url=f"{url}/score")(IMAGES, PROMPTS)
            torch.testing.assert_close(scores, build_reward("jpeg")(IMAGES, PROMPTS))
        finally:
            for connection in idle:
                connection.close()


def test_a_body_that_stops_arriving_is_answered_408_and_closed():
    with serving_on("uvicorn", build_reward("jpeg"), idle_timeout=0.5) as url:
        with connect(url) as connection:
            connection.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
            start = time.monotonic()
            answer = read_answer(connection)  # returns when the server closes
    assert answer.startswith(b"HTTP/1.1 408") and b"stopped arriving for 0.5 s" in answer
    assert time.monotonic() - start < 5


def test_a_chunked_body_is_cut_off_at_the_limit():
    with serving_on("uvicorn", build_reward("jpeg"), max_body_bytes=1000) as url:
        with connect(url) as connection:
            # two 600-byte chunks, the body never finished, in ONE write: the server reads it all before it answers
            # and closes; bytes still arriving after its close (a third write) draw a reset that can discard the
            # answer before it is read (seen under `pytest -n 2`)
            connection.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                               + (b"258\r\n" + b"x" * 600 + b"\r\n") * 2)
            answer = read_answer(connection)
        assert answer.startswith(b"HTTP/1.1 413") and b"over 1,000 bytes" in answer
        body = json_body()
        chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
        with serving_on("uvicorn", build_reward("jpeg")) as big_url, connect(big_url) as connection:
            connection.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                               b"Content-Type: application/json\r\nConnection: close\r\n\r\n" + chunked)
            answer = read_answer(connection)
    assert answer.startswith(b"HTTP/1.1 200") and len(json.loads(answer.split(b"\r\n\r\n", 1)[1])["scores"]) == 3


def test_backend_choice():
    assert pick_backend("auto") == "uvicorn"  # installed with the dev extras
    assert pick_backend("stdlib") == "stdlib"
    with pytest.raises(UsageError, match="--backend 'gunicorn': choose auto, uvicorn, stdlib"):
        pick_backend("gunicorn")


@pytest.mark.parametrize("backend", ["uvicorn", "stdlib"])
def test_reward_server_command_serves_on_each_backend(backend):
    import os

    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "treegrpo", "reward-server", "jpeg", "--port", "0", "--backend", backend,
               "--max-body-mb", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/score", line)
        assert match and f"; {backend})" in line, line
        base = f"http://127.0.0.1:{match.group(1)}"
        with urllib.request.urlopen(f"{base}/health", timeout=10) as response:  # listening once announced
            served = json.loads(response.read())
        assert served["kind"] == "jpeg" and served["max_body_bytes"] == 1 << 20
        torch.testing.assert_close(build_reward("http", url=f"{base}/score")(IMAGES, PROMPTS),
                                   build_reward("jpeg")(IMAGES, PROMPTS))
    finally:
        process.terminate()
        assert process.wait(timeout=20) is not None


def test_bodies_in_flight_are_bounded_by_bytes_with_a_503_and_retry_after():
    body = json_body()
    with serving_on("uvicorn", build_reward("jpeg"), max_inflight_bytes=1000 + len(body) // 2) as url:
        with connect(url) as stalled:  # reserves 1,000 bytes, sends 10, waits
            stalled.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
            time.sleep(0.2)
            with connect(url) as connection:
                connection.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: %d\r\n\r\n" % len(body) + body)
                answer = read_answer(connection)
            assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer.lower()
            assert b"bytes of requests in flight" in answer
        time.sleep(0.2)  # the stalled client left: its reservation is back
        torch.testing.assert_close(build_reward("http", url=f"{url}/score")(IMAGES, PROMPTS),
                                   build_reward("jpeg")(IMAGES, PROMPTS))
