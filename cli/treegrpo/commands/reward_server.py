"""The reference reward server: any built-in reward kind behind the `kind = "http"` protocol
(`treegrpo.rewards.remote`), so a reward model can live on another GPU, another machine, or in an environment with
dependencies that conflict with training's.

    treegrpo reward-server pickscore --port 8000 --option scale=flow_grpo      # on the reward machine
    [[reward]]                                                                 # in the training recipe
    kind = "http"
    url = "http://reward-machine:8000/score"

`POST /score` scores a batch; `GET /health` answers ``{"ok": true, "kind": ...}``. Requests are scored one at a
time (a reward model on one device gains nothing from running two batches at once); the server threads only so a
slow client cannot block the health check. Python rewards whose function takes ``metadata`` get the request's.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from treegrpo.rewards.remote import MAX_IMAGE_PIXELS, RequestTooLarge, decode_request

logger = logging.getLogger(__name__)
MAX_BODY_BYTES = 256 << 20  # 256 MiB: about 128 base64 PNGs of 1024 px; the body is read whole, so this bounds memory
TOKEN_ENV = "TREEGRPO_REWARD_TOKEN"  # when set, POST /score needs `Authorization: Bearer <token>`
MAX_CONNECTIONS = 64  # connections served at once; more are answered 503 at once instead of each taking a thread
IDLE_TIMEOUT_S = 60  # a connection that sends nothing (or a body slower than this per read) is closed


def make_server(reward, host: str = "127.0.0.1", port: int = 8000, *, token: str | None = None,
                max_body_bytes: int = MAX_BODY_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
                max_connections: int = MAX_CONNECTIONS) -> ThreadingHTTPServer:
    """A threading HTTP server scoring with `reward` (a built `treegrpo.rewards` reward). `port=0` picks a free port
    (`server.server_address[1]`); an IPv6 `host` ("::", "::1") listens on IPv6. With `token`, POST /score answers 401
    unless the request carries `Authorization: Bearer <token>`. Bodies over `max_body_bytes` and images over
    `max_pixels` are refused (413) before they are decoded. Call `serve_forever()` (or run it in a thread) and
    `shutdown()`."""
    lock = threading.Lock()
    kind = reward.name

    class Handler(BaseHTTPRequestHandler):
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
                self._answer(200, {"ok": True, "kind": kind, "auth": token is not None,
                                   "max_body_bytes": max_body_bytes, "max_pixels": max_pixels})
            else:
                self._answer(404, {"error": f"no such path {self.path!r}; POST /score, GET /health"})

        def do_POST(self):  # noqa: N802
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
                with lock:  # the sub-scores belong to this call: read them before another request scores
                    scores = reward.score(images, prompts, metadata)
                    payload = {"scores": [float(x) for x in scores]}
                    if reward.last_subscores:
                        payload["subscores"] = {name: [float(x) for x in values]
                                                for name, values in reward.last_subscores.items()}
            except Exception as err:  # noqa: BLE001 (the client gets the reason, the server keeps serving)
                logger.exception("scoring failed")
                self._answer(500, {"error": f"scoring failed: {type(err).__name__}: {err}"})
                return
            self._answer(200, payload)

        def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
            logger.info("%s %s", self.address_string(), format % args)

    return _BoundedServer((host, port), Handler, max_connections)


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
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
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


def serve_reward(kind: str, options: list[str], *, host: str, port: int, dtype: str, announce) -> None:
    """`treegrpo reward-server`: build the reward `kind` with `options` (`key=value`) on the GPU when there is one
    and serve it until Ctrl-C; `announce` prints where it listens. Raises `UsageError` for a bad kind or option
    and `OSError` when the address cannot be bound."""
    from treegrpo.commands.arguments import compute_device
    from treegrpo.commands.inference import build_rewards
    from treegrpo.model.loading import DTYPES

    spec = kind + (":" + ",".join(options) if options else "")
    device = compute_device()
    (reward,) = build_rewards([spec], device, DTYPES[dtype])
    token = os.environ.get(TOKEN_ENV) or None
    server = make_server(reward, host, port, token=token)
    shown = f"[{host}]" if ":" in host else host
    announce(f"serving reward {kind!r} on http://{shown}:{server.server_address[1]}/score ({device}; "
             f"{'bearer token from ' + TOKEN_ENV if token else 'no auth'}); Ctrl-C stops")
    if exposed_without_token(host, token):
        logger.warning(f"--host {host} listens beyond this machine with no authentication: anyone who can reach "
                       f"port {server.server_address[1]} can use this reward model. Set {TOKEN_ENV} to require a "
                       f"bearer token (clients: api_key_env = \"{TOKEN_ENV}\").")
        announce(f"WARNING: --host {host} without {TOKEN_ENV}: anyone who reaches the port can score; set it to "
                 "require a bearer token.")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
