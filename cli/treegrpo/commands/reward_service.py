"""What both reward servers (`reward_server.py` on the standard library, `reward_asgi.py` on uvicorn) serve the same
way: the limits, the batching scorer (one model per device, concurrent requests scored together), `/health`, the
bearer-token check, and the answer to `POST /score` for a body within the limits."""

from __future__ import annotations

import hmac
import logging
import queue
import threading
from dataclasses import dataclass, field

from treegrpo.rewards.remote import RequestTooLarge, decode_request

logger = logging.getLogger(__name__)
MAX_BODY_BYTES = 256 << 20  # 256 MiB: about 128 base64 PNGs of 1024 px; the body is read whole, so this bounds memory
TOKEN_ENV = "TREEGRPO_REWARD_TOKEN"  # when set, POST /score needs `Authorization: Bearer <token>`
IDLE_TIMEOUT_S = 60  # a connection that sends nothing (or a body slower than this per read) is closed


@dataclass
class _Job:
    """One request waiting to be scored, and what it gets back."""

    images: list
    prompts: list[str]
    metadata: list[dict]
    sources: list | None  # editing requests: each image's source image
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

    def score(self, images, prompts, metadata, sources=None) -> tuple[list[float], dict[str, list[float]]]:
        job = _Job(images, prompts, metadata, sources)
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
            # sources only when every request of the batch sent them (a reward that needs them says so otherwise)
            sources = None if any(j.sources is None for j in jobs) else [s for j in jobs for s in j.sources]
            scores = [float(x) for x in reward.score([i for j in jobs for i in j.images],
                                                     [p for j in jobs for p in j.prompts],
                                                     [m for j in jobs for m in j.metadata], sources)]
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


def scorer_and_config(reward, *, token: str | None, max_batch: int, max_body_bytes: int, max_pixels: int
                      ) -> tuple[BatchingScorer, ServerConfig]:
    """What a server of either backend holds: the batching scorer over `reward` (one, or a list: one per device) and
    its limits."""
    rewards = list(reward) if isinstance(reward, list | tuple) else [reward]
    return (BatchingScorer(rewards, max_batch),
            ServerConfig(rewards[0].name, len(rewards), token, max_batch, max_body_bytes, max_pixels))


def header_refusal(authorization: str, content_length: str | None, config: ServerConfig, *,
                   chunked: bool = False) -> tuple[int, dict] | None:
    """What `POST /score`'s headers alone refuse, before any body byte is read: a wrong token (401), no body (411,
    unless `chunked`), a Content-Length that is not a whole number or is 0 (400) or over the limit (413). The
    caller closes the connection after a refusal: the unread body must not be parsed as the next request."""
    if not token_accepted(authorization, config.token):
        return 401, {"error": "missing or wrong bearer token (Authorization: Bearer <token>)"}
    if content_length is None:
        return None if chunked else (411, {"error": f"send the body with a Content-Length (1 to "
                                                    f"{config.max_body_bytes:,} bytes)"})
    length = int(content_length) if content_length.strip().isdigit() else -1
    if not 0 < length <= config.max_body_bytes:
        return (413 if length > 0 else 400), {
            "error": f"Content-Length {content_length!r}: send a body of 1 to {config.max_body_bytes:,} bytes"}
    return None


def health(config: ServerConfig) -> dict:
    """`GET /health`: what is served and the limits."""
    return {"ok": True, "kind": config.kind, "auth": config.token is not None, "models": config.models,
            "max_batch": config.max_batch, "max_body_bytes": config.max_body_bytes, "max_pixels": config.max_pixels}


def token_accepted(authorization: str, token: str | None) -> bool:
    """Whether an `Authorization` header value carries the server's bearer token (always, without a token)."""
    return token is None or hmac.compare_digest(authorization, f"Bearer {token}")


def answer_score(scorer: BatchingScorer, config: ServerConfig, body: bytes, content_type: str
                 ) -> tuple[int, dict]:
    """(status, JSON answer) of `POST /score` for a body within the limits: 413 for an image over `max_pixels`
    (judged before decoding), 400 for a malformed request, 422 with `"retry": false` when the reward rejects the
    request itself (the client should not send it again), 500 for any other scoring failure (retried)."""
    try:
        images, prompts, metadata, sources = decode_request(body, content_type, max_pixels=config.max_pixels)
    except RequestTooLarge as err:
        return 413, {"error": str(err)}
    except (ValueError, KeyError, TypeError) as err:
        return 400, {"error": f"bad request: {err}"}
    try:
        scores, subscores = scorer.score(images, prompts, metadata, sources)
    except (ValueError, KeyError, TypeError) as err:  # the request's fault (a prompt the reward cannot read)
        return 422, {"error": f"scoring failed: {type(err).__name__}: {err}", "retry": False}
    except Exception as err:  # noqa: BLE001 (the client gets the reason, the server keeps serving)
        return 500, {"error": f"scoring failed: {type(err).__name__}: {err}"}
    return 200, {"scores": scores, **({"subscores": subscores} if subscores else {})}
