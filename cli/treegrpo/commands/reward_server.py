"""The reference reward server: any built-in reward kind behind the `kind = "http"` protocol
(`treegrpo.rewards.remote`), so a reward model can live on another GPU, another machine, or in an environment with
dependencies that conflict with training's.

    treegrpo reward-server pickscore --port 8000 --option scale=flow_grpo      # on the reward machine
    [[reward]]                                                                 # in the training recipe
    kind = "http"
    url = "http://reward-machine:8000/score"

`POST /score` scores a batch; `GET /health` says what is served. Concurrent requests are scored together
(`BatchingScorer`: one reward call for every request waiting, up to `max_batch` images) by one model per device.
Python rewards whose function takes ``metadata`` get the request's.

Two backends serve the same app (`reward_service.py`): uvicorn (`reward_asgi.py`, `pip install "treegrpo[server]"`,
the default when installed), and this module's standard-library server, a thread per connection up to a cap, kept
because a reward environment (a conflicting CUDA or transformers stack) may not be able to install anything more.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from treegrpo.commands.reward_service import (
    IDLE_TIMEOUT_S,
    MAX_BODY_BYTES,
    TOKEN_ENV,
    BatchingScorer,
    ServerConfig,
    answer_score,
    header_refusal,
    health,
    scorer_and_config,
)
from treegrpo.rewards.remote import MAX_IMAGE_PIXELS

logger = logging.getLogger(__name__)
MAX_CONNECTIONS = 64  # connections served at once; more are answered 503 at once instead of each taking a thread


def make_server(reward, host: str = "127.0.0.1", port: int = 8000, *, token: str | None = None,
                max_body_bytes: int = MAX_BODY_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
                max_connections: int = MAX_CONNECTIONS, max_batch: int = 64) -> ThreadingHTTPServer:
    """A threading HTTP server scoring with `reward` (a built `treegrpo.rewards` reward, or a list of them: one per
    device, concurrent requests spread over them and batched up to `max_batch` images). `port=0` picks a free port
    (`server.server_address[1]`); an IPv6 `host` ("::", "::1") listens on IPv6. With `token`, POST /score answers 401
    unless the request carries `Authorization: Bearer <token>`. Bodies over `max_body_bytes` and images over
    `max_pixels` are refused (413) before they are decoded. Call `serve_forever()` (or run it in a thread) and
    `shutdown()`."""
    server = _BoundedServer((host, port), _Handler, max_connections)
    server.scorer, server.config = scorer_and_config(reward, token=token, max_batch=max_batch,
                                                     max_body_bytes=max_body_bytes, max_pixels=max_pixels)
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
            self._answer(200, health(self.server.config))
        else:
            self._answer(404, {"error": f"no such path {self.path!r}; POST /score, GET /health"})

    def do_POST(self):  # noqa: N802
        config = self.server.config
        if self.path.rstrip("/") != "/score":
            self._answer(404, {"error": f"no such path {self.path!r}; POST /score"}, close=True)
            return
        refusal = header_refusal(self.headers.get("Authorization", ""), self.headers.get("Content-Length"), config)
        if refusal is not None:
            self._answer(*refusal, close=True)
            return
        self._answer(*answer_score(self.server.scorer, config, self.rfile.read(int(self.headers["Content-Length"])),
                                   self.headers.get("Content-Type", "")))

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        logger.info("%s %s", self.address_string(), format % args)


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


BACKENDS = ("auto", "uvicorn", "stdlib")


def pick_backend(backend: str) -> str:
    """"uvicorn" or "stdlib" for `--backend`; auto is uvicorn when it is installed. UsageError for an unknown one."""
    from treegrpo.errors import UsageError

    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: choose {', '.join(BACKENDS)}.")
    if backend != "auto":
        return backend
    import importlib.util

    return "uvicorn" if importlib.util.find_spec("uvicorn") is not None else "stdlib"


def serve_reward(kind: str, options: list[str], *, host: str, port: int, dtype: str, announce,
                 devices: str | None = None, max_batch: int = 64, backend: str = "auto",
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """`treegrpo reward-server`: build the reward `kind` with `options` (`key=value`) on the GPU when there is one
    and serve it until Ctrl-C on `backend`; `announce` prints where it listens. Raises `UsageError` for a bad kind,
    option or backend, `ImportError` when uvicorn is asked for and missing, and `OSError` when the address cannot
    be bound."""
    from treegrpo.commands.arguments import compute_device
    from treegrpo.commands.inference import build_rewards
    from treegrpo.model.loading import DTYPES

    backend = pick_backend(backend)
    spec = kind + (":" + ",".join(options) if options else "")
    device_list = [d.strip() for d in devices.split(",") if d.strip()] if devices else [compute_device()]
    rewards = [build_rewards([spec], d, DTYPES[dtype])[0] for d in device_list]  # one model per device
    token = os.environ.get(TOKEN_ENV) or None
    shown = f"[{host}]" if ":" in host else host
    if backend == "uvicorn":
        from treegrpo.commands.reward_asgi import UvicornRewardServer

        server = UvicornRewardServer(rewards, host, port, token=token, max_batch=max_batch,
                                     max_body_bytes=max_body_bytes)
    else:
        server = make_server(rewards, host, port, token=token, max_batch=max_batch, max_body_bytes=max_body_bytes)
    bound_port = server.server_address[1]
    announce(f"serving reward {kind!r} on http://{shown}:{bound_port}/score ({', '.join(device_list)}; "
             f"{'bearer token from ' + TOKEN_ENV if token else 'no auth'}; {backend}); Ctrl-C stops")
    if exposed_without_token(host, token):
        announce(f"WARNING: --host {host} without {TOKEN_ENV}: anyone who reaches the port can score; set it to "
                 "require a bearer token.")
    if backend == "uvicorn":
        server.run()  # uvicorn handles Ctrl-C and SIGTERM itself, then runs the app's shutdown
        return
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
