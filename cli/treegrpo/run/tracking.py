"""Experiment trackers through accelerate (`output.log_with`: any tracker accelerate supports, or "none"), beside
`metrics.jsonl`, which stays the record a resume truncates and rewrites. The recipe goes to the tracker as its
config (hyperparameters); sample grids go to trackers that take images (TensorBoard, W&B)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from treegrpo.recipe.schema import Recipe


def tracker_config(recipe: Recipe) -> dict:
    """The recipe flattened to `table.key` scalars, as trackers' hyperparameter tables take (lists as JSON text)."""
    from treegrpo.run.folder import flatten  # the same flattening as the resume fingerprint

    flat = flatten(json.loads(recipe.model_dump_json()))
    return {key: value if isinstance(value, int | float | str | bool) else json.dumps(value)
            for key, value in flat.items()}


def start_trackers(accelerator, recipe: Recipe, warn) -> bool:
    """`init_trackers` with the user's project and run names; False (and one warning) when the tracker asked for
    is not installed."""
    kind = recipe.output.log_with
    if kind == "none":
        return False
    from accelerate.tracking import get_available_trackers

    if kind not in {str(t) for t in get_available_trackers()}:
        warn(f"output.log_with = {kind!r}, but {kind} is not installed; metrics go to metrics.jsonl only "
             f"(pip install {kind}, or set output.log_with = \"none\").")
        return False
    run_name = recipe.output.run_name or Path(recipe.output.dir).name
    init_kwargs = {"wandb": {"name": run_name}, "tensorboard": {}}
    project = recipe.output.tracker_project
    accelerator.init_trackers(project if kind != "tensorboard" else f"{project}/{run_name}",
                              config=tracker_config(recipe), init_kwargs=init_kwargs)
    return True


def log_metrics(accelerator, metrics: dict, step: int) -> None:
    accelerator.log({k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}, step=step)


def log_grid(accelerator, path: Path | None, step: int) -> None:
    """A sample grid to the trackers that take images."""
    if path is None or not accelerator.is_main_process:
        return
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": image[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"samples": [image]}, step=step)
