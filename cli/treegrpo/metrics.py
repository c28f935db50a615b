"""Run outputs besides checkpoints: metrics.jsonl, an optional tracker, sample grids and the reward curve PNG.

Plots are drawn with PIL only (no matplotlib dependency).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON object per epoch to `metrics.jsonl` (main process only); on resume, later epochs written
    by the interrupted run are dropped so the file matches the resumed trajectory."""

    def __init__(self, path: Path, *, resume_after_epoch: int | None = None, enabled: bool = True, warn=None):
        self.path, self.enabled = Path(path), enabled
        if enabled and resume_after_epoch is not None and self.path.is_file():
            kept = [record for record in self._records(warn) if record["epoch"] < resume_after_epoch]
            self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        elif enabled and resume_after_epoch is None and self.path.exists():
            self.path.unlink()

    def _records(self, warn=None) -> list[dict]:
        """The epochs in the file; a damaged line (a partial last line after a kill or a full disk) is dropped with
        a warning, since the resumed run rewrites every epoch after its checkpoint anyway."""
        records = []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                    raise ValueError("no integer 'epoch'")
            except ValueError as err:
                (warn or logger.warning)(f"{self.path}: dropping damaged line {number} ({err}).")
                continue
            records.append(record)
        return records

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        return self._records() if self.path.is_file() else []


def image_grid(images: list[Image.Image], columns: int, labels: list[str] | None = None,
               scale: int = 1) -> Image.Image:
    """Tile images into a grid (optionally upscaled with nearest-neighbour for tiny models)."""
    width, height = images[0].size
    width, height = width * scale, height * scale
    rows = math.ceil(len(images) / columns)
    label_h = 12 if labels else 0
    grid = Image.new("RGB", (columns * width, rows * (height + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % columns) * width, (i // columns) * (height + label_h)
        grid.paste(image.convert("RGB").resize((width, height), Image.NEAREST), (x, y + label_h))
        if labels:
            draw.text((x + 2, y), short_label(labels[i], max(4, width // 6)), fill="black")
    return grid


def short_label(text: str, max_chars: int) -> str:
    """The end of a prompt (where prompts differ: "…digit seven"), at most `max_chars`, cut between words when the
    last word fits (so not "…itten digit zero")."""
    if len(text) <= max_chars:
        return text
    tail = text[-(max_chars - 1):]
    if not text[-max_chars].isspace() and " " in tail:  # the tail starts inside a word: drop that part word
        tail = tail.split(" ", 1)[1]
    return "…" + tail.lstrip()


def plot_curves(series: dict[str, list[tuple[float, float]]], path: Path, *, title: str, x_label: str,
                y_label: str, size: tuple[int, int] = (640, 400)) -> Path:
    """A line chart of one or more (x, y) series, PNG."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    width, height = size
    left, right, top, bottom = 60, 20, 30, 45
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    if not points:
        image.save(path)
        return Path(path)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(5):
        y = y0 + k * (y1 - y0) / 4
        _, py = to_px(x0, y)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((4, py - 6), f"{y:.3g}", fill="black")
    integer_x = all(float(x).is_integer() for x in xs)  # epochs: ticks on whole numbers, not 24.8
    ticks = sorted({round(x0 + k * (x1 - x0) / 4) for k in range(5)}) if integer_x else \
        [x0 + k * (x1 - x0) / 4 for k in range(5)]
    for x in ticks:
        px, _ = to_px(x, y0)
        draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
        draw.text((px - 10, height - bottom + 6), f"{x:.3g}", fill="black")
    draw.text((width // 2 - 60, height - 16), x_label, fill="black")
    draw.text((4, 4), f"{title}   ({y_label})", fill="black")
    for i, (name, values) in enumerate(series.items()):
        color = colors[i % len(colors)]
        pixels = [to_px(x, y) for x, y in values if math.isfinite(y)]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        for px, py in pixels:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        draw.text((width - right - 150, top + 6 + 14 * i), name, fill=color)
    image.save(path)
    return Path(path)
