"""Run outputs besides checkpoints: metrics.jsonl, sample grids and the reward curve PNG.

Curves are drawn with matplotlib (Agg, no display needed): its tick placement, legends and bands are what users
read elsewhere, and a hand-drawn chart got them wrong (ticks at 0.459 / 0.742, epochs 0 … 99 for a 100-epoch run, a
legend over the line). Grid labels use matplotlib's DejaVu Sans: PIL's built-in font drops the width of spaces.
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


def _label_font(size: int):
    from matplotlib import font_manager
    from PIL import ImageFont

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def image_grid(images: list[Image.Image], columns: int, labels: list[str] | None = None,
               scale: int = 1) -> Image.Image:
    """Tile images into a grid (optionally upscaled with nearest-neighbour for tiny models), each under its label
    (the end of its prompt, cut to the cell's width)."""
    width, height = images[0].size
    width, height = width * scale, height * scale
    rows = math.ceil(len(images) / columns)
    font = _label_font(10) if labels else None
    label_h = 14 if labels else 0
    grid = Image.new("RGB", (columns * width, rows * (height + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % columns) * width, (i // columns) * (height + label_h)
        grid.paste(image.convert("RGB").resize((width, height), Image.NEAREST), (x, y + label_h))
        if labels:
            draw.text((x + 2, y + 1), fitted_label(labels[i], font, width - 4), fill="black", font=font)
    return grid


def fitted_label(text: str, font, max_width: float) -> str:
    """The longest `short_label` of `text` that `font` draws within `max_width` pixels."""
    for chars in range(len(text), 3, -1):
        label = short_label(text, chars)
        if font.getlength(label) <= max_width:
            return label
    return short_label(text, 4)


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
                y_label: str, spread: dict[str, list[float]] | None = None,
                secondary: dict[str, list[tuple[float, float]]] | None = None, secondary_label: str = "",
                size: tuple[float, float] = (7.0, 4.2)) -> Path:
    """A PNG line chart of (x, y) series. `spread[name]` (one value per point of `series[name]`) draws a ±band
    around that series; `secondary` series go on a right-hand axis labelled `secondary_label` (e.g. an accuracy
    beside a reward). Whole-number x values (epochs) get whole-number ticks. The legend sits below the axes, where
    it cannot cover a line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=size, dpi=110, layout="constrained")
    handles = []
    for name, values in series.items():
        points = [(x, y) for x, y in values if math.isfinite(y)]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        (line,) = axes.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.6, label=name)
        handles.append(line)
        if spread and name in spread:
            band = [(x, y, d) for (x, y), d in zip(values, spread[name], strict=True)
                    if math.isfinite(y) and math.isfinite(d)]
            bx, by, bd = zip(*band, strict=True)
            fill = axes.fill_between(bx, [y - d for y, d in zip(by, bd, strict=True)],
                                     [y + d for y, d in zip(by, bd, strict=True)], color=line.get_color(), alpha=0.18,
                                     linewidth=0, label=f"{name} ± std")
            handles.append(fill)
    all_x = [x for values in series.values() for x, _ in values]
    if all_x and all(float(x).is_integer() for x in all_x):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if secondary:
        right = axes.twinx()
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (name, values) in enumerate(secondary.items()):
            points = [(x, y) for x, y in values if math.isfinite(y)]
            if points:
                xs, ys = zip(*points, strict=True)
                (line,) = right.plot(xs, ys, linestyle="--", linewidth=1.4, label=name,
                                     color=colors[(len(series) + i) % len(colors)])
                handles.append(line)
        right.set_ylabel(secondary_label)
    if handles:
        figure.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), frameon=False)
    figure.savefig(path)
    plt.close(figure)
    return Path(path)


def reward_by_window_start(history: list[dict], since_epoch: int = 0) -> dict[int, tuple[float, int]]:
    """window start → (mean `reward/mean`, epochs) over the epochs from `since_epoch` on. The rollout reward of an
    epoch depends on where its window started (on digits late in training: 0.97 at s = 0, 0.87 at s = 1 with the
    3-step tail), so a curve that jumps between epochs may be the window, not the policy."""
    groups: dict[int, list[float]] = {}
    for row in history:
        if row.get("epoch", -1) >= since_epoch and "tree/window_start" in row and "reward/mean" in row:
            groups.setdefault(int(row["tree/window_start"]), []).append(float(row["reward/mean"]))
    return {start: (sum(values) / len(values), len(values)) for start, values in sorted(groups.items())}


def reward_curve(history: list[dict], path: Path, evaluations: list[dict] = ()) -> Path:
    """A run's `reward_curve.png`: the mean reward per epoch with its ± std band over the epoch's leaves, each
    evaluation reward's mean (`eval.jsonl`: ODE samples, after 0 … N epochs) beside it, and any accuracy a reward
    reports (`reward/<name>/accuracy`, `eval/<name>/accuracy`, e.g. the digits classifiers') on a right-hand axis."""
    epochs = [m["epoch"] + 1 for m in history]  # completed epochs, as the console counts them (1 … N)
    mean = {"reward/mean": list(zip(epochs, [m["reward/mean"] for m in history], strict=True))}
    spread = {"reward/mean": [m.get("reward/std", float("nan")) for m in history]}
    for key in sorted({k for row in evaluations for k in row if k.startswith("eval/") and k.endswith("/mean")}):
        mean[key] = [(row["epoch"], row.get(key, float("nan"))) for row in evaluations]
    accuracy_keys = sorted({k for m in history for k in m if k.startswith("reward/") and k.endswith("/accuracy")})
    secondary = {k: [(e, m.get(k, float("nan"))) for e, m in zip(epochs, history, strict=True)]
                 for k in accuracy_keys}
    for key in sorted({k for row in evaluations for k in row if k.startswith("eval/") and k.endswith("/accuracy")}):
        secondary[key] = [(row["epoch"], row.get(key, float("nan"))) for row in evaluations]
    title = "reward per epoch (rollout leaves" + ("; eval: ODE samples)" if evaluations else ")")
    return plot_curves(mean, path, title=title, x_label="epoch", y_label="mean reward", spread=spread,
                       secondary=secondary or None, secondary_label="accuracy" if secondary else "")
