"""Remote rewards over real HTTP on the loopback interface: the reference server (`treegrpo reward-server`'s
`make_server`) with the `http` kind, failure modes (server down, too slow, wrong count, server error) each one
line, and the `vlm` kind against a fake OpenAI-compatible endpoint."""

import json
import math
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from treegrpo.commands.reward_server import make_server
from treegrpo.rewards import build_reward
from treegrpo.rewards.base import RewardBase  # noqa: E402
from treegrpo.rewards.remote import RemoteRewardError


def grey(level: int, size: int = 8) -> Image.Image:
    return Image.new("RGB", (size, size), (level, level, level))


IMAGES = [grey(0), grey(51), grey(255)]
PROMPTS = ["a black square", "a dark square", "a white square"]
METADATA = [{"target": 0.0, "tag": "colors"}, {"target": 0.2, "tag": "colors"}, {"target": 1.0, "tag": "counting"}]


class MetadataReward(RewardBase):
    """Brightness minus the prompt's target (from its metadata), with the brightness as a sub-score."""

    name, takes_metadata = "closeness", True

    def __init__(self):
        self.seen = []

    def __call__(self, images, prompts, metadata=None):
        self.seen.append((list(prompts), list(metadata)))
        brightness = torch.tensor([float(np.asarray(i, dtype=np.float32).mean()) / 255 for i in images])
        self.last_subscores = {"brightness": brightness}
        return -(brightness - torch.tensor([m["target"] for m in metadata])).abs()


@contextmanager
def serving(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def fake_server(respond):
    """A loopback server whose POST handler is `respond(handler, request_json) -> (status, payload)`."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status, payload = respond(self, json.loads(body) if body.startswith(b"{") else None)
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
                pass

        def log_message(self, *args):
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as url:
        yield url


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("body", ["json", "multipart"])
def test_scores_subscores_and_metadata_round_trip_through_the_reference_server(body):
    reward = MetadataReward()
    with serving(make_server(reward, port=0)) as url:
        http = build_reward("http", url=f"{url}/score", body=body, batch_size=2)
        scores = http(IMAGES, PROMPTS, metadata=METADATA)
    brightness = torch.tensor([0.0, 0.2, 1.0])
    torch.testing.assert_close(scores, -(brightness - torch.tensor([0.0, 0.2, 1.0])).abs())
    torch.testing.assert_close(http.last_subscores["brightness"], brightness)
    # two requests (batch_size 2), each with its own prompts and metadata, in order
    assert reward.seen == [(PROMPTS[:2], METADATA[:2]), (PROMPTS[2:], METADATA[2:])]


def test_parallel_requests_keep_the_images_order():
    reward = build_reward("python", function="treegrpo.rewards.python:mean_brightness")
    images = [grey(level) for level in range(0, 250, 10)]
    with serving(make_server(reward, port=0)) as url:
        scores = build_reward("http", url=f"{url}/score", batch_size=3, parallel=4)(images, ["x"] * len(images))
    torch.testing.assert_close(scores, reward(images, ["x"] * len(images)))


def test_a_server_that_is_down_is_one_line_naming_the_url():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    http = build_reward("http", url=f"http://127.0.0.1:{port}/score", retries=1, backoff=0.01)
    with pytest.raises(RemoteRewardError) as error:
        http(IMAGES, PROMPTS)
    message = one_line(error)
    assert f"http://127.0.0.1:{port}/score" in message and "cannot connect" in message and "2 attempts" in message


def test_a_slow_server_times_out_in_one_line_after_the_retries():
    calls = []

    def slow(handler, request):
        calls.append(time.monotonic())
        time.sleep(1.0)
        return 200, {"scores": [0.0] * 3}

    with fake_server(slow) as url:
        http = build_reward("http", url=url, timeout=0.2, retries=1, backoff=0.05)
        with pytest.raises(RemoteRewardError) as error:
            http(IMAGES, PROMPTS)
    message = one_line(error)
    assert "no answer within 0.2 s (timeout)" in message and url in message and len(calls) == 2


def test_a_wrong_count_and_a_server_error_are_one_line():
    with fake_server(lambda handler, request: (200, {"scores": [1.0]})) as url:
        with pytest.raises(RemoteRewardError) as error:
            build_reward("http", url=url)(IMAGES, PROMPTS)
    assert one_line(error) == f"{url} returned 1 scores for 3 images"

    class Broken(RewardBase):
        name = "broken"

        def __call__(self, images, prompts):
            raise RuntimeError("CUDA out of memory")

    with serving(make_server(Broken(), port=0)) as url:
        with pytest.raises(RemoteRewardError) as error:
            build_reward("http", url=f"{url}/score", retries=0)(IMAGES, PROMPTS)
    assert "HTTP 500" in one_line(error) and "CUDA out of memory" in one_line(error)


def test_no_pickle_and_bad_options_fail_at_build_time():
    with pytest.raises(ValueError, match="must start with http"):
        build_reward("http", url="gpu-box:8000")
    with pytest.raises(ValueError, match="body must be one of"):
        build_reward("http", url="http://x", body="pickle")
    with pytest.raises(ValueError, match="environment variable is not set"):
        build_reward("http", url="http://x", api_key_env="TREEGRPO_TEST_NO_SUCH_VARIABLE")


# ---- vlm ------------------------------------------------------------------------------------------------------------
def openai_fake(log):
    """An OpenAI-compatible chat endpoint: 'yes' with probability = the image's brightness, or a 1-10 rating."""

    def respond(handler, request):
        log.append((handler.path, handler.headers.get("Authorization"), request))
        content = request["messages"][0]["content"]
        url = next(part["image_url"]["url"] for part in content if part["type"] == "image_url")
        import base64
        import io

        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        brightness = float(np.asarray(image, dtype=np.float32).mean()) / 255
        p = min(max(brightness, 1e-3), 1 - 1e-3)
        if request.get("logprobs"):
            top = [{"token": " Yes", "logprob": math.log(p * 0.9)},
                   {"token": "No", "logprob": math.log((1 - p) * 0.9)}, {"token": "Maybe", "logprob": math.log(0.1)}]
            message = {"role": "assistant", "content": "Yes" if p > 0.5 else "No"}
            choice = {"index": 0, "message": message, "logprobs": {"content": [{"token": message["content"],
                                                                                "logprob": -0.1,
                                                                                "top_logprobs": top}]}}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": f"Rating: {round(1 + 9 * p)}"}}
        return 200, {"id": "x", "object": "chat.completion", "choices": [choice]}

    return respond


def test_vlm_logprobs_score_is_the_yes_probability(monkeypatch):
    log = []
    monkeypatch.setenv("TREEGRPO_TEST_KEY", "secret")
    with fake_server(openai_fake(log)) as url:
        vlm = build_reward("vlm", base_url=f"{url}/v1", model="judge", api_key_env="TREEGRPO_TEST_KEY")
        scores = vlm(IMAGES, PROMPTS)
    expected = [min(max(b, 1e-3), 1 - 1e-3) for b in (0.0, 0.2, 1.0)]
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    path, auth, request = log[0]
    assert path == "/v1/chat/completions" and auth == "Bearer secret"
    assert request["model"] == "judge" and request["max_tokens"] == 1 and request["top_logprobs"] == 20
    questions = sorted(part["text"] for _, _, r in log for part in r["messages"][0]["content"]
                       if part["type"] == "text")
    assert questions == sorted(f'Does this image show "{p}"? Answer with one word: Yes or No.' for p in PROMPTS)


def test_vlm_parse_score_and_metadata_in_the_template():
    log = []
    with fake_server(openai_fake(log)) as url:
        vlm = build_reward("vlm", base_url=f"{url}/v1", model="judge", template="quality")
        torch.testing.assert_close(vlm(IMAGES, PROMPTS), torch.tensor([0.1, 0.3, 1.0]))
        own = build_reward("vlm", base_url=f"{url}/v1", model="judge",
                           template="Is this {tag} image right for {prompt}? Rate 1-10.")
        own(IMAGES[:1], PROMPTS[:1], metadata=METADATA[:1])
        assert log[-1][2]["messages"][0]["content"][1]["text"] == "Is this colors image right for a black square? " \
                                                                  "Rate 1-10."
        with pytest.raises(ValueError, match=r"template needs \{tag\}, which the prompt's metadata lacks"):
            own(IMAGES[:1], PROMPTS[:1], metadata=[{}])


def test_python_functions_with_a_metadata_parameter_get_it(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def target(images, prompts, metadata):\n    return [m['target'] for m in metadata]\n"
        "def plain(images, prompts):\n    return [1.0] * len(images)\n")
    with_metadata = build_reward("python", function=f"{tmp_path / 'my_rewards.py'}:target", batch_size=2)
    plain = build_reward("python", function=f"{tmp_path / 'my_rewards.py'}:plain")
    assert with_metadata.takes_metadata and not plain.takes_metadata
    torch.testing.assert_close(with_metadata(IMAGES, PROMPTS, metadata=METADATA), torch.tensor([0.0, 0.2, 1.0]))
    from treegrpo.rewards.base import score_with_accuracy

    scores, _ = score_with_accuracy(plain, IMAGES, PROMPTS, METADATA)  # a plain function is called as before
    torch.testing.assert_close(scores, torch.ones(3))


def test_reward_server_command_serves_a_builtin_kind():
    import os
    import re
    import subprocess
    import sys
    import urllib.request

    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "treegrpo", "reward-server", "jpeg", "--option", "quality=90",
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/score", line)
        assert match, line
        base = f"http://127.0.0.1:{match.group(1)}"
        with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
            assert json.loads(response.read()) == {"ok": True, "kind": "jpeg", "auth": False, "models": 1,
                                                   "max_batch": 64, "max_body_bytes": 256 << 20,
                                                   "max_pixels": 4096 * 4096}
        remote = build_reward("http", url=f"{base}/score")(IMAGES, PROMPTS)
        torch.testing.assert_close(remote, build_reward("jpeg", quality=90)(IMAGES, PROMPTS))
    finally:
        process.terminate()
        process.wait(timeout=10)
