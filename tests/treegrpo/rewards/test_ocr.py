"""The OCR reward: target text, edit distance, and Tesseract reading text rendered with PIL.

`.ci/run` installs Tesseract (Debian's tesseract-ocr) and sets TREEGRPO_REQUIRE_OCR=1, so there a missing engine
fails instead of skipping."""

import os
import shutil

import pytest
from PIL import Image, ImageDraw, ImageFont

from treegrpo.rewards import build_reward
from treegrpo.rewards.ocr import edit_distance, target_text, text_similarity

HAVE_TESSERACT = shutil.which("tesseract") is not None
needs_tesseract = pytest.mark.skipif(
    not HAVE_TESSERACT and os.environ.get("TREEGRPO_REQUIRE_OCR") != "1",
    reason="Tesseract is not installed (apt-get install tesseract-ocr)",
)


def test_target_is_the_first_quoted_span_or_the_metadata_text():
    assert target_text('a neon sign that says "Open 24h" at night') == "Open 24h"
    assert target_text("a mug with “Good morning” on it") == "Good morning"
    assert target_text("a banner reading 'SALE' and 'NOW'") == "SALE"
    assert target_text("the baker's shop sign 'FRESH BREAD'") == "FRESH BREAD"  # an apostrophe is not a quote
    assert target_text("a sign", {"text": "EXIT"}) == "EXIT"
    with pytest.raises(ValueError, match="no quoted text in the prompt 'a red sign'"):
        target_text("a red sign")


def test_edit_distance_and_similarity_against_hand_counts():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == edit_distance("abc", "") == 3
    assert edit_distance("flaw", "lawn") == 2
    assert text_similarity("Hello World", "helloworld") == 1.0  # case and spaces do not count
    assert text_similarity("OPEN", "OPEM") == pytest.approx(0.75)
    # the substring shortcut a peer's reward had: a reading that merely contains the target is not perfect
    assert text_similarity("OPEN OPEN OPEN", "OPEN") == pytest.approx(1 - 8 / 12)
    assert text_similarity("", "") == 1.0


def text_image(text: str, scale: int = 4) -> Image.Image:
    """Black text on white in Pillow's default font, upscaled 4x (a 10-11 px font is too small for Tesseract).
    `load_default()` without a size: Pillow 10.0, the lowest allowed, has no sized default font."""
    font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("RGB", (right - left + 10, bottom - top + 10), "white")
    ImageDraw.Draw(image).text((5 - left, 5 - top), text, fill="black", font=font)
    return image.resize((image.width * scale, image.height * scale), Image.LANCZOS)


@needs_tesseract
def test_tesseract_reads_rendered_text_and_the_reward_ranks_it():
    reward = build_reward("ocr", psm=7)
    images = [text_image("HELLO WORLD"), text_image("HELLO"), text_image("HELLO WORLD HELLO WORLD"),
              Image.new("RGB", (200, 80), "white")]
    prompts = ['a sign that says "HELLO WORLD"'] * 4
    scores = reward(images, prompts)
    assert reward.last_readings[0].replace(" ", "").upper() == "HELLOWORLD"
    assert scores[0] == 1.0
    assert scores[1] == pytest.approx(text_similarity(reward.last_readings[1], "HELLO WORLD"))
    assert scores[0] > scores[1] > scores[3] and scores[0] > scores[2]  # extra text costs too
    assert scores[3] == 0.0
    by_metadata = reward.score([images[1]], ["a sign"], metadata=[{"text": "HELLO"}])
    assert by_metadata.tolist() == [1.0]


def test_missing_engine_and_bad_options_are_named():
    with pytest.raises(FileNotFoundError, match="apt-get install tesseract-ocr"):
        build_reward("ocr", tesseract_cmd="no-such-tesseract")(
            [Image.new("RGB", (8, 8))], ['say "x"'])
    with pytest.raises(ValueError, match="psm = 42 is not a Tesseract page segmentation mode"):
        build_reward("ocr", psm=42)
    with pytest.raises(ValueError, match="parallel = 0"):
        build_reward("ocr", parallel=0)
