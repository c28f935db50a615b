"""A vision-language model as judge: ``kind = "vlm"`` asks any OpenAI-compatible chat endpoint (vLLM, SGLang, a
hosted API) about each image and turns the answer into a score.

Two ways to score (``score``):

- ``"logprobs"``: one answer token is requested with its top log-probabilities, and the score is
  P(yes) / (P(yes) + P(no)), summing the probability of every top token that reads as a positive or a negative answer
  (``answer_tokens``, compared case- and space-insensitively). Smooth in the model's confidence: a better GRPO
  signal than a hard yes/no. Needs a server that returns ``logprobs`` (vLLM and SGLang do).
- ``"parse"``: the first number in the answer, divided by ``scale_max`` (a 1–10 rating becomes 0.1–1.0).

Templates (``template``): ``"yes_no"`` (alignment: does the image show the prompt?), ``"quality"`` (a 1–10 rating),
or your own text with ``{prompt}`` and any metadata field of the prompt's ``.jsonl`` line (``{objects}``,
``{text}``, ...).
"""

from __future__ import annotations

import base64
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from treegrpo.rewards.base import RewardBase, check_batch, check_batch_size
from treegrpo.rewards.remote import RemoteRewardError, bearer_headers, png_bytes
from treegrpo.rewards.transport import Transport, parse_urls

TEMPLATES = {
    "yes_no": 'Does this image show "{prompt}"? Answer with one word: Yes or No.',
    "quality": 'This image was generated for the prompt "{prompt}". Rate its overall quality (composition, detail, '
               "realism, faithfulness to the prompt) from 1 (worst) to 10 (best). Answer with a single number.",
}
DEFAULT_SCORE = {"yes_no": "logprobs", "quality": "parse"}
SCORES = ("logprobs", "parse")
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


class VlmReward(RewardBase):
    """A VLM judge behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        base_url (`str` or `list[str]`): the API root, e.g. ``"http://127.0.0.1:8000/v1"`` (``/chat/completions``
            is appended); several (a list, or separated by commas) are used in turn, as the http kind's urls.
        model (`str`): the model name the server serves, e.g. ``"Qwen/Qwen2.5-VL-7B-Instruct"``.
        template (`str`, *optional*, defaults to `"yes_no"`): ``"yes_no"``, ``"quality"`` or your own text with
            ``{prompt}`` and metadata fields.
        score (`str`, *optional*): ``"logprobs"`` or ``"parse"``; defaults to the template's (yes_no: logprobs,
            quality and your own: parse).
        answer_tokens (`list[str]`, *optional*, defaults to `["yes", "no"]`): the positive and the negative answer
            (logprobs scoring).
        scale_max (`float`, *optional*, defaults to 10): parse scoring divides the number by it.
        max_tokens (`int`, *optional*): answer length; 1 for logprobs, 16 for parse by default.
        timeout, retries, backoff: as the http kind (one image per request).
        parallel (`int`, *optional*, defaults to 8): requests in flight at once.
        api_key_env (`str`, *optional*): environment variable holding the API key (``Authorization: Bearer``).
        device, dtype: unused.
    """

    takes_metadata = True

    def __init__(self, *, base_url: str | list[str], model: str, template: str = "yes_no", score: str | None = None,
                 answer_tokens: list[str] | None = None, scale_max: float = 10.0, max_tokens: int | None = None,
                 timeout: float = 120.0, retries: int = 2, backoff: float = 1.0, parallel: int = 8,
                 api_key_env: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32):
        urls = tuple(u.rstrip("/") + "/chat/completions" for u in parse_urls(base_url, "vlm"))
        self.url = ", ".join(urls)
        self.model, self.template = str(model), TEMPLATES.get(template, template)
        if "{prompt}" not in self.template:
            raise ValueError(f"vlm reward template must be one of {sorted(TEMPLATES)} or contain {{prompt}}; "
                             f"got {template!r}.")
        self.score = score or DEFAULT_SCORE.get(template, "parse")
        if self.score not in SCORES:
            raise ValueError(f"vlm reward score must be one of {SCORES}; got {score!r}.")
        tokens = answer_tokens or ["yes", "no"]
        if len(tokens) != 2:
            raise ValueError(f"vlm reward answer_tokens must be [positive, negative]; got {answer_tokens!r}.")
        self.positive, self.negative = (str(t).strip().lower() for t in tokens)
        self.scale_max = float(scale_max)
        self.max_tokens = max_tokens or (1 if self.score == "logprobs" else 16)
        if not timeout > 0 or retries < 0 or backoff < 0:
            raise ValueError(f"vlm reward needs timeout > 0, retries >= 0, backoff >= 0; got timeout={timeout!r}, "
                             f"retries={retries!r}, backoff={backoff!r}.")
        self.parallel = check_batch_size(parallel)
        self.transport = Transport(urls, timeout=timeout, retries=retries, backoff=backoff,
                                   headers=bearer_headers(api_key_env, "vlm"))
        self._pool: ThreadPoolExecutor | None = None
        self.name = "vlm"

    def load(self) -> VlmReward:
        return self

    def question(self, prompt: str, metadata: dict) -> str:
        try:
            return self.template.format_map({**metadata, "prompt": prompt})
        except KeyError as err:
            raise ValueError(f"vlm reward template needs {{{err.args[0]}}}, which the prompt's metadata lacks "
                             f"(it has {sorted(metadata)}).") from None

    def _ask(self, image: Image.Image, prompt: str, metadata: dict) -> float:
        url = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")
        request = {"model": self.model, "temperature": 0.0, "max_tokens": self.max_tokens, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": self.question(prompt, metadata)}]}]}
        if self.score == "logprobs":
            request.update(logprobs=True, top_logprobs=20)
        answer, server = self.transport.post(json.dumps(request).encode(), "application/json")
        try:
            choice = json.loads(answer)["choices"][0]
            text = choice["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise RemoteRewardError(f"{server} answered something other than a chat completion: "
                                    f"{answer[:120]!r}") from None
        if self.score == "parse":
            number = NUMBER.search(text)
            if number is None:
                raise RemoteRewardError(f"{server}: no number in the judge's answer {text[:80]!r}")
            return float(number.group()) / self.scale_max
        return self._yes_probability(choice, text)

    def _yes_probability(self, choice: dict, text: str) -> float:
        """P(positive) / (P(positive) + P(negative)) over the first answer token's top log-probs."""
        try:
            top = choice["logprobs"]["content"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise RemoteRewardError(f"{self.url} returned no logprobs; use a server that does (vLLM, SGLang) or "
                                    "score = \"parse\"") from None
        mass = {self.positive: 0.0, self.negative: 0.0}
        for entry in top:
            token = str(entry.get("token", "")).strip().lower()
            if token in mass:
                mass[token] += math.exp(float(entry["logprob"]))
        total = mass[self.positive] + mass[self.negative]
        if total == 0:  # neither answer among the top tokens: read the text
            return 1.0 if text.strip().lower().startswith(self.positive) else 0.0
        return mass[self.positive] / total

    def __call__(self, images: list[Image.Image], prompts: list[str], metadata: list[dict] | None = None
                 ) -> torch.Tensor:
        n = check_batch(images, prompts, self.name)
        metadata = [{} for _ in range(n)] if metadata is None else list(metadata)
        for prompt, meta in zip(prompts, metadata, strict=True):
            self.question(prompt, meta)  # a template/metadata mismatch fails before any request
        if self._pool is None:  # kept, so its threads' keep-alive connections live across calls
            self._pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="vlm-reward")
        scores = list(self._pool.map(self._ask, images, prompts, metadata))
        return torch.tensor(scores, dtype=torch.float32)
