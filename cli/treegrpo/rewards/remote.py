"""The reward-server protocol, both ends: what `kind = "http"` sends and what `treegrpo reward-server` answers.

A request is one HTTP POST of a batch, in either body:

- ``application/json``: ``{"prompts": [str, ...], "metadata": [object, ...], "images": [base64 PNG, ...]}``
- ``multipart/form-data``: a part ``request`` (the same JSON without ``images``) and parts ``image_0`` ...
  ``image_{N-1}`` (``image/png``): no base64 inflation, for large images.

The answer is JSON: ``{"scores": [float, ...]}`` with one score per image, in order, and optionally
``"subscores": {"name": [float, ...], ...}`` (each the same length; the trainer logs their means). Nothing is
pickled in either direction: a compromised server can send wrong numbers, never code. Only the standard library is
used (``urllib``, ``http.server``), so a reward server needs no extra dependency.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import time
import urllib.error
import urllib.request
import uuid
from email.parser import BytesParser
from email.policy import HTTP

import torch
from PIL import Image

BODIES = ("json", "multipart")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_IMAGE_PIXELS = 4096 * 4096  # per image; a larger one is refused before it is decoded (decompression bombs)
RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})  # worth another try; other 4xx will fail again


class RemoteRewardError(RuntimeError):
    """A remote reward call failed; the message is one line naming the URL and what happened."""


class RequestTooLarge(ValueError):
    """A request the server refuses by its size (answered 413), judged before anything is decoded."""


def bearer_headers(api_key_env: str | None, kind: str) -> dict[str, str]:
    """`Authorization: Bearer <token>` from the environment variable `api_key_env` (so no token is written into a
    recipe); no header when it is None; ValueError naming the variable when it is unset."""
    if api_key_env is None:
        return {}
    token = os.environ.get(api_key_env)
    if not token:
        raise ValueError(f"{kind} reward api_key_env = {api_key_env!r}: that environment variable is not set.")
    return {"Authorization": f"Bearer {token}"}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def encode_request(images: list[Image.Image], prompts: list[str], metadata: list[dict], body: str = "json"
                   ) -> tuple[bytes, str]:
    """(request body, content type) of one batch."""
    if body == "json":
        payload = {"prompts": prompts, "metadata": metadata,
                   "images": [base64.b64encode(png_bytes(image)).decode("ascii") for image in images]}
        return json.dumps(payload).encode(), "application/json"
    if body != "multipart":
        raise ValueError(f"body must be one of {BODIES}; got {body!r}.")
    boundary = uuid.uuid4().hex
    parts = [(b'Content-Disposition: form-data; name="request"\r\nContent-Type: application/json\r\n\r\n'
              + json.dumps({"prompts": prompts, "metadata": metadata}).encode())]
    parts += [(f'Content-Disposition: form-data; name="image_{i}"; filename="{i}.png"\r\n'
               "Content-Type: image/png\r\n\r\n").encode() + png_bytes(image) for i, image in enumerate(images)]
    data = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return data + b"--" + boundary.encode() + b"--\r\n", f"multipart/form-data; boundary={boundary}"


def decode_request(data: bytes, content_type: str, *, max_pixels: int = MAX_IMAGE_PIXELS
                   ) -> tuple[list[Image.Image], list[str], list[dict]]:
    """The server side of `encode_request`: (images, prompts, metadata). ValueError for a malformed body (the
    message names the field, never an object's address); `RequestTooLarge` for an image over `max_pixels`, judged
    from its PNG header before it is decoded. Only PNG is accepted, as the protocol says."""
    if content_type.startswith("application/json"):
        payload = json.loads(data)
        if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
            raise ValueError('the body must be a JSON object with an "images" list of base64 PNGs')
        encoded = [base64.b64decode(text, validate=True) if isinstance(text, str) else b""
                   for text in payload["images"]]
    elif content_type.startswith("multipart/form-data"):
        message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + data)
        fields = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                  for part in message.iter_parts()}
        if "request" not in fields:
            raise ValueError('the multipart body has no "request" part (the JSON with prompts and metadata)')
        payload = json.loads(fields["request"])
        count = sum(1 for name in fields if str(name).startswith("image_"))
        encoded = [fields.get(f"image_{i}") or b"" for i in range(count)]
    else:
        raise ValueError(f"unsupported content type {content_type!r}; send application/json or multipart/form-data")
    prompts, metadata = _checked_texts(payload, len(encoded))
    return [_decoded_png(blob, i, max_pixels) for i, blob in enumerate(encoded)], prompts, metadata


def _checked_texts(payload, count: int) -> tuple[list[str], list[dict]]:
    """The request's prompts (a list of strings) and metadata (a list of objects, or absent)."""
    prompts = payload.get("prompts") if isinstance(payload, dict) else None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError('"prompts" must be a list of strings, one per image')
    metadata = payload.get("metadata")
    if metadata is None:
        metadata = [{} for _ in prompts]
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise ValueError('"metadata" must be a list of objects, one per image (or absent)')
    if not (count == len(prompts) == len(metadata)):
        raise ValueError(f"{count} images, {len(prompts)} prompts and {len(metadata)} metadata entries; "
                         "send one of each per image")
    return prompts, metadata


def _decoded_png(blob: bytes, index: int, max_pixels: int) -> Image.Image:
    """One PNG, its size read from the IHDR chunk (bytes 16-24) and refused above `max_pixels` before decoding."""
    if not blob.startswith(PNG_SIGNATURE) or len(blob) < 24 or blob[12:16] != b"IHDR":
        raise ValueError(f"image {index} is not a PNG (the protocol sends PNG only)")
    width, height = int.from_bytes(blob[16:20], "big"), int.from_bytes(blob[20:24], "big")
    if width * height > max_pixels:
        raise RequestTooLarge(f"image {index} is {width}×{height} pixels; this server takes at most {max_pixels:,} "
                              "pixels per image")
    try:
        with Image.open(io.BytesIO(blob), formats=["PNG"]) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"image {index} is not a readable PNG ({type(err).__name__})") from None


def decode_scores(data: bytes, count: int, url: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scores float32 `[count]` and sub-scores from a server's answer; `RemoteRewardError` for a wrong answer."""
    try:
        payload = json.loads(data)
        scores = [float(x) for x in payload["scores"]]
        subscores = {str(k): [float(x) for x in v] for k, v in (payload.get("subscores") or {}).items()}
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise RemoteRewardError(f"{url} answered something other than {{\"scores\": [numbers]}} "
                                f"({type(err).__name__}: {str(err)[:120]}): {data[:120]!r}") from None
    for name, values in [("scores", scores), *subscores.items()]:
        if len(values) != count:
            raise RemoteRewardError(f"{url} returned {len(values)} {name} for {count} images")
    if not all(math.isfinite(x) for x in scores):
        raise RemoteRewardError(f"{url} returned non-finite scores")
    return (torch.tensor(scores, dtype=torch.float32),
            {name: torch.tensor(values, dtype=torch.float32) for name, values in subscores.items()})


def post(url: str, data: bytes, content_type: str, *, timeout: float, retries: int, backoff: float,
         headers: dict[str, str] | None = None) -> bytes:
    """POST with a timeout per attempt and `retries` more attempts after a connection error, a timeout or a
    retryable status (408, 429, 5xx), waiting `backoff · 2^attempt` seconds between them. Raises
    `RemoteRewardError` with one line naming the URL and the last failure."""
    request_headers = {"Content-Type": content_type, "Accept": "application/json", **(headers or {})}
    failure = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        request = urllib.request.Request(url, data=data, headers=request_headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (the user's URL)
                return response.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:200].decode("utf-8", "replace").strip().replace("\n", " ")
            failure = f"HTTP {err.code} {err.reason}" + (f": {detail}" if detail else "")
            if err.code not in RETRIED_STATUS:
                break
        except TimeoutError:
            failure = f"no answer within {timeout:g} s (timeout)"
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, TimeoutError):
                failure = f"no answer within {timeout:g} s (timeout)"
            else:
                failure = f"cannot connect ({reason})"
        except (ConnectionError, OSError) as err:
            failure = f"connection failed ({type(err).__name__}: {err})"
    tries = f" after {retries + 1} attempts" if retries else ""
    raise RemoteRewardError(f"reward server {url}: {failure}{tries}")


def connection_problem(url: str, timeout: float = 2.0) -> str | None:
    """None if `url`'s host accepts a TCP connection on its port now, else why not (for `treegrpo check`)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return None
    except OSError as err:
        return str(err.strerror or err) if not isinstance(err, TimeoutError) else f"no answer within {timeout:g} s"
