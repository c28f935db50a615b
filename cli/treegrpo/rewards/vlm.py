"""A vision-language model as judge: ``kind = "vlm"`` asks any OpenAI-compatible chat endpoint (vLLM, SGLang,
`transformers serve`, a hosted API) about each image and turns the answer into a score.

Three ways to score (``score``):

- ``"logprobs"``: one answer token is requested with its top log-probabilities, and the score is
  P(yes) / (P(yes) + P(no)), summing the probability of every top token that reads as a positive or a negative answer
  (``answer_tokens``, compared case- and space-insensitively). Smooth in the model's confidence: a better GRPO
  signal than a hard yes/no. Needs a server that returns ``logprobs`` (vLLM and SGLang do).
- ``"answer"``: the answer's first word, 1 for the positive and 0 for the negative answer, for servers without
  log-probs (`transformers serve` ignores the field).
- ``"parse"``: the rating in the answer (`parse_rating`: "7/10", "7 out of 10", "Rating: 7", or the first number
  that is not part of a range such as "1 to 10"), divided by ``scale_max``.

An answer that cannot be read that way (no answer token among the top log-probs and a first word that is neither
answer, or no rating within 0..``scale_max``) is never silently scored: it gets the neutral 0.5, is counted in the
``unreadable`` sub-score (logged per epoch as ``reward/<name>/unreadable``), and more than ``max_unreadable`` of a
batch stops the run with one of the answers quoted (a judge that starts with "The" or ``<think>``, a template that
asks for something else).

Templates (``template``): ``"yes_no"`` (alignment: does the image show the prompt?), ``"quality"`` (a 1–10 rating),
``"edit"`` (editing: the judge sees the source image, then the edit, and is asked whether the instruction was
followed with the rest kept), or your own text with ``{prompt}`` and any metadata field of the prompt's ``.jsonl``
line (``{objects}``, ``{text}``, ...); with editing prompts every template shows the source first. Literal braces
are written doubled, ``{{`` and ``}}``, as in Python's `str.format`.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import string
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
    "edit": 'The first image is the original; the second was edited from it for the instruction "{prompt}". Does the '
            "second image follow the instruction while keeping the rest of the original? Answer with one word: Yes "
            "or No.",
}
DEFAULT_SCORE = {"yes_no": "logprobs", "quality": "parse", "edit": "logprobs"}
SCORES = ("logprobs", "answer", "parse")
NUMBER = r"[-+]?\d+(?:\.\d+)?"
_OUT_OF = re.compile(rf"({NUMBER})\s*(?:/|out of)\s*({NUMBER})", re.IGNORECASE)
_RANGE = re.compile(rf"{NUMBER}\s*(?:to|-|–|—)\s*{NUMBER}", re.IGNORECASE)
_LABELLED = re.compile(rf"(?:rating|score|rate|grade|give it)\D{{0,20}}?({NUMBER})", re.IGNORECASE)
UNREADABLE_SCORE = 0.5  # neutral: an unreadable answer pushes no leaf up or down
logger = logging.getLogger(__name__)


def parse_rating(text: str, scale_max: float) -> float | None:
    """A rating read from a judge's answer, in [0, 1]; None when there is none within 0..`scale_max`.

    "7/10" and "7 out of 10" give 0.7 whatever `scale_max` (the answer names its own scale); "Rating: 7" and "I'd
    give it a 7" give 7 / `scale_max`; otherwise the first number that is not part of a range ("On a scale of 1 to
    10, ... 7" reads 7, not 1). A number outside 0..`scale_max` ("85" on a 1-10 scale) is not a rating on that scale:
    None, not a clamped 1.0."""
    fraction = _OUT_OF.search(text)
    if fraction and float(fraction.group(2)) > 0:
        value, top = float(fraction.group(1)), float(fraction.group(2))
        return value / top if 0 <= value <= top else None
    text = _RANGE.sub(" ", text)
    found = _LABELLED.search(text) or re.search(NUMBER, text)
    if found is None:
        return None
    value = float(found.group(1) if found.groups() else found.group())
    return value / scale_max if 0 <= value <= scale_max else None


def template_fields(template: str) -> set[str]:
    """The fields a template fills in (`{prompt}`, metadata fields). ValueError for a malformed template, saying
    that literal braces are doubled."""
    try:
        return {name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(template)
                if name is not None}
    except ValueError as err:
        raise ValueError(f"vlm reward template {template[:60]!r}...: {err}; write literal braces doubled, {{{{ and "
                         "}}.") from None


class VlmReward(RewardBase):
    """A VLM judge behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        base_url (`str` or `list[str]`): the API root, e.g. ``"http://127.0.0.1:8000/v1"`` (``/chat/completions``
            is appended); several (a list, or separated by commas) are used in turn, as the http kind's urls.
        model (`str`): the model name the server serves, e.g. ``"Qwen/Qwen2.5-VL-7B-Instruct"``.
        template (`str`, *optional*, defaults to `"yes_no"`): ``"yes_no"``, ``"quality"`` or your own text with
            ``{prompt}`` and metadata fields.
        score (`str`, *optional*): ``"logprobs"``, ``"answer"`` or ``"parse"``; defaults to the template's (yes_no:
            logprobs, quality and your own: parse).
        answer_tokens (`list[str]`, *optional*, defaults to `["yes", "no"]`): the positive and the negative answer
            (logprobs scoring).
        scale_max (`float`, *optional*, defaults to 10): parse scoring divides the number by it.
        max_tokens (`int`, *optional*): answer length; 1 for logprobs, 16 for answer and parse by default.
        timeout, retries, backoff: as the http kind (one image per request).
        parallel (`int`, *optional*, defaults to 8): requests in flight at once.
        api_key_env (`str`, *optional*): environment variable holding the API key (``Authorization: Bearer``).
        max_unreadable (`float`, *optional*, defaults to 0.1): the share of a batch's answers that may be unreadable
            (scored 0.5 and counted); more stops the run.
        device, dtype: unused.
    """

    takes_metadata = True
    takes_source_images = True  # editing prompts: the judge sees the source image before the edit

    def __init__(self, *, base_url: str | list[str], model: str, template: str = "yes_no", score: str | None = None,
                 answer_tokens: list[str] | None = None, scale_max: float = 10.0, max_tokens: int | None = None,
                 timeout: float = 120.0, retries: int = 2, backoff: float = 1.0, parallel: int = 8,
                 api_key_env: str | None = None, max_unreadable: float = 0.1, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32):
        urls = tuple(u.rstrip("/") + "/chat/completions" for u in parse_urls(base_url, "vlm"))
        self.url = ", ".join(urls)
        self.model, self.template = str(model), TEMPLATES.get(template, template)
        self.needs_source = template == "edit"
        fields = template_fields(self.template)
        if "prompt" not in fields:
            raise ValueError(f"vlm reward template must be one of {sorted(TEMPLATES)} or contain {{prompt}}; "
                             f"got {template!r}.")
        bad = sorted(f for f in fields if not f.isidentifier())
        if bad:  # '{"score": 7}' in a template reads as a field named '"score"'
            raise ValueError(f"vlm reward template has fields {bad}, which are not names: write literal braces "
                             "doubled, {{ and }} (e.g. 'answer as {{\"score\": N}}').")
        self.fields = fields - {"prompt"}
        self.score = score or DEFAULT_SCORE.get(template, "parse")
        if self.score not in SCORES:
            raise ValueError(f"vlm reward score must be one of {SCORES}; got {score!r}.")
        tokens = answer_tokens or ["yes", "no"]
        if len(tokens) != 2:
            raise ValueError(f"vlm reward answer_tokens must be [positive, negative]; got {answer_tokens!r}.")
        self.positive, self.negative = (str(t).strip().lower() for t in tokens)
        self.scale_max = float(scale_max)
        self.max_tokens = max_tokens or (1 if self.score == "logprobs" else 16)
        if not 0 <= max_unreadable <= 1:
            raise ValueError(f"vlm reward max_unreadable is a fraction of a batch, 0 to 1; got {max_unreadable!r}.")
        self.max_unreadable = float(max_unreadable)
        self.parallel = check_batch_size(parallel)
        self.last_subscores: dict[str, torch.Tensor] = {}
        self.transport = Transport(urls, timeout=timeout, retries=retries, backoff=backoff,
                                   headers=bearer_headers(api_key_env, "vlm"), kind="vlm")
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

    def _ask(self, image: Image.Image, prompt: str, metadata: dict, source: Image.Image | None = None
             ) -> tuple[float, str | None]:
        """(score, None) for a readable answer; (`UNREADABLE_SCORE`, the answer) otherwise. An edit's source image
        goes first, then the edit, then the question."""
        shown = [source, image] if source is not None else [image]
        content = [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(png_bytes(picture)).decode("ascii")}}
            for picture in shown]
        request = {"model": self.model, "temperature": 0.0, "max_tokens": self.max_tokens, "messages": [
            {"role": "user", "content": [*content, {"type": "text", "text": self.question(prompt, metadata)}]}]}
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
            value = parse_rating(text, self.scale_max)
        elif self.score == "answer":
            value = self._read_answer(text)
        else:
            value = self._yes_probability(choice, server)
            if value is None:  # neither answer among the top tokens: the first word may still say it
                value = self._read_answer(text)
        return (value, None) if value is not None else (UNREADABLE_SCORE, text)

    def _read_answer(self, text: str) -> float | None:
        words = re.findall(r"[\w']+", text.lower())
        first = words[0] if words else ""
        return 1.0 if first == self.positive else 0.0 if first == self.negative else None

    def _yes_probability(self, choice: dict, server: str) -> float | None:
        """P(positive) / (P(positive) + P(negative)) over the first answer token's top log-probs; None when neither
        is among them."""
        try:
            top = choice["logprobs"]["content"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise RemoteRewardError(f"{server} returned no logprobs; use a server that does (vLLM, SGLang), or "
                                    "score = \"answer\" (reads the yes/no answer) or \"parse\"") from None
        mass = {self.positive: 0.0, self.negative: 0.0}
        for entry in top:
            token = str(entry.get("token", "")).strip().lower()
            if token in mass:
                mass[token] += math.exp(float(entry["logprob"]))
        total = mass[self.positive] + mass[self.negative]
        return mass[self.positive] / total if total > 0 else None

    def __call__(self, images: list[Image.Image], prompts: list[str], metadata: list[dict] | None = None,
                 source_images: list[Image.Image] | None = None) -> torch.Tensor:
        n = check_batch(images, prompts, self.name)
        metadata = [{} for _ in range(n)] if metadata is None else list(metadata)
        if self.needs_source and source_images is None:
            raise ValueError('vlm reward template "edit" shows the judge each source image, but the prompts name '
                             'none; give each .jsonl prompt line an "image" (editing models)')
        sources = list(source_images) if source_images is not None else [None] * n
        for prompt, meta in zip(prompts, metadata, strict=True):
            self.question(prompt, meta)  # a template/metadata mismatch fails before any request
        if self._pool is None:  # kept, so its threads' keep-alive connections live across calls
            self._pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="vlm-reward")
        results = list(self._pool.map(self._ask, images, prompts, metadata, sources))
        unreadable = [text for _, text in results if text is not None]
        if n and len(unreadable) > self.max_unreadable * n:
            raise RemoteRewardError(
                f"{len(unreadable)} of {n} answers of the judge {self.model!r} could not be read as "
                + (f"a rating within 0..{self.scale_max:g}" if self.score == "parse" else
                   f"{self.positive!r} or {self.negative!r}")
                + f" (more than max_unreadable = {self.max_unreadable:g}), e.g. {unreadable[0][:80]!r}: make the "
                "template ask for exactly that answer, or raise max_tokens for a judge that explains first.")
        if unreadable:
            logger.warning("vlm reward: %d of %d answers unreadable, scored %.1f (e.g. %r)", len(unreadable), n,
                           UNREADABLE_SCORE, unreadable[0][:80])
        self.last_subscores = {"unreadable": torch.tensor([float(text is not None) for _, text in results])}
        return torch.tensor([score for score, _ in results], dtype=torch.float32)
