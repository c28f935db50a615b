"""The independent judge of `builtin:shapes` (`geneval` with `detector = "shapes_judge"`): a small learned detector
that no run trains on, built by a different method than the reward's detector, so a policy that games one is caught
by the other.

Where `ShapesDetector` segments colours and matches ideal shapes, the judge is a CNN trained (by
`scripts/train_shapes_judge.py`) on rendered scenes under blur, noise and colour jitter, with blobs, strokes and
smears drawn as negatives: it looks at the image once and predicts, for each cell of a 8x8 grid (4x4 pixels), whether
an object's centre lies there, its shape, its colour, its offset in the cell and its size (a YOLO-style head). Cells
above `threshold` objectness are detections; two in neighbouring cells are one object (the more confident kept).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from treegrpo.builtin.shapes_world import COLORS, IMAGE_SIZE, SHAPES
from treegrpo.rewards.detectors import Detection, Detector

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
CELL = 4  # pixels per grid cell
# per cell: objectness, shape logits, colour logits, (dx, dy) in cells, log(size / CELL)
OUTPUTS = 1 + len(SHAPES) + len(COLORS) + 2 + 1


@dataclass
class JudgeConfig:
    channels: tuple[int, ...] = (16, 48, 64)
    threshold: float = 0.5


class ShapesJudge(nn.Module):
    """[N, 3, 32, 32] in [0, 1] -> [N, OUTPUTS, 8, 8] raw head outputs."""

    def __init__(self, config: JudgeConfig | None = None):
        super().__init__()
        self.config = config or JudgeConfig()
        a, b, c = self.config.channels
        self.body = nn.Sequential(
            nn.Conv2d(3, a, 3, padding=1), nn.ReLU(), nn.Conv2d(a, a, 3, padding=1), nn.ReLU(),
            nn.Conv2d(a, b, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(b, b, 3, padding=1), nn.ReLU(),
            nn.Conv2d(b, c, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(c, OUTPUTS, 1),
        )  # fmt: skip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.body(pixels * 2 - 1)


def decode(head: torch.Tensor, threshold: float) -> list[list[Detection]]:
    """Head outputs [N, OUTPUTS, G, G] -> detections per image (pixels), neighbouring duplicates suppressed."""
    found = []
    objectness = head[:, 0].sigmoid()
    shapes = head[:, 1:1 + len(SHAPES)].softmax(1)
    colors = head[:, 1 + len(SHAPES):1 + len(SHAPES) + len(COLORS)].argmax(1)
    offsets, log_size = head[:, -3:-1].sigmoid(), head[:, -1]
    for n in range(head.shape[0]):
        ys, xs = torch.nonzero(objectness[n] > threshold, as_tuple=True)
        cells = [(objectness[n, gy, gx].item(), gy, gx) for gy, gx in zip(ys, xs, strict=True)]
        kept: list[tuple[int, int]] = []
        detections = []
        for score, gy, gx in sorted(((s, int(y), int(x)) for s, y, x in cells), reverse=True):
            if any(abs(gy - y) <= 1 and abs(gx - x) <= 1 for y, x in kept):
                continue
            kept.append((gy, gx))
            shape = int(shapes[n, :, gy, gx].argmax())
            detections.append(Detection(
                SHAPES[shape], list(COLORS)[int(colors[n, gy, gx])], (gx + offsets[n, 0, gy, gx].item()) * CELL,
                (gy + offsets[n, 1, gy, gx].item()) * CELL, float(log_size[n, gy, gx].exp() * CELL),
                score * shapes[n, shape, gy, gx].item()))
        found.append(detections)
    return found


def save_judge(model: ShapesJudge, path: str | Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, path / WEIGHTS_NAME)
    (path / CONFIG_NAME).write_text(json.dumps({**asdict(model.config), **(extra or {})}, indent=2) + "\n")


def load_judge(path: str | Path | None = None) -> ShapesJudge:
    """The judge saved as `config.json` + `model.safetensors` (default: the one shipped with `builtin:shapes`)."""
    from safetensors.torch import load_file

    if path is None:
        from treegrpo.builtin import BUILTIN_SHAPES_DIR

        path = BUILTIN_SHAPES_DIR / "judge"
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"no shapes judge at {path}: expected {CONFIG_NAME} and {WEIGHTS_NAME} there (run "
                                "`python scripts/train_shapes_judge.py` to rebuild the shipped one).")
    raw = json.loads((path / CONFIG_NAME).read_text())
    config = JudgeConfig(channels=tuple(raw["channels"]), threshold=raw["threshold"])
    model = ShapesJudge(config)
    model.load_state_dict(load_file(path / WEIGHTS_NAME))
    return model.eval().requires_grad_(False)


def images_to_pixels(images: list[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(i.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32) / 255
                      for i in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2)


class ShapesJudgeDetector(Detector):
    """`ShapesJudge` as a `geneval` detector (see the module docstring); `path` overrides the shipped weights."""

    name = "shapes_judge"
    vocabulary = tuple(SHAPES)

    def __init__(self, path: str | Path | None = None):
        self.path, self._model = path, None

    def load(self) -> ShapesJudgeDetector:
        if self._model is None:
            self._model = load_judge(self.path)
        return self

    def modules(self) -> list[torch.nn.Module]:
        return [] if self._model is None else [self._model]

    @torch.no_grad()
    def detect(self, image: Image.Image, classes: list[str] | None = None) -> list[Detection]:
        return self.detect_batch([image], None if classes is None else [classes])[0]

    @torch.no_grad()
    def detect_batch(self, images: list[Image.Image], classes: list[list[str]] | None = None
                     ) -> list[list[Detection]]:
        self.load()
        found = decode(self._model(images_to_pixels(images)), self._model.config.threshold)
        classes = classes if classes is not None else [None] * len(images)
        return [[d for d in image if names is None or d.cls in names] for image, names in zip(found, classes,
                                                                                             strict=True)]
