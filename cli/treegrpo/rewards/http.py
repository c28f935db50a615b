"""A reward that lives in another process or on another machine: ``kind = "http"`` POSTs each batch of images, with
their prompts and the prompts' metadata, to a reward server and reads one score per image back (the protocol is in
`treegrpo.rewards.remote`; `treegrpo reward-server` serves any built-in kind with it).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from treegrpo.rewards.base import RewardBase, check_batch, check_batch_size, chunks
from treegrpo.rewards.remote import BODIES, bearer_headers, decode_scores, encode_request
from treegrpo.rewards.transport import Transport, parse_urls


class HttpReward(RewardBase):
    """Scores from a reward server.

    Args:
        url (`str` or `list[str]`): the server's scoring endpoint, e.g. ``"http://gpu-box:8000/score"``; several
            (a list, or separated by commas) are used in turn, each batch starting at the next and each retry
            going to the next (`treegrpo.rewards.transport`).
        body (`str`, *optional*, defaults to `"json"`): ``"json"`` (images as base64 PNG) or ``"multipart"`` (PNG
            parts, a third smaller on the wire).
        timeout (`float`, *optional*, defaults to 120): seconds for one batch's whole answer (connecting, sending,
            reading all of it).
        retries (`int`, *optional*, defaults to 2): more attempts after a connection error, a timeout, HTTP 408,
            429 or 5xx (unless the server's error says `"retry": false`), with `backoff` · 2^attempt seconds, or
            the server's `Retry-After` when longer, between them; other errors and redirects fail at once.
        backoff (`float`, *optional*, defaults to 1.0): the first wait between attempts, in seconds.
        batch_size (`int`, *optional*, defaults to 32): images per request.
        parallel (`int`, *optional*, defaults to 1): requests in flight at once (for servers that batch or
            replicate; the scores keep the images' order).
        headers (`dict`, *optional*): extra HTTP headers.
        api_key_env (`str`, *optional*): the name of an environment variable holding a token, sent as
            ``Authorization: Bearer <token>`` (the token itself never goes in a recipe).
        device, dtype: unused; the server decides.

    Example:
        ```py
        >>> from treegrpo.rewards import build_reward
        >>> reward = build_reward("http", url="http://127.0.0.1:8000/score")
        >>> scores = reward(images, prompts, metadata=[{"tag": "counting"}] * len(images))  # float32 [N]
        >>> reward.last_subscores  # {"name": float32 [N]} when the server sends sub-scores
        ```
    """

    takes_metadata = True
    takes_source_images = True  # sent with each image when the prompts name sources (editing)

    def __init__(self, *, url: str | list[str], body: str = "json", timeout: float = 120.0, retries: int = 2,
                 backoff: float = 1.0, batch_size: int = 32, parallel: int = 1, headers: dict | None = None,
                 api_key_env: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32):
        urls = parse_urls(url, "http")
        if body not in BODIES:
            raise ValueError(f"http reward body must be one of {BODIES}; got {body!r}.")
        self.url, self.body = ", ".join(urls), body
        self.batch_size, self.parallel = check_batch_size(batch_size), check_batch_size(parallel)
        headers = {**{str(k): str(v) for k, v in (headers or {}).items()}, **bearer_headers(api_key_env, "http")}
        self.transport = Transport(urls, timeout=timeout, retries=retries, backoff=backoff, headers=headers,
                                   kind="http")
        self._pool: ThreadPoolExecutor | None = None  # kept, so its threads' connections live across calls
        self.name = "http"
        self.last_subscores: dict[str, torch.Tensor] = {}

    def load(self) -> HttpReward:
        """Nothing to load (the server holds the model)."""
        return self

    def _score(self, images, prompts, metadata, sources):
        data, content_type = encode_request(images, prompts, metadata, self.body, sources)
        answer, url = self.transport.post(data, content_type)
        return decode_scores(answer, len(images), url)

    def __call__(self, images: list[Image.Image], prompts: list[str], metadata: list[dict] | None = None,
                 source_images: list[Image.Image] | None = None) -> torch.Tensor:
        n = check_batch(images, prompts, self.name)
        metadata = [{} for _ in range(n)] if metadata is None else list(metadata)
        parts = list(chunks(n, self.batch_size))
        jobs = [(images[part], list(prompts[part]), metadata[part],
                 None if source_images is None else list(source_images[part])) for part in parts]
        if self.parallel > 1 and len(jobs) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="http-reward")
            results = list(self._pool.map(lambda job: self._score(*job), jobs))
        else:
            results = [self._score(*job) for job in jobs]
        names = results[0][1].keys() if results else ()
        self.last_subscores = {name: torch.cat([sub[name] for _, sub in results]) for name in names
                               if all(name in sub for _, sub in results)}
        return torch.cat([scores for scores, _ in results]) if results else torch.empty(0)
