"""Object detectors for the `geneval` reward: each maps one image and the class names a prompt asks about to a list
of `Detection`s (class, colour name, centre, size, score).

- `ShapesDetector` ("shapes"): the deterministic detector of `builtin:shapes`: no learned weights. Every pixel is
  explained as paper blended with one palette colour (the renderer's anti-aliasing is exactly such a blend), the
  inked pixels of each colour are split into connected components, and each component is named by the ideal shape
  (circle, square, triangle, drawn by the world's own renderer at the component's box) it overlaps best. A component
  that no ideal shape overlaps by `min_iou` (a blob, a smear, two touching objects) is not an object: a reward built
  on it cannot be won by blobs.
- `Owlv2Detector` ("owlv2"): transformers' open-vocabulary OWLv2 for real models, queried with "a photo of a
  <class>"; the colour of a detection is the palette colour nearest to the median of its box's central pixels.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from treegrpo.builtin.shapes_world import COLORS, PAPER, SHAPES, Thing, as_array, render

# GenEval's colour names with typical sRGB values, for detectors that see real photos (OWLv2).
NAMED_COLORS = {"red": (200, 30, 30), "orange": (240, 140, 20), "yellow": (240, 210, 40), "green": (40, 150, 60),
                "blue": (40, 80, 210), "purple": (120, 50, 160), "pink": (240, 150, 190), "brown": (120, 75, 40),
                "black": (20, 20, 20), "white": (245, 245, 245)}


OWLV2_BATCH = 16  # images per OWLv2 forward


@dataclass(frozen=True)
class Detection:
    """One detected object: class name, colour name, centre (x, y) and box side in pixels, confidence in [0, 1]."""

    cls: str
    color: str
    x: float
    y: float
    size: float
    score: float


@dataclass(frozen=True)
class RememberedBatch:
    """A detector's last batch (`Detector.detect_batch_once`): weak references to its images, the classes asked of
    each, and what was found in each."""

    images: tuple[weakref.ref, ...]
    classes: tuple[tuple[str, ...], ...]
    found: list[list[Detection]]


class Detector:
    """Base of the `geneval` detectors: `detect(image, classes)` returns the objects of those classes it finds."""

    name = "detector"
    # every class it looks for besides a prompt's own, so the objects nobody asked for are counted (`geneval`'s extras)
    vocabulary: tuple[str, ...] = ()
    _last_batch: RememberedBatch | None = None

    def detect(self, image: Image.Image, classes: list[str]) -> list[Detection]:
        raise NotImplementedError

    def detect_batch(self, images: list[Image.Image], classes: list[list[str]]) -> list[list[Detection]]:
        """`detect` on each image with its own classes (a detector with a batched model overrides this)."""
        return [self.detect(image, names) for image, names in zip(images, classes, strict=True)]

    def detect_batch_once(self, images: list[Image.Image], classes: list[list[str]]) -> list[list[Detection]]:
        """`detect_batch`, remembered for the last batch: rewards that share this detector (`geneval`'s `share_from`)
        and score the same images in a row (the dense credit, then the verdict) run it once. A repeat must hold the
        very same image objects, checked through weak references (an id alone can be reused once an image is
        freed), and ask the same classes."""
        asked = tuple(tuple(names) for names in classes)
        last = self._last_batch
        if last is not None and last.classes == asked and len(last.images) == len(images) \
                and all(ref() is image for ref, image in zip(last.images, images, strict=True)):
            return [list(found) for found in last.found]
        found = self.detect_batch(images, classes)
        self._last_batch = RememberedBatch(tuple(weakref.ref(image) for image in images), asked, found)
        return [list(detections) for detections in found]

    def load(self) -> Detector:
        return self

    def modules(self) -> list[torch.nn.Module]:
        return []


class ShapesDetector(Detector):
    """The deterministic detector of `builtin:shapes` (see the module docstring).

    Args:
        min_ink (`float`, defaults to 0.5): blend weight of a palette colour above which a pixel is ink.
        sides (`tuple`, defaults to (6, 16)): the box sides, in pixels, of an object (the world draws 9-12);
            smaller components are specks or smears, larger ones merged objects.
        min_iou (`float`, defaults to 0.6): the overlap with an ideal shape a component needs to count as one.
    """

    name = "shapes"
    vocabulary = tuple(SHAPES)

    def __init__(self, min_ink: float = 0.5, sides: tuple[int, int] = (6, 16), min_iou: float = 0.6):
        self.min_ink, self.sides, self.min_iou = min_ink, sides, min_iou
        self._color_names = list(COLORS)

    def detect(self, image: Image.Image, classes: list[str] | None = None) -> list[Detection]:
        pixels = as_array(image)
        ink, color_index = self.explain_pixels(pixels)
        size = pixels.shape[0]
        found = []
        labels = connected_components(ink, groups=color_index)  # each colour's inked pixels, split into components
        for label in range(1, labels.max() + 1):
            mask = labels == label
            name = self._color_names[int(color_index[mask][0])]
            detection = self.name_component(mask, name, size)
            if detection is not None and (classes is None or detection.cls in classes):
                found.append(detection)
        return found

    def explain_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ink mask [H, W], palette index [H, W]): each pixel as `paper + a * (colour - paper)`, the colour whose
        least-squares fit leaves the smallest residual; ink where that blend weight `a` is at least `min_ink`."""
        weight = blend_weights(pixels)
        residual = ((pixels - _PAPER)[:, :, None, :] - weight[..., None] * _DIRECTIONS) ** 2  # [H, W, C, 3]
        best = residual.sum(-1).argmin(-1)
        blend = np.take_along_axis(weight, best[..., None], -1)[..., 0]
        return blend >= self.min_ink, best

    def name_component(self, mask: np.ndarray, color: str, size: int) -> Detection | None:
        """The ideal shape that best overlaps the component, drawn at the component's box; None below `min_iou`."""
        ys, xs = np.nonzero(mask)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        side = float(max(x1 - x0, y1 - y0))
        if not self.sides[0] <= side <= self.sides[1]:
            return None
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        best, best_iou = None, 0.0
        # The thresholded box is up to a pixel smaller than the drawn object (its anti-aliased rim is under half
        # ink): try both sides, or a large circle's box would fit a square better.
        for shape, drawn in itertools.product(SHAPES, (side, side + 1)):
            ideal = ideal_mask(shape, drawn, cx, cy, size, self.min_ink)
            iou = (mask & ideal).sum() / max((mask | ideal).sum(), 1)
            if iou > best_iou:
                best, best_iou = shape, float(iou)
        if best is None or best_iou < self.min_iou:
            return None
        return Detection(best, color, float(cx), float(cy), side, best_iou)


_PAPER = np.array(PAPER, dtype=np.float32) / 255
_DIRECTIONS = np.stack([np.array(c, dtype=np.float32) / 255 - _PAPER for c in COLORS.values()])  # [C, 3]


def blend_weights(pixels: np.ndarray) -> np.ndarray:
    """[H, W, C]: for each pixel (RGB in [0, 1]) and palette colour, the least-squares weight `a` of
    `pixel = paper + a * (colour - paper)`."""
    return np.einsum("hwk,ck->hwc", pixels - _PAPER, _DIRECTIONS) / (_DIRECTIONS * _DIRECTIONS).sum(-1)


def ideal_mask(shape: str, side: float, cx: float, cy: float, size: int, min_ink: float) -> np.ndarray:
    """The ink mask [size, size] of the ideal `shape` of box `side` centred at (cx, cy): rendered once per shape,
    side and sub-pixel phase on a double-size canvas and shifted by whole pixels (the speed of the reward on a
    training epoch's hundreds of leaves). A pure palette colour's blend weight is its coverage, whatever the colour,
    so the mask is the coverage at least `min_ink`."""
    fx, fy = int(np.floor(cx)), int(np.floor(cy))
    canvas = _ideal_canvas(shape, float(side), cx - fx, cy - fy, size, min_ink)
    return canvas[size - fy: 2 * size - fy, size - fx: 2 * size - fx]


@functools.lru_cache(maxsize=4096)
def _ideal_canvas(shape: str, side: float, phase_x: float, phase_y: float, size: int, min_ink: float) -> np.ndarray:
    image = render([Thing(shape, "red", size + phase_x, size + phase_y, side)], 2 * size)
    mask = blend_weights(as_array(image))[..., list(COLORS).index("red")] >= min_ink
    mask.setflags(write=False)
    return mask


def connected_components(mask: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """4-connected component labels of a boolean [H, W] mask: 0 off the mask, 1..n on it, numbered in row-major
    order of their first pixel. With `groups` ([H, W] ints), neighbours join only within the same group (one pass
    for all colours). A flood fill over plain lists: the masks here hold a few hundred pixels."""
    h, w = mask.shape
    on = mask.tolist()
    group = groups.tolist() if groups is not None else None
    labels = [[0] * w for _ in range(h)]
    count = 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        y0, x0 = int(y0), int(x0)
        if labels[y0][x0]:
            continue
        count += 1
        labels[y0][x0] = count
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and on[ny][nx] and not labels[ny][nx] and (
                        group is None or group[ny][nx] == group[y][x]):
                    labels[ny][nx] = count
                    stack.append((ny, nx))
    return np.array(labels, dtype=np.int64)


def nearest_color(rgb: np.ndarray) -> str:
    """GenEval colour name nearest to an sRGB triple in [0, 255]."""
    names = list(NAMED_COLORS)
    table = np.array([NAMED_COLORS[n] for n in names], dtype=np.float32)
    return names[int(((table - rgb[None].astype(np.float32)) ** 2).sum(-1).argmin())]


class Owlv2Detector(Detector):
    """transformers' OWLv2 (`Owlv2ForObjectDetection`), loaded from the Hub or a local folder at the first call.

    Args:
        pretrained (`str`, defaults to "google/owlv2-base-patch16-ensemble"): hub id or folder.
        threshold (`float`, defaults to 0.3): box confidence to count a detection (GenEval uses 0.3).
        device (`str`, defaults to "cpu") / dtype (`torch.dtype`, defaults to float32).
    """

    name = "owlv2"

    def __init__(self, pretrained: str = "google/owlv2-base-patch16-ensemble", threshold: float = 0.3,
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.pretrained, self.threshold, self.device, self.dtype = pretrained, threshold, device, dtype
        self._model = self._processor = None

    def load(self) -> Owlv2Detector:
        if self._model is None:
            import importlib.util

            if importlib.util.find_spec("scipy") is None and importlib.util.find_spec("torchvision") is None:
                raise ImportError("the geneval reward's owlv2 detector needs scipy (or torchvision) for OWLv2's image "
                                  "processor: pip install scipy, or install this package with its [owlv2] extra.")
            from transformers import Owlv2ForObjectDetection, Owlv2Processor

            self._processor = Owlv2Processor.from_pretrained(self.pretrained)
            model = Owlv2ForObjectDetection.from_pretrained(self.pretrained)
            self._model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        return self

    def modules(self) -> list[torch.nn.Module]:
        return [] if self._model is None else [self._model]

    def detect(self, image: Image.Image, classes: list[str]) -> list[Detection]:
        return self.detect_batch([image], [classes])[0]

    @torch.no_grad()
    def detect_batch(self, images: list[Image.Image], classes: list[list[str]]) -> list[list[Detection]]:
        """One forward per chunk of images that ask for the same classes (a prompt's leaves do): OWLv2 pads a
        shorter query list with a blank query that is not masked, so mixing query lists would change the result."""
        self.load()
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, names in enumerate(classes):
            groups.setdefault(tuple(names), []).append(i)
        found: list[list[Detection]] = [[] for _ in images]
        for names, index in groups.items():
            for start in range(0, len(index), OWLV2_BATCH):
                chunk = index[start:start + OWLV2_BATCH]
                for i, detections in zip(chunk, self._detect_same([images[i] for i in chunk], list(names)),
                                         strict=True):
                    found[i] = detections
        return found

    def _detect_same(self, images: list[Image.Image], classes: list[str]) -> list[list[Detection]]:
        images = [image.convert("RGB") for image in images]
        queries = [f"a photo of a {c}" for c in classes]
        inputs = self._processor(text=[queries] * len(images), images=images, return_tensors="pt")
        inputs = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                  for k, v in inputs.items()}
        outputs = self._model(**inputs)
        sides = [[max(image.size)] * 2 for image in images]  # OWLv2 pads to a square: boxes are relative to it
        results = self._processor.image_processor.post_process_object_detection(
            outputs=outputs, threshold=self.threshold, target_sizes=torch.tensor(sides))
        found = []
        for image, result in zip(images, results, strict=True):
            array = np.asarray(image)
            found.append([
                Detection(classes[label], box_color(array, box), (box[0] + box[2]) / 2, (box[1] + box[3]) / 2,
                          max(box[2] - box[0], box[3] - box[1]), score)
                for box, score, label in zip(result["boxes"].float().tolist(), result["scores"].float().tolist(),
                                             result["labels"].tolist(), strict=True)])
        return found


def box_color(array: np.ndarray, box: list[float]) -> str:
    """The named colour of a box's central half (the object, mostly, not its background)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    crop = array[max(int(y0 + h / 4), 0): max(int(y1 - h / 4), int(y0 + h / 4) + 1),
                 max(int(x0 + w / 4), 0): max(int(x1 - w / 4), int(x0 + w / 4) + 1)]
    if crop.size == 0:
        return "unknown"
    return nearest_color(np.median(crop.reshape(-1, 3), axis=0))
