"""The reward-server protocol, both ends: what `kind = "http"` sends and what `treegrpo reward-server` answers.

A request is one HTTP POST of a batch, in either body:

- ``application/json``: ``{"prompts": [str, ...], "metadata": [object, ...], "images": [base64 PNG, ...]}``
- ``multipart/form-data``: a part ``request`` (the same JSON without ``images``) and parts ``image_0`` ...
  ``image_{N-1}`` (``image/png``): no base64 inflation, for large images.

Editing prompts add their source images: ``"source_images"`` (base64 PNGs; multipart parts ``source_0`` ...) holds
each DISTINCT source once and ``"source_index"`` (in the JSON) names, per image, which one it edits: a tree's 27
leaves share one source, which travels once, not 27 times. Without ``"source_index"`` there is one source per image
(the older form, still accepted).

The answer is JSON: ``{"scores": [float, ...]}`` with one score per image, in order, and optionally
``"subscores": {"name": [float, ...], ...}`` (each the same length; the trainer logs their means). Nothing is
pickled in either direction: a compromised server can send wrong numbers, never code, and the client accepts only a
list of finite numbers that fit float32. Only the standard library is used (``http.client``, ``http.server``), so a
reward server needs no extra dependency; how the client connects, times out and retries is in
`treegrpo.rewards.transport`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import uuid
from email.parser import BytesParser
from email.policy import HTTP

import torch
from PIL import Image

from treegrpo.rewards.transport import RemoteRewardError  # raised here too; importable from here as before

BODIES = ("json", "multipart")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_IMAGE_PIXELS = 4096 * 4096  # per image; a larger one is refused before it is decoded (decompression bombs)


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


def encode_request(images: list[Image.Image], prompts: list[str], metadata: list[dict], body: str = "json",
                   source_images: list[Image.Image] | None = None) -> tuple[bytes, str]:
    """(request body, content type) of one batch; editing prompts send their distinct source images once each and
    which one every image edits."""
    texts: dict = {"prompts": prompts, "metadata": metadata}
    sources: list[Image.Image] = []
    if source_images is not None:
        sources, texts["source_index"] = distinct_images(source_images)
    if body == "json":
        payload = {**texts, "images": _base64_pngs(images)}
        if source_images is not None:
            payload["source_images"] = _base64_pngs(sources)
        return json.dumps(payload).encode(), "application/json"
    if body != "multipart":
        raise ValueError(f"body must be one of {BODIES}; got {body!r}.")
    boundary = uuid.uuid4().hex
    parts = [(b'Content-Disposition: form-data; name="request"\r\nContent-Type: application/json\r\n\r\n'
              + json.dumps(texts).encode())]
    parts += [(f'Content-Disposition: form-data; name="{field}_{i}"; filename="{field}_{i}.png"\r\n'
               "Content-Type: image/png\r\n\r\n").encode() + png_bytes(image)
              for field, batch in (("image", images), ("source", sources))
              for i, image in enumerate(batch)]
    data = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return data + b"--" + boundary.encode() + b"--\r\n", f"multipart/form-data; boundary={boundary}"


def distinct_images(images: list[Image.Image]) -> tuple[list[Image.Image], list[int]]:
    """The distinct images (equal RGB pixels count as one, whatever the object) and each image's index among them."""
    seen: dict[tuple, int] = {}
    distinct, index = [], []
    for image in images:
        rgb = image.convert("RGB")
        key = (rgb.size, hashlib.blake2b(rgb.tobytes(), digest_size=16).digest())
        if key not in seen:
            seen[key] = len(distinct)
            distinct.append(rgb)
        index.append(seen[key])
    return distinct, index


def decode_request(data: bytes, content_type: str, *, max_pixels: int = MAX_IMAGE_PIXELS
                   ) -> tuple[list[Image.Image], list[str], list[dict], list[Image.Image] | None]:
    """The server side of `encode_request`: (images, prompts, metadata, source images or None). ValueError for a
    malformed body (the message names the field, never an object's address); `RequestTooLarge` for an image (or
    source) over `max_pixels`, judged from its PNG header before it is decoded. Only PNG is accepted, as the protocol
    says."""
    if content_type.startswith("application/json"):
        payload = json.loads(data)
        if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
            raise ValueError('the body must be a JSON object with an "images" list of base64 PNGs')
        encoded = _unbase64(payload["images"])
        sources = payload.get("source_images")
        if sources is not None and not isinstance(sources, list):
            raise ValueError('"source_images" must be a list of base64 PNGs, one per image (or absent)')
        sources = None if sources is None else _unbase64(sources)
    elif content_type.startswith("multipart/form-data"):
        message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + data)
        fields = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                  for part in message.iter_parts()}
        if "request" not in fields:
            raise ValueError('the multipart body has no "request" part (the JSON with prompts and metadata)')
        payload = json.loads(fields["request"])
        encoded, sources = _numbered_parts(fields, "image"), _numbered_parts(fields, "source") or None
    else:
        raise ValueError(f"unsupported content type {content_type!r}; send application/json or multipart/form-data")
    prompts, metadata = _checked_texts(payload, len(encoded))
    index = _source_index(payload, sources, len(encoded))
    decoded = [_decoded_png(blob, i, max_pixels) for i, blob in enumerate(encoded)]
    if sources is None:
        return decoded, prompts, metadata, None
    distinct = [_decoded_png(blob, i, max_pixels) for i, blob in enumerate(sources)]  # each decoded once
    # a copy per image, as `treegrpo.sources.load_source_images` gives: a reward that draws on one changes no other
    return decoded, prompts, metadata, [distinct[i].copy() for i in index]


def _source_index(payload: dict, sources: list[bytes] | None, count: int) -> list[int]:
    """Which source each image edits: `source_index` (a list of `count` indices into the sources), or, without
    it, the i-th source for the i-th image."""
    index = payload.get("source_index")
    if sources is None:
        if index is not None:
            raise ValueError('"source_index" without "source_images"; send the sources it indexes')
        return []
    if index is None:
        if len(sources) != count:
            raise ValueError(f"{count} images and {len(sources)} source images; send one source per image, or "
                             '"source_index"')
        return list(range(count))
    if (not isinstance(index, list) or len(index) != count
            or not all(type(i) is int and 0 <= i < len(sources) for i in index)):
        raise ValueError(f'"source_index" must list, for each of the {count} images, the index of its source among '
                         f"the {len(sources)} sent")
    return index


def _base64_pngs(images: list[Image.Image]) -> list[str]:
    return [base64.b64encode(png_bytes(image)).decode("ascii") for image in images]


def _unbase64(texts: list) -> list[bytes]:
    """Base64 strings to bytes (anything else to b"", refused as "not a PNG" with its index)."""
    return [base64.b64decode(text, validate=True) if isinstance(text, str) else b"" for text in texts]


def _numbered_parts(fields: dict, name: str) -> list[bytes]:
    """A multipart body's parts `<name>_0`, `<name>_1`, ... in order (a missing one as b"")."""
    count = sum(1 for field in fields if str(field).startswith(f"{name}_"))
    return [fields.get(f"{name}_{i}") or b"" for i in range(count)]


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


FLOAT32_MAX = 3.4028234663852886e38


def decode_scores(data: bytes, count: int, url: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scores float32 `[count]` and sub-scores from a server's answer; `RemoteRewardError` for anything but
    `{"scores": [count finite numbers], "subscores": {name: [count finite numbers]}}` (a list, not an object keyed by
    index; numbers, not booleans or strings; each within float32's range, so none becomes inf)."""
    try:
        payload = json.loads(data)
    except ValueError:
        payload = None
    if not isinstance(payload, dict) or "scores" not in payload:
        raise RemoteRewardError(f"{url} answered something other than {{\"scores\": [numbers]}}: {data[:120]!r}")
    subscores = payload.get("subscores") or {}
    if not isinstance(subscores, dict):
        raise RemoteRewardError(f"{url} returned subscores that are not an object of lists: {str(subscores)[:80]}")
    checked = {name: _finite_list(values, name, count, url)
               for name, values in [("scores", payload["scores"]), *subscores.items()]}
    scores = checked.pop("scores")
    return (torch.tensor(scores, dtype=torch.float32),
            {str(name): torch.tensor(values, dtype=torch.float32) for name, values in checked.items()})


def _finite_list(values, name: str, count: int, url: str) -> list[float]:
    if not isinstance(values, list) or not all(type(x) in (int, float) for x in values):
        raise RemoteRewardError(f"{url} returned {name} that are not a list of numbers: {str(values)[:80]}")
    if len(values) != count:
        raise RemoteRewardError(f"{url} returned {len(values)} {name} for {count} images")
    bad = [x for x in values if not (math.isfinite(x) and abs(x) <= FLOAT32_MAX)]
    if bad:
        raise RemoteRewardError(f"{url} returned {name} that are not finite float32 numbers: {bad[:3]}")
    return [float(x) for x in values]


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
