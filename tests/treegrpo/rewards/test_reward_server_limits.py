"""The reward server under abuse and load, on both backends (the standard-library server and uvicorn): limits
answered before decoding, malformed requests one line each, no request smuggled past a refusal, a bearer token,
sub-scores that belong to their own request, a connection cap, IPv6. Real sockets on the loopback interface."""

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from treegrpo.commands.reward_asgi import UvicornRewardServer
from treegrpo.commands.reward_server import exposed_without_token, make_server
from treegrpo.rewards import build_reward
from treegrpo.rewards.base import RewardBase
from treegrpo.rewards.remote import encode_request

from .test_remote import IMAGES, PROMPTS


class Brightness(RewardBase):
    """Mean brightness, also returned as a sub-score. Reading `last_subscores` is slow on purpose: a server that reads
    them after releasing its lock hands out another request's."""

    name = "brightness"

    def __init__(self):
        self._subscores = {}

    @property
    def last_subscores(self):
        time.sleep(0.005)
        return self._subscores

    def __call__(self, images, prompts):
        values = torch.tensor([float(np.asarray(i, dtype=np.float32).mean()) / 255 for i in images])
        self._subscores = {"same": values.clone()}
        return values


def post(url, body: bytes, content_type="application/json", headers=None):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def json_body(images=None, prompts=None, metadata=None, **override):
    payload = {"prompts": PROMPTS if prompts is None else prompts,
               "images": [base64.b64encode(blob).decode() for blob in (images or [png(i) for i in IMAGES])]}
    if metadata is not None:
        payload["metadata"] = metadata
    return json.dumps({**payload, **override}).encode()


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims `width × height` pixels (its data is tiny and never decoded)."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + len(ihdr).to_bytes(4, "big") + chunk + zlib.crc32(chunk).to_bytes(4, "big")


BACKENDS = {"stdlib": make_server, "uvicorn": UvicornRewardServer}


@contextmanager
def serving_on(backend: str, reward, **options):
    """`reward` served on `backend` at a free loopback port (or `host`); yields the base URL."""
    server = BACKENDS[backend](reward, **{"port": 0, **options})
    thread = threading.Thread(target=server.serve_forever if backend == "stdlib" else server.run, daemon=True)
    thread.start()
    host = server.server_address[0]
    try:
        if backend == "uvicorn":
            deadline = time.monotonic() + 10
            while not server.server.started and time.monotonic() < deadline:
                time.sleep(0.01)
        yield f"http://{f'[{host}]' if ':' in host else host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        if backend == "stdlib":
            server.server_close()


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    return request.param


@pytest.fixture
def server_url(backend):
    with serving_on(backend, build_reward("jpeg"), max_body_bytes=200_000, max_pixels=64 * 64) as url:
        yield url


def test_malformed_requests_are_one_line_400s_naming_the_field(server_url):
    jpeg = io.BytesIO()
    IMAGES[0].save(jpeg, format="JPEG")
    cases = [
        (json_body(prompts="abc"), '"prompts" must be a list of strings'),
        (json_body(metadata={"a": 1}), '"metadata" must be a list of objects'),
        (json_body(images=[jpeg.getvalue(), png(IMAGES[1]), png(IMAGES[2])]), "image 0 is not a PNG"),
        (json_body(images=[b"\x89PNG\r\n\x1a\n" + b"\0" * 40] * 3), "image 0 is not a PNG"),
        (b"[1, 2]", 'a JSON object with an "images" list'),
        (json_body(prompts=PROMPTS[:2]), "3 images, 2 prompts"),
    ]
    for body, message in cases:
        status, answer = post(f"{server_url}/score", body)
        assert status == 400 and message in answer["error"], (message, answer)
        assert "0x" not in answer["error"] and "\n" not in answer["error"]  # no object addresses, one line


def test_limits_are_413_before_anything_is_decoded(server_url):
    status, answer = post(f"{server_url}/score", json_body(images=[huge_png_header(12000, 12000)] * 3))
    assert status == 413 and "image 0 is 12000×12000 pixels" in answer["error"]
    status, answer = post(f"{server_url}/score", b"x" * 300_000)
    assert status == 413 and "1 to 200,000 bytes" in answer["error"]
    status, answer = post(f"{server_url}/score", json_body())  # within the limits: scored
    assert status == 200 and len(answer["scores"]) == 3


def raw_exchange(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def test_bad_lengths_close_the_connection_so_no_request_is_smuggled(server_url, backend):
    smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    for length, status in ((b"abc", b"400"), (b"-5", b"400"), (b"999999999", b"413")):
        answer = raw_exchange(server_url, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: " + length
                              + b"\r\n\r\n" + smuggled)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:80]
        assert answer.count(b"HTTP/1.1 ") == 1 and b"connection: close" in answer.lower()  # the GET never answered
    answer = raw_exchange(server_url, b"POST /score HTTP/1.1\r\nHost: x\r\n\r\n" + smuggled)
    assert answer.startswith(b"HTTP/1.1 411") and answer.count(b"HTTP/1.1 ") == 1


def test_a_token_is_required_when_set(monkeypatch, backend):
    with serving_on(backend, build_reward("jpeg"), token="s3cret") as url:
        assert post(f"{url}/score", json_body())[0] == 401
        assert post(f"{url}/score", json_body(), headers={"Authorization": "Bearer wrong"})[0] == 401
        status, answer = post(f"{url}/score", json_body(), headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and len(answer["scores"]) == 3
        monkeypatch.setenv("REWARD_TOKEN", "s3cret")  # the http reward sends it from api_key_env
        scores = build_reward("http", url=f"{url}/score", api_key_env="REWARD_TOKEN")(IMAGES, PROMPTS)
        torch.testing.assert_close(scores, build_reward("jpeg")(IMAGES, PROMPTS))
    assert exposed_without_token("0.0.0.0", None) and exposed_without_token("::", None)
    assert not exposed_without_token("127.0.0.1", None) and not exposed_without_token("::1", None)
    assert not exposed_without_token("0.0.0.0", "s3cret") and not exposed_without_token("localhost", None)


def test_each_answer_carries_its_own_subscores_under_concurrency(backend):
    levels = list(range(0, 240, 20))
    failures = []
    with serving_on(backend, Brightness()) as url:
        def client(level):
            for _ in range(5):
                body, content_type = encode_request([Image.new("RGB", (8, 8), (level,) * 3)], ["p"], [{}])
                status, answer = post(f"{url}/score", body, content_type)
                if status != 200 or answer["subscores"]["same"] != answer["scores"]:
                    failures.append((level, answer))

        threads = [threading.Thread(target=client, args=(level,)) for level in levels]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures, failures[:3]


def test_connections_beyond_the_cap_get_503_at_once(backend):
    with serving_on(backend, build_reward("jpeg"), max_connections=1) as url:
        host, port = url.removeprefix("http://").split(":")
        idle = socket.create_connection((host, int(port)), timeout=10)  # holds the only slot, sends nothing
        try:
            time.sleep(0.2)
            answer = raw_exchange(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 503"), answer[:80]
        finally:
            idle.close()
        time.sleep(0.2)
        assert raw_exchange(url, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(
            b"HTTP/1.1 200")


def test_ipv6_loopback(backend):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        context = serving_on(backend, build_reward("jpeg"), host="::1")
        url = context.__enter__()
    except OSError as err:
        pytest.skip(f"IPv6 loopback unavailable: {err}")
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            assert json.loads(response.read())["ok"] is True
    finally:
        context.__exit__(None, None, None)


class SlowBrightness(Brightness):
    """Brightness that takes 50 ms a call and records which instance (device) scored how many images."""

    def __init__(self, label, log):
        super().__init__()
        self.label, self.log = label, log

    def __call__(self, images, prompts):
        time.sleep(0.05)
        self.log.append((self.label, len(images)))
        return super().__call__(images, prompts)


def test_concurrent_requests_are_batched_over_one_model_per_device(backend):
    log = []
    rewards = [SlowBrightness("cuda:0", log), SlowBrightness("cuda:1", log)]
    levels = list(range(0, 240, 20))  # 12 clients, one image each, all at once
    answers = {}
    with serving_on(backend, rewards, max_batch=4) as url:
        def client(level):
            body, content_type = encode_request([Image.new("RGB", (8, 8), (level,) * 3)], ["p"], [{}])
            answers[level] = post(f"{url}/score", body, content_type)

        threads = [threading.Thread(target=client, args=(level,)) for level in levels]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for level, (status, answer) in answers.items():
        assert status == 200 and answer["scores"] == pytest.approx([level / 255], abs=1e-6)
        assert answer["subscores"]["same"] == answer["scores"]
    assert sum(n for _, n in log) == 12 and all(n <= 4 for _, n in log)  # every image once, batches of at most 4
    assert len(log) < 12  # requests waiting together were scored together
    assert {label for label, _ in log} == {"cuda:0", "cuda:1"}  # both models worked
