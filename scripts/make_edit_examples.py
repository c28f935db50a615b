"""Write the example editing prompts of `recipes/flux_kontext_edit.toml`: shapes scenes rendered at 512 px (the
`builtin:shapes` world, scaled up) as source images, and a `.jsonl` whose lines ask to recolour one object, with
GenEval metadata for the result (`include`: the recoloured object) and the object's box as `edit_region`.

    python scripts/make_edit_examples.py   # recipes/prompts/edit_example.jsonl and recipes/prompts/edit_sources/
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

from treegrpo.builtin.shapes_world import COLORS, IMAGE_SIZE, SHAPES, Thing, render

SIZE = 512
SCALE = SIZE / IMAGE_SIZE
MARGIN = 0.03  # of the side: the region also covers the object's anti-aliased edge


def scene(rng: random.Random) -> list[Thing]:
    """Two objects of different shapes and colours, side by side."""
    first, second = rng.sample(SHAPES, 2)
    colour_a, colour_b = rng.sample(list(COLORS), 2)
    size_a, size_b = rng.uniform(9, 12), rng.uniform(9, 12)
    return [Thing(first, colour_a, rng.uniform(7, 11), rng.uniform(9, 23), size_a),
            Thing(second, colour_b, rng.uniform(21, 25), rng.uniform(9, 23), size_b)]


def edit_line(things: list[Thing], index: int, rng: random.Random, image: str) -> dict:
    """Recolour thing `index` to a colour no object has."""
    target = things[index]
    colour = rng.choice([c for c in COLORS if c not in {t.color for t in things}])
    half = target.size / 2 / IMAGE_SIZE + MARGIN
    cx, cy = target.x / IMAGE_SIZE, target.y / IMAGE_SIZE
    region = [round(max(0.0, cx - half), 3), round(max(0.0, cy - half), 3), round(min(1.0, cx + half), 3),
              round(min(1.0, cy + half), 3)]
    return {"prompt": f"make the {target.color} {target.shape} {colour}", "image": image, "edit_region": region,
            "tag": "colors", "include": [{"class": target.shape, "count": 1, "color": colour}]}


def main(folder: Path = Path(__file__).resolve().parent.parent / "recipes" / "prompts", count: int = 8) -> None:
    rng = random.Random(0)
    (folder / "edit_sources").mkdir(parents=True, exist_ok=True)
    lines = []
    for number in range(count):
        things = scene(rng)
        name = f"edit_sources/scene_{number:02d}.png"
        big = [replace(t, x=t.x * SCALE, y=t.y * SCALE, size=t.size * SCALE) for t in things]
        render(big, SIZE).save(folder / name, optimize=True)
        lines.append(edit_line(things, number % 2, rng, name))
    (folder / "edit_example.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


if __name__ == "__main__":
    main()
