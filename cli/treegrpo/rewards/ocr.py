"""`kind = "ocr"`: text rendering. The target is the prompt's quoted text (`a sign that says "OPEN"` -> OPEN), or a
`.jsonl` prompt's `text` field; the reward is 1 - normalised edit distance between it and what the OCR engine reads.

The distance is normalised by the longer of the two strings, so extra text costs as much as missing text. A peer's
OCR reward scored any image whose reading merely CONTAINED the target as perfect, and policies learned to fill the
image with text; here the whole reading counts. Both strings are compared lower-cased with whitespace removed (OCR
engines split and join words unreliably).

The engine is Tesseract (Debian/Ubuntu: `apt-get install tesseract-ocr`; macOS: `brew install tesseract`), run as
its command-line program on each image (PNG through stdin, text through stdout), `parallel` images at a time.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from treegrpo.rewards.base import RewardBase, check_batch

# "double", 'single', “curly” and ‘curly’ quotes; the first quoted span of a prompt is its target
_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”|‘([^’]+)’|(?<![A-Za-z])'([^']+)'(?![A-Za-z])")


def target_text(prompt: str, metadata: dict | None = None) -> str:
    """The text an image must show: metadata's `text`, else the prompt's first quoted span; ValueError if none."""
    if metadata and isinstance(metadata.get("text"), str) and metadata["text"]:
        return metadata["text"]
    match = _QUOTED.search(prompt)
    if match is None:
        raise ValueError(f"the ocr reward found no quoted text in the prompt {prompt!r}; quote the text to render "
                         '(a sign that says "OPEN") or give it as "text" in a .jsonl prompt file.')
    return next(group for group in match.groups() if group)


def normalize(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def text_similarity(read: str, target: str) -> float:
    """1 - edit distance / length of the longer string, on normalised strings; 1 for an exact reading."""
    read, target = normalize(read), normalize(target)
    longest = max(len(read), len(target))
    return 1.0 if longest == 0 else 1.0 - edit_distance(read, target) / longest


class OcrReward(RewardBase):
    """Text-rendering reward on Tesseract.

    Args:
        psm (`int`, defaults to 6): Tesseract's page segmentation mode (6: one block of text; 7: one line).
        lang (`str`, defaults to "eng"): Tesseract language(s), e.g. "eng+deu".
        tesseract_cmd (`str`, defaults to "tesseract"): the program, on PATH or a path.
        parallel (`int`, defaults to 4): images read at once (one Tesseract process each).
        timeout (`float`, defaults to 60): seconds one image may take.
    """

    name = "ocr"
    takes_metadata = True

    def __init__(self, *, psm: int = 6, lang: str = "eng", tesseract_cmd: str = "tesseract", parallel: int = 4,
                 timeout: float = 60.0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        del device, dtype  # runs on the CPU
        if not isinstance(psm, int) or not 0 <= psm <= 13:
            raise ValueError(f"ocr: psm = {psm!r} is not a Tesseract page segmentation mode (0-13; 6 or 7 for text).")
        if not isinstance(parallel, int) or parallel < 1:
            raise ValueError(f"ocr: parallel = {parallel!r}; give a positive number of images read at once.")
        self.psm, self.lang, self.tesseract_cmd = psm, lang, tesseract_cmd
        self.parallel, self.timeout = parallel, timeout
        self.last_readings: list[str] = []

    def load(self) -> OcrReward:
        if shutil.which(self.tesseract_cmd) is None:
            raise FileNotFoundError(
                f"the ocr reward needs the Tesseract program ({self.tesseract_cmd!r} is not on PATH); install it "
                "(Debian/Ubuntu: apt-get install tesseract-ocr; macOS: brew install tesseract) or set tesseract_cmd.")
        return self

    def read(self, image: Image.Image) -> str:
        """What Tesseract reads in one image."""
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        command = [self.tesseract_cmd, "-", "-", "--psm", str(self.psm), "-l", self.lang]
        result = subprocess.run(command, input=buffer.getvalue(), capture_output=True, timeout=self.timeout)
        if result.returncode != 0:
            message = result.stderr.decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"tesseract failed (exit {result.returncode}): {message[-1] if message else ''}")
        return result.stdout.decode(errors="replace").strip()

    def __call__(self, images, prompts, metadata: list[dict] | None = None) -> torch.Tensor:
        n = check_batch(images, prompts, "ocr")
        targets = [target_text(p, m) for p, m in zip(prompts, metadata or [None] * n, strict=True)]
        self.load()
        with ThreadPoolExecutor(max_workers=min(self.parallel, max(n, 1))) as pool:
            self.last_readings = list(pool.map(self.read, images))
        return torch.tensor([text_similarity(r, t) for r, t in zip(self.last_readings, targets, strict=True)],
                            dtype=torch.float32)
