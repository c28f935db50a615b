"""Train the independent judge of `builtin:shapes` (`treegrpo.rewards.shapes_judge`): a small grid CNN detector,
a different method than the reward's segmentation detector, trained on freshly rendered scenes (no download).

Each training image is a scene of the world (a random prompt's objects, or 1-4 random objects) under random blur
(rendered once), pixel noise and brightness jitter (drawn per step); half of them also carry 1-2 negatives the judge
must not count: an irregular polygon, a stroke, or a heavily blurred smear of a shape. Targets per 4x4-pixel cell:
does an object's centre lie here, its shape, colour, offset and size. Reported: exact detection rate and GenEval
accuracy on held-out clean scenes, and how often it agrees with the reward's detector on them.

    python scripts/train_shapes_judge.py          # writes cli/treegrpo/builtin/shapes/judge (about 5 minutes)
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

from treegrpo.builtin import BUILTIN_SHAPES_DIR
from treegrpo.builtin.shapes_world import COLORS, IMAGE_SIZE, SHAPES, Thing, all_prompts, render, scene_for
from treegrpo.rewards.detectors import ShapesDetector
from treegrpo.rewards.geneval import judge
from treegrpo.rewards.shapes_judge import CELL, JudgeConfig, ShapesJudge, decode, images_to_pixels, save_judge

logger = logging.getLogger("train_shapes_judge")
GRID = IMAGE_SIZE // CELL


def random_scene(rng: random.Random) -> list[Thing]:
    records = all_prompts()
    if rng.random() < 0.6:
        return scene_for(records[rng.randrange(len(records))], rng)
    count = rng.randint(1, 4)
    record = {"include": [{"class": rng.choice(SHAPES), "count": 1} for _ in range(count)]}
    return scene_for(record, rng)


def add_negatives(image: Image.Image, scene: list[Thing], rng: random.Random) -> Image.Image:
    """1-2 things that are no object of the world, drawn where no object is."""
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(rng.randint(1, 2)):
        x, y = rng.uniform(4, IMAGE_SIZE - 4), rng.uniform(4, IMAGE_SIZE - 4)
        if any(abs(x - t.x) < t.size / 2 + 5 and abs(y - t.y) < t.size / 2 + 5 for t in scene):
            continue
        color = (*COLORS[rng.choice(list(COLORS))], 255)
        kind = rng.choice(("polygon", "stroke", "smear"))
        if kind == "polygon":  # an irregular blob
            points = [(x + rng.uniform(3, 7) * math.cos(a), y + rng.uniform(1, 7) * math.sin(a))
                      for a in sorted(rng.uniform(0, 2 * math.pi) for _ in range(rng.randint(4, 6)))]
            draw.polygon(points, fill=color)
        elif kind == "stroke":
            angle = rng.uniform(0, math.pi)
            length = rng.uniform(6, 14)
            draw.line((x - length * math.cos(angle) / 2, y - length * math.sin(angle) / 2,
                       x + length * math.cos(angle) / 2, y + length * math.sin(angle) / 2), fill=color,
                      width=rng.randint(1, 3))
        else:
            smear = render([Thing(rng.choice(SHAPES), rng.choice(list(COLORS)), x, y, 10)]).filter(
                ImageFilter.GaussianBlur(rng.uniform(2.5, 4)))
            mask = Image.fromarray((255 - np.asarray(smear.convert("L"))).clip(0, 255).astype(np.uint8) * 3)
            layer.paste(smear.convert("RGBA"), (0, 0), mask)
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def degrade(image: Image.Image, rng: random.Random) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.9)))


def jitter(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Brightness jitter and pixel noise, per image (on the fly: the dataset is rendered once)."""
    n = pixels.shape[0]
    gain = 0.9 + 0.15 * torch.rand(n, 1, 1, 1, generator=gen)
    noise = torch.randn(pixels.shape, generator=gen) * 0.05 * torch.rand(n, 1, 1, 1, generator=gen)
    return (pixels * gain + noise).clamp(0, 1)


def targets(scene: list[Thing]) -> torch.Tensor:
    """[6, G, G]: objectness, shape, colour, dx, dy, log size (shape/colour -1 where no object)."""
    t = torch.zeros(6, GRID, GRID)
    t[1:3] = -1
    for thing in scene:
        gx, gy = min(int(thing.x // CELL), GRID - 1), min(int(thing.y // CELL), GRID - 1)
        t[:, gy, gx] = torch.tensor([1.0, SHAPES.index(thing.shape), list(COLORS).index(thing.color),
                                     thing.x / CELL - gx, thing.y / CELL - gy, math.log(thing.size / CELL)])
    return t


def make_dataset(rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for _ in range(n):
        scene = random_scene(rng)
        image = render(scene)
        if rng.random() < 0.5:
            image = add_negatives(image, scene, rng)
        images.append(degrade(image, rng))
        labels.append(targets(scene))
    return images_to_pixels(images), torch.stack(labels)


def loss_of(head: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    obj = target[:, 0]
    loss = F.binary_cross_entropy_with_logits(head[:, 0], obj, pos_weight=torch.tensor(4.0))
    pos = obj > 0
    if pos.any():
        n_shape = len(SHAPES)
        shape_logits = head[:, 1:1 + n_shape].permute(0, 2, 3, 1)[pos]
        color_logits = head[:, 1 + n_shape:1 + n_shape + len(COLORS)].permute(0, 2, 3, 1)[pos]
        loss = loss + F.cross_entropy(shape_logits, target[:, 1][pos].long())
        loss = loss + F.cross_entropy(color_logits, target[:, 2][pos].long())
        offsets = head[:, -3:-1].sigmoid().permute(0, 2, 3, 1)[pos]
        loss = loss + F.l1_loss(offsets, target[:, 3:5].permute(0, 2, 3, 1)[pos])
        loss = loss + F.l1_loss(head[:, -1][pos], target[:, 5][pos])
    return loss


@torch.no_grad()
def held_out_report(model: ShapesJudge, seed: int, count: int = 500) -> dict:
    rng, records = random.Random(seed), all_prompts()
    chosen = [records[rng.randrange(len(records))] for _ in range(count)]
    scenes = [scene_for(r, rng) for r in chosen]
    images = [render(s) for s in scenes]
    found = decode(model(images_to_pixels(images)), model.config.threshold)
    reference = ShapesDetector()
    exact = agree = correct = 0
    for record, scene, image, detections in zip(chosen, scenes, images, found, strict=True):
        truth = sorted((t.shape, t.color) for t in scene)
        exact += sorted((d.cls, d.color) for d in detections) == truth
        agree += sorted((d.cls, d.color) for d in reference.detect(image)) == sorted((d.cls, d.color)
                                                                                     for d in detections)
        correct += judge(detections, {k: v for k, v in record.items() if k != "prompt"}).correct
    return {"exact_detections": exact / count, "geneval_accuracy_on_rendered": correct / count,
            "agrees_with_reward_detector": agree / count, "scenes": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BUILTIN_SHAPES_DIR / "judge")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--images", type=int, default=20000, help="rendered training images")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    rng = random.Random(args.seed)
    model = ShapesJudge(JudgeConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.steps, pct_start=0.05)
    pixels, target = make_dataset(rng, args.images)
    logger.info("rendered %d images (%.0f s)", args.images, time.perf_counter() - start)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(1, args.steps + 1):
        index = torch.randint(len(pixels), (64,), generator=gen)
        loss = loss_of(model(jitter(pixels[index], gen)), target[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0:
            logger.info("step %d  loss %.4f", step, loss.item())
    model.eval()
    report = held_out_report(model, args.seed + 1000)
    report.update(steps=args.steps, seed=args.seed, threads=args.threads, seconds=round(time.perf_counter() - start))
    logger.info("judge: %s", report)
    save_judge(model, args.out, extra={"training": report})


if __name__ == "__main__":
    main()
