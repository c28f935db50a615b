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

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from treegrpo.rewards.remote import decode_request

logger = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 30  # 1 GiB: a few thousand 1024-px PNGs; more is a misconfigured client


def make_server(reward, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A threading HTTP server scoring with `reward` (a built `treegrpo.rewards` reward). `port=0` picks a free port
    (`server.server_address[1]`). Call `serve_forever()` (or run it in a thread) and `shutdown()`."""
    lock = threading.Lock()
    kind = reward.name

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path.rstrip("/") == "/health":
                self._answer(200, {"ok": True, "kind": kind})
            else:
                self._answer(404, {"error": f"no such path {self.path!r}; POST /score, GET /health"})

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/score":
                self._answer(404, {"error": f"no such path {self.path!r}; POST /score"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY_BYTES:
                self._answer(413 if length else 411, {"error": f"body of {length} bytes; send 1 B to 1 GiB"})
                return
            try:
                images, prompts, metadata = decode_request(self.rfile.read(length),
                                                           self.headers.get("Content-Type", ""))
            except (ValueError, KeyError, TypeError, OSError) as err:
                self._answer(400, {"error": f"bad request: {type(err).__name__}: {err}"})
                return
            try:
                with lock:
                    scores = reward.score(images, prompts, metadata)
            except Exception as err:  # noqa: BLE001 (the client gets the reason, the server keeps serving)
                logger.exception("scoring failed")
                self._answer(500, {"error": f"{type(err).__name__}: {err}"})
                return
            payload = {"scores": [float(x) for x in scores]}
            subscores = reward.last_subscores
            if subscores:
                payload["subscores"] = {name: [float(x) for x in values] for name, values in subscores.items()}
            self._answer(200, payload)

        def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
            logger.info("%s %s", self.address_string(), format % args)

    return ThreadingHTTPServer((host, port), Handler)


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
    server = make_server(reward, host, port)
    announce(f"serving reward {kind!r} on http://{host}:{server.server_address[1]}/score ({device}); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
