"""The remote rewards' client on the loopback interface: keep-alive, a deadline on the whole answer, no redirects,
strict scores, Retry-After, no retry of what will fail again, and several servers in turn. Each test failed on the
urllib client it replaces (redirects followed with the token, a dripping server answered after the timeout, booleans
and dict keys read as scores, a connection per batch, one URL only)."""

import email.utils
import json
import re
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from treegrpo.commands.reward_server import make_server
from treegrpo.rewards import build_reward
from treegrpo.rewards.base import RewardBase
from treegrpo.rewards.remote import RemoteRewardError, decode_scores
from treegrpo.rewards.transport import MAX_RETRY_AFTER_S, parse_urls, retry_after_seconds

IMAGES = [Image.new("RGB", (8, 8), (level, level, level)) for level in (0, 128, 255)]
PROMPTS = ["a", "b", "c"]


@contextmanager
def raw_server(handle):
    """A loopback TCP server calling `handle(connection, log)` for each accepted connection, in its own thread;
    yields (url, log)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    log, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            log.append("connect")
            threading.Thread(target=_guarded, args=(handle, connection, log), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/score", log
    finally:
        stop.set()
        thread.join()
        listener.close()


def _guarded(handle, connection, log):
    with connection:
        try:
            handle(connection, log)
        except OSError:
            pass


def read_request(connection) -> tuple[str, dict[str, str], bytes] | None:
    """One HTTP request off `connection`: (request line, headers, body); None when the client closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += connection.recv(65536)
    return lines[0], headers, body


def answer(status: str, payload, extra: str = "") -> bytes:
    body = json.dumps(payload).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


def scores_server(payload=None, status="200 OK", extra=""):
    """Answers every request on a kept-alive connection with `payload` (default: a zero per image)."""

    def handle(connection, log):
        while (request := read_request(connection)) is not None:
            log.append(request)
            zeros = {"scores": [0.0] * len(json.loads(request[2])["images"])}
            connection.sendall(answer(status, zeros if payload is None else payload, extra))

    return raw_server(handle)


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_batches_reuse_one_kept_alive_connection():
    with scores_server() as (url, log):
        reward = build_reward("http", url=url, batch_size=1)
        for _ in range(3):
            reward(IMAGES, PROMPTS)
    assert log.count("connect") == 1 and len(log) == 1 + 9  # 9 requests, one connection


def test_a_connection_the_server_closed_while_idle_is_reopened_without_spending_a_retry():
    def one_answer_then_close(connection, log):  # keep-alive promised, then the socket is closed
        request = read_request(connection)
        log.append(request)
        connection.sendall(answer("200 OK", {"scores": [1.0, 2.0, 3.0]}))

    with raw_server(one_answer_then_close) as (url, log):
        reward = build_reward("http", url=url, retries=0)
        first = reward(IMAGES, PROMPTS)
        time.sleep(0.1)
        second = reward(IMAGES, PROMPTS)
    assert first.tolist() == second.tolist() == [1.0, 2.0, 3.0] and log.count("connect") == 2


@pytest.mark.parametrize("where", ["headers", "body"])
def test_the_timeout_bounds_the_whole_answer_not_each_read(where):
    """A server dripping a byte every 0.2 s never idles 1 s, yet must time out after 1 s."""

    def drip(connection, log):
        read_request(connection)
        response = answer("200 OK", {"scores": [0.0, 0.0, 0.0]})
        split = response.index(b"\r\n") if where == "headers" else response.index(b"\r\n\r\n") + 4
        connection.sendall(response[:split])
        for byte in response[split:]:
            time.sleep(0.2)
            connection.sendall(bytes([byte]))

    with raw_server(drip) as (url, _):
        reward = build_reward("http", url=url, timeout=1.0, retries=0)
        start = time.monotonic()
        with pytest.raises(RemoteRewardError) as error:
            reward(IMAGES, PROMPTS)
    assert time.monotonic() - start < 2.5
    assert one_line(error) == f"reward server {url}: no answer within 1 s (timeout)"


def test_redirects_are_refused_and_the_token_goes_nowhere_else(monkeypatch):
    monkeypatch.setenv("TREEGRPO_TEST_TOKEN", "secret")
    with scores_server() as (elsewhere, elsewhere_log):
        with scores_server({"error": "moved"}, "307 Temporary Redirect", f"Location: {elsewhere}\r\n") as (url, log):
            reward = build_reward("http", url=url, api_key_env="TREEGRPO_TEST_TOKEN")
            with pytest.raises(RemoteRewardError) as error:
                reward(IMAGES, PROMPTS)
    assert one_line(error) == (f"reward server {url}: HTTP 307 redirect to {elsewhere!r}; redirects are not followed "
                               "(the request and its token would go to another address): set the url to the final "
                               "address")
    assert elsewhere_log == [] and len(log) == 2  # one request, not retried
    assert log[1][1]["authorization"] == "Bearer secret"


@pytest.mark.parametrize(("payload", "problem"), [
    ({"scores": {"0": 1.0, "1": 2.0, "2": 3.0}}, "returned scores that are not a list of numbers"),
    ({"scores": [True, 1.0, 0.0]}, "returned scores that are not a list of numbers"),
    ({"scores": ["1", 1.0, 0.0]}, "returned scores that are not a list of numbers"),
    ({"scores": [1e39, 1.0, 0.0]}, "returned scores that are not finite float32 numbers: [1e+39]"),
    ({"scores": [0.0, 1.0, 2.0], "subscores": {"clip": [0.0, float("nan"), 1.0]}},
     "returned clip that are not finite float32 numbers: [nan]"),
    ({"scores": [0.0, 1.0, 2.0], "subscores": [[0.0, 1.0, 2.0]]},
     "returned subscores that are not an object of lists"),
    ({"score": [0.0, 1.0, 2.0]}, 'answered something other than {"scores": [numbers]}'),
])
def test_only_lists_of_finite_float32_numbers_are_scores(payload, problem):
    with pytest.raises(RemoteRewardError, match=re.escape(f"http://server {problem}")):
        decode_scores(json.dumps(payload).encode(), 3, "http://server")
    scores, subscores = decode_scores(b'{"scores": [1, 2.5, -3], "subscores": {"a": [0, 0, 1]}}', 3, "u")
    assert scores.tolist() == [1.0, 2.5, -3.0] and subscores["a"].tolist() == [0.0, 0.0, 1.0]


def test_retry_after_is_waited_when_longer_than_the_backoff():
    def busy_once(connection, log):
        while (request := read_request(connection)) is not None:
            log.append((time.monotonic(), request))
            if len(log) == 2:  # "connect" and the first request
                connection.sendall(answer("503 Service Unavailable", {"error": "busy"}, "Retry-After: 1\r\n"))
            else:
                connection.sendall(answer("200 OK", {"scores": [0.0, 0.0, 0.0]}))

    with raw_server(busy_once) as (url, log):
        build_reward("http", url=url, retries=1, backoff=0.01)(IMAGES, PROMPTS)
    first, second = (entry[0] for entry in log if entry != "connect")
    assert 0.95 <= second - first < 2.0


def test_retry_after_values():
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None and retry_after_seconds("-4") == 0.0
    assert retry_after_seconds("1e9") == MAX_RETRY_AFTER_S
    now = 1_800_000_000.0
    assert retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30.0)


def test_what_would_fail_again_is_not_retried_and_says_so():
    with scores_server({"error": "no such model"}, "400 Bad Request") as (url, log):
        with pytest.raises(RemoteRewardError) as error:
            build_reward("http", url=url, retries=3, backoff=0.01)(IMAGES, PROMPTS)
    assert one_line(error) == f'reward server {url}: HTTP 400 Bad Request: {{"error": "no such model"}}'
    assert len(log) == 2  # one request

    class NeedsDigits(RewardBase):  # fails on the request's own prompts: the reference server says "retry": false
        name, calls = "needs_digits", 0

        def __call__(self, images, prompts):
            NeedsDigits.calls += 1
            raise ValueError("the prompt 'a' names no digit")

    server = make_server(NeedsDigits(), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/score"
        with pytest.raises(RemoteRewardError) as error:
            build_reward("http", url=url, retries=3, backoff=0.01)(IMAGES, PROMPTS)
    finally:
        server.shutdown()
        server.server_close()
    assert "HTTP 422" in one_line(error) and "names no digit" in one_line(error) and "attempts" not in one_line(error)
    assert NeedsDigits.calls == 1


def test_several_servers_take_turns_and_a_down_one_is_failed_over():
    with scores_server() as (first, first_log), scores_server() as (second, second_log):
        reward = build_reward("http", url=f"{first}, {second}", batch_size=1)
        reward(IMAGES + IMAGES[:1], PROMPTS + PROMPTS[:1])  # 4 batches
        assert len(first_log) - 1 == len(second_log) - 1 == 2
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            down = f"http://127.0.0.1:{sock.getsockname()[1]}/score"
        with_down = build_reward("http", url=[down, second], batch_size=1, retries=1, backoff=0.01)
        torch.testing.assert_close(with_down(IMAGES, PROMPTS), torch.zeros(3))


def test_urls_are_checked_when_the_reward_is_built():
    assert parse_urls("http://a:1/score, https://b/score", "http") == ("http://a:1/score", "https://b/score")
    for bad in ("gpu-box:8000", "http://", ["http://a/score", 3], [], ""):
        with pytest.raises(ValueError, match="http reward url must"):
            build_reward("http", url=bad)
    with pytest.raises(ValueError, match=r"http reward needs timeout > 0, .* got timeout=0"):
        build_reward("http", url="http://a/score", timeout=0)
    with pytest.raises(ValueError, match=r"vlm reward needs timeout > 0, .* retries=-1"):
        build_reward("vlm", base_url="http://a/v1", model="m", retries=-1)
    assert build_reward("vlm", base_url=["http://a/v1", "http://b/v1/"], model="m").url == \
        "http://a/v1/chat/completions, http://b/v1/chat/completions"
