"""The reward server on uvicorn (`treegrpo reward-server --backend uvicorn`, `pip install "treegrpo[server]"`): the
same protocol, limits and answers as the standard-library server in `reward_server.py`, as a plain ASGI app.

What uvicorn brings that `http.server` lacks: an event loop instead of a thread per connection (500 slow clients are
500 sockets, not 500 threads), its connection limit (`limit_concurrency`: 503 beyond it), keep-alive and its idle
timeout, HTTP pipelining and chunked bodies handled by a maintained parser (h11 or httptools), and the process model
this ecosystem already runs behind nginx. The app itself has no framework dependency: a reward server is one POST
and one GET, and every check is ours either way (`RewardService`).

Body bytes are read as they arrive and counted: a declared `Content-Length` over the limit is answered 413 before
any byte is read, a chunked body is cut off at the limit, and a client that stops sending for `IDLE_TIMEOUT_S` gets
408. Decoding and scoring run in worker threads; the event loop keeps serving other connections meanwhile.
"""

from __future__ import annotations

import asyncio
import json

from treegrpo.commands.reward_service import (
    IDLE_TIMEOUT_S,
    MAX_BODY_BYTES,
    BatchingScorer,
    ServerConfig,
    answer_score,
    header_refusal,
    health,
    scorer_and_config,
)
from treegrpo.rewards.remote import MAX_IMAGE_PIXELS

MAX_ASYNC_CONNECTIONS = 1024  # a connection is a socket, not a thread: cap it high and bound memory by bytes instead
MAX_INFLIGHT_BYTES = 1 << 30  # request bodies held at once (4 of the largest allowed); more wait for a 503 + retry


class RewardApp:
    """ASGI 3 app serving `scorer` under `config`'s limits: `GET /health`, `POST /score`.

    Memory is bounded by `max_inflight_bytes`, the request bodies held at once (read, decoded or being scored): a
    request reserves its declared length before its first byte is read (a chunked one, each chunk as it comes), and
    one that does not fit is answered 503 with `Retry-After` at once. A connection costs no thread, so the
    connection cap can be large while a few stalled clients (each holding the 10 bytes it sent) block nobody.
    """

    def __init__(self, scorer: BatchingScorer, config: ServerConfig, idle_timeout: float = IDLE_TIMEOUT_S,
                 max_inflight_bytes: int = MAX_INFLIGHT_BYTES):
        self.scorer, self.config, self.idle_timeout = scorer, config, idle_timeout
        self.max_inflight_bytes, self.inflight_bytes = max_inflight_bytes, 0  # one event loop: no lock needed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self.scorer)
            return
        if scope["type"] != "http":
            return
        path = scope["path"].rstrip("/")
        if scope["method"] == "GET" and path == "/health":
            await _respond(send, 200, health(self.config))
            return
        if scope["method"] != "POST" or path != "/score":
            await _respond(send, 404, {"error": f"no such path {scope['path']!r}; POST /score, GET /health"})
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        refusal = header_refusal(headers.get("authorization", ""), headers.get("content-length"), self.config,
                                 chunked="chunked" in headers.get("transfer-encoding", "").lower())
        if refusal is not None:  # the body is left unread: close, or its bytes would be read as the next request
            await _respond(send, *refusal, close=True)
            return
        reserved = [0]
        try:
            body = await self._body(receive, int(headers.get("content-length", 0)), reserved)
            if isinstance(body, tuple):
                await _respond(send, *body, close=True)
                return
            status, payload = await asyncio.to_thread(answer_score, self.scorer, self.config, body,
                                                      headers.get("content-type", ""))
            await _respond(send, status, payload)
        finally:
            self.inflight_bytes -= reserved[0]

    def _reserve(self, size: int, reserved: list[int]) -> bool:
        if self.inflight_bytes + size > self.max_inflight_bytes:
            return False
        self.inflight_bytes += size
        reserved[0] += size
        return True

    async def _body(self, receive, declared: int, reserved: list[int]) -> bytes | tuple[int, dict]:
        """The request body, or (status, error) when it is too large, too slow, abandoned, or does not fit the
        bodies in flight (503)."""
        busy = 503, {"error": f"server busy: {self.max_inflight_bytes:,} bytes of requests in flight; retry"}
        if not self._reserve(declared, reserved):
            return busy
        chunks, size, limit = [], 0, self.config.max_body_bytes
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.idle_timeout)
            except asyncio.TimeoutError:
                return 408, {"error": f"the body stopped arriving for {self.idle_timeout:g} s"}
            if message["type"] == "http.disconnect":
                return 400, {"error": "the client left before sending the body"}
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return 413, {"error": f"the body is over {limit:,} bytes; send at most that"}
            if size > reserved[0] and not self._reserve(size - reserved[0], reserved):  # chunked
                return busy
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _respond(send, status: int, payload: dict, *, close: bool = False) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:  # busy: our client waits this long before its retry
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive, send, scorer: BatchingScorer) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            scorer.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


class UvicornRewardServer:
    """The uvicorn server for a reward, bound at construction like `make_server`'s (so `port=0` has a port at
    once): `run()` serves until Ctrl-C/SIGTERM (in the main thread) or `shutdown()` (from another thread)."""

    def __init__(self, reward, host: str = "127.0.0.1", port: int = 8000, *, token: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
                 max_connections: int = MAX_ASYNC_CONNECTIONS, max_batch: int = 64,
                 idle_timeout: float = IDLE_TIMEOUT_S, max_inflight_bytes: int = MAX_INFLIGHT_BYTES):
        try:
            import uvicorn
        except ImportError:
            raise ImportError('the uvicorn backend needs uvicorn: pip install "treegrpo[server]" (or --backend '
                              "stdlib)") from None
        self.scorer, self.config = scorer_and_config(reward, token=token, max_batch=max_batch,
                                                     max_body_bytes=max_body_bytes, max_pixels=max_pixels)
        app = RewardApp(self.scorer, self.config, idle_timeout, max_inflight_bytes)
        settings = uvicorn.Config(app, host=host, port=port,
                                  lifespan="on", log_level="warning", access_log=False,
                                  # uvicorn counts the connection asking too: N + 1 serves N at once, as stdlib
                                  limit_concurrency=max_connections + 1, backlog=1024,
                                  timeout_keep_alive=max(1, int(idle_timeout)), server_header=False)
        self.server = uvicorn.Server(settings)
        self.socket = settings.bind_socket()  # IPv6 when the host has a colon
        self.socket.listen(1024)  # connections queue from now on, before the loop runs (the port was announced)
        self.server_address = self.socket.getsockname()[:2]

    def run(self) -> None:
        self.server.run(sockets=[self.socket])

    def shutdown(self) -> None:
        self.server.should_exit = True
