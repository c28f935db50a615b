"""The world of `builtin:shapes`: scenes of 1-4 coloured shapes on white paper, their prompts in GenEval's own
`.jsonl` schema, and the renderer. Numpy and Pillow only (no torch): the training script, the `geneval` reward's
deterministic detector and the tests all read the same world from here.

GenEval's six categories, with its metadata (`tag`, `include: [{class, count, color, position}]`, `exclude`):

| tag | prompt | include / exclude |
|---|---|---|
| single_object | a photo of a circle | [{class: circle, count: 1}] |
| two_object | a photo of a circle and a square | [{circle, 1}, {square, 1}] |
| counting | a photo of three triangles | [{triangle, 3}], exclude [{triangle, 4}] |
| colors | a photo of a blue square | [{square, 1, color: blue}] |
| position | a photo of a circle left of a square | [{square, 1}, {circle, 1, position: ["left of", 0]}] |
| color_attr | a photo of a red circle and a blue square | [{circle, 1, red}, {square, 1, blue}] |

`position: ["left of", 0]` says that object lies left of `include[0]` (GenEval's convention).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLORS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 225), "yellow": (240, 200, 20)}
PAPER = (255, 255, 255)
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# Every word a prompt can hold (the shipped tokenizer's vocabulary).
VOCAB = ["a", "photo", "of", "and", "left", "right", "above", "below", *NUMBERS.values(), *SHAPES,
         *PLURALS.values(), *COLORS]
OBJECT_SIZE = (9, 12)  # bounding-box side in pixels at 32x32, inclusive range
_SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges like a real image


@dataclass(frozen=True)
class Thing:
    """One object of a scene: its shape, colour name, centre (x, y) in pixels and bounding-box side."""

    shape: str
    color: str
    x: float
    y: float
    size: float


def render(scene: list[Thing], size: int = IMAGE_SIZE) -> Image.Image:
    """An RGB image of the scene on white paper, anti-aliased."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), PAPER)
    draw = ImageDraw.Draw(image)
    for thing in scene:
        x, y, r = (v * _SUPERSAMPLE for v in (thing.x, thing.y, thing.size / 2))
        fill = COLORS[thing.color]
        if thing.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif thing.shape == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        else:  # upright triangle
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    return image.resize((size, size), Image.BOX)


# ---------------------------------------------------------------- prompts in GenEval's schema


def _obj(shape: str, count: int = 1, color: str | None = None, position: list | None = None) -> dict:
    item: dict = {"class": shape, "count": count}
    if color is not None:
        item["color"] = color
    if position is not None:
        item["position"] = position
    return item


def all_prompts() -> list[dict]:
    """Every prompt of the world with its GenEval metadata, in a fixed order (126 prompts)."""
    records = [{"tag": "single_object", "include": [_obj(s)], "prompt": f"a photo of a {s}"} for s in SHAPES]
    for a, b in itertools.permutations(SHAPES, 2):
        records.append({"tag": "two_object", "include": [_obj(a), _obj(b)], "prompt": f"a photo of a {a} and a {b}"})
    for shape, n in itertools.product(SHAPES, (2, 3, 4)):
        records.append({"tag": "counting", "include": [_obj(shape, n)], "exclude": [_obj(shape, n + 1)],
                        "prompt": f"a photo of {NUMBERS[n]} {PLURALS[shape]}"})
    for color, shape in itertools.product(COLORS, SHAPES):
        records.append({"tag": "colors", "include": [_obj(shape, color=color)],
                        "prompt": f"a photo of a {color} {shape}"})
    for (a, b), rel in itertools.product(itertools.permutations(SHAPES, 2), RELATIONS):
        records.append({"tag": "position", "include": [_obj(b), _obj(a, position=[rel, 0])],
                        "prompt": f"a photo of a {a} {rel} a {b}"})
    for (a, b), (ca, cb) in itertools.product(itertools.permutations(SHAPES, 2), itertools.permutations(COLORS, 2)):
        records.append({"tag": "color_attr", "include": [_obj(a, color=ca), _obj(b, color=cb)],
                        "prompt": f"a photo of a {ca} {a} and a {cb} {b}"})
    return [{"prompt": r["prompt"], "tag": r["tag"], "include": r["include"], **({"exclude": r["exclude"]}
                                                                                   if "exclude" in r else {})}
            for r in records]


def _prompt_hash(prompt: str) -> int:
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16)


def split_prompts() -> dict[str, list[dict]]:
    """{"train": [...], "test": [...]}: disjoint, each with every category. The test split holds a third of every
    category's prompts (rounded up), chosen by a hash of the prompt text: stable across versions and orderings."""
    records = all_prompts()
    test: set[str] = set()
    for tag in CATEGORIES:
        prompts = sorted((r["prompt"] for r in records if r["tag"] == tag), key=_prompt_hash)
        test.update(prompts[: -(-len(prompts) // 3)])
    return {"train": [r for r in records if r["prompt"] not in test],
            "test": [r for r in records if r["prompt"] in test]}


def write_jsonl(records: list[dict], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))


# ---------------------------------------------------------------- scenes that satisfy a prompt


def _place(rng: random.Random, placed: list[Thing], shape: str, color: str, relation: tuple[str, Thing] | None,
           size: int = IMAGE_SIZE) -> Thing | None:
    """A thing of random side at a random spot not touching any placed thing and, if `relation` = (relation,
    anchor) is given, lying that way of the anchor; None after 200 tries."""
    for _ in range(200):
        side = rng.uniform(*OBJECT_SIZE)
        lo, hi = side / 2 + 0.5, size - side / 2 - 0.5
        thing = Thing(shape, color, rng.uniform(lo, hi), rng.uniform(lo, hi), side)
        if all(max(abs(thing.x - t.x), abs(thing.y - t.y)) > (side + t.size) / 2 + 1.5 for t in placed) and (
            relation is None or lies(relation[0], thing, relation[1])
        ):
            return thing
    return None


def lies(relation: str, thing: Thing, anchor: Thing) -> bool:
    """Whether `thing` lies `relation` ("left of", ...) the anchor with the offset along that axis at least twice
    the offset across it. Stricter than GenEval's rule for touching-free objects of these sizes (its offset, shrunk
    by a tenth of both sizes, must point within 60 degrees of the axis), so every training scene passes the judge."""
    dx, dy = thing.x - anchor.x, thing.y - anchor.y
    along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return along > 0 and along >= 2 * abs(across)


def scene_for(record: dict, rng: random.Random) -> list[Thing]:
    """A scene that satisfies the prompt's metadata exactly (the objects it names, nothing else); colours the
    prompt leaves open are drawn at random. Retries until every object fits."""
    while True:
        scene = _try_scene(record, rng)
        if scene is not None:
            return scene


def _try_scene(record: dict, rng: random.Random) -> list[Thing] | None:
    placed: list[Thing] = []
    for item in record["include"]:  # position items name count-1 objects only, so include j is placed[j]
        relation = (item["position"][0], placed[item["position"][1]]) if "position" in item else None
        for _ in range(item["count"]):
            color = item.get("color") or rng.choice(list(COLORS))
            thing = _place(rng, placed, item["class"], color, relation)
            if thing is None:
                return None
            placed.append(thing)
    return placed


def training_pairs(records: list[dict], count: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    """`count` (image, prompt index) pairs: prompts drawn uniformly from `records`, one fresh scene each."""
    rng = random.Random(seed)
    images, indices = [], []
    for _ in range(count):
        index = rng.randrange(len(records))
        images.append(render(scene_for(records[index], rng)))
        indices.append(index)
    return images, indices


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
