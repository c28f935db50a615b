"""The reference reward server: any built-in reward kind behind the `kind = "http"` protocol
(`treegrpo.rewards.remote`), so a reward model can live on another GPU, another machine, or in an environment with
dependencies that conflict with training's.

    treegrpo reward-server pickscore --port 8000 --option scale=flow_grpo      # on the reward machine
    [[reward]]                                                                 # in the training recipe
    kind = "http"
    url = "http://reward-machine:8000/score"

`POST /score` scores a batch; `GET /health` says what is served. Concurrent requests are scored together
(`BatchingScorer`: one reward call for every request waiting, up to `max_batch` images) by one model per device;
the server threads only so a slow client cannot hold up the others. Python rewards whose function takes
``metadata`` get the request's.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import queue
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from treegrpo.rewards.remote import MAX_IMAGE_PIXELS, RequestTooLarge, decode_request

logger = logging.getLogger(__name__)
MAX_BODY_BYTES = 256 << 20  # 256 MiB: about 128 base64 PNGs of 1024 px; the body is read whole, so this bounds memory
TOKEN_ENV = "TREEGRPO_REWARD_TOKEN"  # when set, POST /score needs `Authorization: Bearer <token>`
MAX_CONNECTIONS = 64  # connections served at once; more are answered 503 at once instead of each taking a thread
IDLE_TIMEOUT_S = 60  # a connection that sends nothing (or a body slower than this per read) is closed


@dataclass
class _Job:
    """One request waiting to be scored, and what it gets back."""

    images: list
    prompts: list[str]
    metadata: list[dict]
    done: threading.Event = field(default_factory=threading.Event)
    scores: list[float] | None = None
    subscores: dict[str, list[float]] = field(default_factory=dict)
    error: Exception | None = None


class BatchingScorer:
    """Scores concurrent requests together: a request waits in one queue; each reward instance (one per device) has
    a worker thread that takes every waiting request up to `max_batch` images, scores them in one call and hands each
    request its own scores and sub-scores. A reward instance is only ever called by its own worker, so its
    `last_subscores` always belong to the batch it just scored."""

    def __init__(self, rewards: list, max_batch: int = 64):
        self.max_batch, self._workers = max_batch, len(rewards)
        self._queue: queue.Queue = queue.Queue()
        for reward in rewards:
            threading.Thread(target=self._work, args=(reward,), daemon=True).start()

    def close(self) -> None:
        """Stop the workers once the requests already queued are scored."""
        for _ in range(self._workers):
            self._queue.put(None)

    def score(self, images, prompts, metadata) -> tuple[list[float], dict[str, list[float]]]:
        job = _Job(images, prompts, metadata)
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.scores, job.subscores

    def _work(self, reward) -> None:
        carried = None
        while True:
            first = carried or self._queue.get()
            if first is None:  # close()
                return
            jobs, carried, count = [first], None, len(first.images)
            while count < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)  # for the next round of this worker
                    break
                if count + len(job.images) > self.max_batch:
                    carried = job  # it starts the next batch
                    break
                jobs.append(job)
                count += len(job.images)
            self._score(reward, jobs)

    def _score(self, reward, jobs: list[_Job]) -> None:
        try:
            scores = [float(x) for x in reward.score([i for j in jobs for i in j.images],
                                                     [p for j in jobs for p in j.prompts],
                                                     [m for j in jobs for m in j.metadata])]
            subscores = {name: [float(x) for x in values] for name, values in reward.last_subscores.items()}
            start = 0
            for job in jobs:
                end = start + len(job.images)
                job.scores = scores[start:end]
                job.subscores = {name: values[start:end] for name, values in subscores.items()}
                start = end
        except Exception as err:  # noqa: BLE001 (every request of the batch gets the reason)
            logger.exception("scoring failed")
            for job in jobs:
                job.error = err
        for job in jobs:
            job.done.set()


@dataclass(frozen=True)
class ServerConfig:
    """What a reward server serves and the limits it enforces (its `/health` answer)."""

    kind: str
    models: int
    token: str | None
    max_batch: int
    max_body_bytes: int
    max_pixels: int


def make_server(reward, host: str = "127.0.0.1", port: int = 8000, *, token: str | None = None,
                max_body_bytes: int = MAX_BODY_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
                max_connections: int = MAX_CONNECTIONS, max_batch: int = 64) -> ThreadingHTTPServer:
    """A threading HTTP server scoring with `reward` (a built `treegrpo.rewards` reward, or a list of them: one per
    device, concurrent requests spread over them and batched up to `max_batch` images). `port=0` picks a free port
    (`server.server_address[1]`); an IPv6 `host` ("::", "::1") listens on IPv6. With `token`, POST /score answers 401
    unless the request carries `Authorization: Bearer <token>`. Bodies over `max_body_bytes` and images over
    `max_pixels` are refused (413) before they are decoded. Call `serve_forever()` (or run it in a thread) and
    `shutdown()`."""
    rewards = list(reward) if isinstance(reward, list | tuple) else [reward]
    server = _BoundedServer((host, port), _Handler, max_connections)
    server.scorer = BatchingScorer(rewards, max_batch)
    server.config = ServerConfig(rewards[0].name, len(rewards), token, max_batch, max_body_bytes, max_pixels)
    return server


class _Handler(BaseHTTPRequestHandler):
    """`GET /health` and `POST /score`; what it serves and its limits are the server's (`_BoundedServer.config`)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # the answer goes out at once, not after the client's delayed ACK (~40 ms)
    timeout = IDLE_TIMEOUT_S

    def _answer(self, status: int, payload: dict, *, close: bool = False) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:  # the rest of the request was not read: it must not be parsed as the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") == "/health":
            config = self.server.config
            self._answer(200, {"ok": True, "kind": config.kind, "auth": config.token is not None,
                               "models": config.models, "max_batch": config.max_batch,
                               "max_body_bytes": config.max_body_bytes, "max_pixels": config.max_pixels})
        else:
            self._answer(404, {"error": f"no such path {self.path!r}; POST /score, GET /health"})

    def do_POST(self):  # noqa: N802
        config = self.server.config
        token, max_body_bytes, max_pixels = config.token, config.max_body_bytes, config.max_pixels
        if self.path.rstrip("/") != "/score":
            self._answer(404, {"error": f"no such path {self.path!r}; POST /score"}, close=True)
            return
        if token is not None and not hmac.compare_digest(self.headers.get("Authorization", ""),
                                                         f"Bearer {token}"):
            self._answer(401, {"error": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                         close=True)
            return
        length = _content_length(self.headers.get("Content-Length"))
        if length is None or not 0 < length <= max_body_bytes:
            status = 411 if length is None else 413 if length > 0 else 400
            self._answer(status, {"error": f"Content-Length {self.headers.get('Content-Length')!r}: send a "
                                           f"body of 1 to {max_body_bytes:,} bytes"}, close=True)
            return
        try:
            images, prompts, metadata = decode_request(self.rfile.read(length),
                                                       self.headers.get("Content-Type", ""),
                                                       max_pixels=max_pixels)
        except RequestTooLarge as err:
            self._answer(413, {"error": str(err)})
            return
        except (ValueError, KeyError, TypeError) as err:
            self._answer(400, {"error": f"bad request: {err}"})
            return
        try:
            scores, subscores = self.server.scorer.score(images, prompts, metadata)
        except (ValueError, KeyError, TypeError) as err:  # the request's fault (a prompt the reward cannot read)
            self._answer(422, {"error": f"scoring failed: {type(err).__name__}: {err}", "retry": False})
            return
        except Exception as err:  # noqa: BLE001 (the client gets the reason, the server keeps serving)
            self._answer(500, {"error": f"scoring failed: {type(err).__name__}: {err}"})
            return
        self._answer(200, {"scores": scores, **({"subscores": subscores} if subscores else {})})

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        logger.info("%s %s", self.address_string(), format % args)


def _content_length(value: str | None) -> int | None:
    """The Content-Length header as an int; None when absent; -1 when it is not a whole number."""
    if value is None:
        return None
    return int(value) if value.strip().isdigit() else -1


class _BoundedServer(ThreadingHTTPServer):
    """`ThreadingHTTPServer` with a listen backlog for bursts, IPv6 when the host is an IPv6 address, and at most
    `max_connections` handler threads: a connection beyond them gets a 503 at once (a thread per connection without
    a cap let 500 slow clients hold 500 threads)."""

    request_queue_size = 1024
    scorer: BatchingScorer | None = None
    config: ServerConfig | None = None

    def server_close(self):
        super().server_close()
        if self.scorer is not None:
            self.scorer.close()

    def __init__(self, address, handler, max_connections: int):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                body = b'{"error": "server busy: too many connections; retry"}'
                head = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                        b"Retry-After: 1\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
                request.sendall(head + body)
            finally:
                self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def exposed_without_token(host: str, token: str | None) -> bool:
    """Whether the server would listen beyond this machine with no token: anyone who reaches the port can score."""
    if token is not None:
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to be local
        return host != "localhost"


def serve_reward(kind: str, options: list[str], *, host: str, port: int, dtype: str, announce,
                 devices: str | None = None, max_batch: int = 64) -> None:
    """`treegrpo reward-server`: build the reward `kind` with `options` (`key=value`) on the GPU when there is one
    and serve it until Ctrl-C; `announce` prints where it listens. Raises `UsageError` for a bad kind or option
    and `OSError` when the address cannot be bound."""
    from treegrpo.commands.arguments import compute_device
    from treegrpo.commands.inference import build_rewards
    from treegrpo.model.loading import DTYPES

    spec = kind + (":" + ",".join(options) if options else "")
    device_list = [d.strip() for d in devices.split(",") if d.strip()] if devices else [compute_device()]
    rewards = [build_rewards([spec], d, DTYPES[dtype])[0] for d in device_list]  # one model per device
    device = ", ".join(device_list)
    token = os.environ.get(TOKEN_ENV) or None
    server = make_server(rewards, host, port, token=token, max_batch=max_batch)
    shown = f"[{host}]" if ":" in host else host
    announce(f"serving reward {kind!r} on http://{shown}:{server.server_address[1]}/score ({device}; "
             f"{'bearer token from ' + TOKEN_ENV if token else 'no auth'}); Ctrl-C stops")
    if exposed_without_token(host, token):
        announce(f"WARNING: --host {host} without {TOKEN_ENV}: anyone who reaches the port can score; set it to "
                 "require a bearer token.")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
