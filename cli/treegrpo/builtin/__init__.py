"""Models shipped inside the package, named in recipes as `builtin:<name>`.

Importing this module imports no torch (recipes naming `builtin:` are judged before the heavy imports).

`builtin:digits` is a tiny real `StableDiffusion3Pipeline` (16x16 handwritten digits, prompts like
"a handwritten digit seven") plus the digit classifier its reward uses, both trained by
`scripts/train_digits.py`. `digits/digits.json` holds how to call it; always pass its `pipeline_kwargs`
(notably `max_sequence_length`: the SD3 default of 256 T5 tokens wrecks a model trained with 8).

Example:

```py
>>> from treegrpo.builtin import load_digits_pipeline
>>> pipe, meta = load_digits_pipeline()
>>> images = pipe(["a handwritten digit seven"] * 4, **meta["pipeline_kwargs"]).images
>>> images[0].size
(16, 16)
```
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["BUILTIN_DIGITS_DIR", "BUILTIN_SHAPES_DIR", "BUILTIN_SHAPES_EDIT_DIR", "BUILTIN_PREFIX", "BUILTIN_MODELS",
           "builtin_metadata", "load_digits_pipeline", "load_shapes_pipeline", "load_shapes_edit_pipeline",
           "resolve_pretrained"]

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIGITS_DIR = Path(__file__).resolve().parent / "digits"
BUILTIN_SHAPES_DIR = Path(__file__).resolve().parent / "shapes"
BUILTIN_SHAPES_EDIT_DIR = Path(__file__).resolve().parent / "shapes_edit"
BUILTIN_MODELS = {"digits": BUILTIN_DIGITS_DIR / "pipeline", "shapes": BUILTIN_SHAPES_DIR / "pipeline",
                  "shapes_edit": BUILTIN_SHAPES_EDIT_DIR / "pipeline"}
BUILD_SCRIPTS = {"digits": "scripts/train_digits.py", "shapes": "scripts/train_shapes.py",
                 "shapes_edit": "scripts/train_shapes_edit.py"}


def resolve_pretrained(pretrained: str) -> str:
    """Map `builtin:<name>` to the shipped diffusers folder; any other string (hub id, path) is returned as is."""
    if not pretrained.startswith(BUILTIN_PREFIX):
        return pretrained
    name = pretrained[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_MODELS:
        known = ", ".join(f"{BUILTIN_PREFIX}{n}" for n in sorted(BUILTIN_MODELS))
        raise ValueError(f"unknown built-in model {pretrained!r}; known: {known}")
    folder = BUILTIN_MODELS[name]
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{pretrained} is missing from this install ({folder} has no model_index.json); "
            f"reinstall the package or rebuild it with `python {BUILD_SCRIPTS[name]}`."
        )
    return str(folder)


def builtin_metadata(pretrained: str) -> dict[str, Any]:
    """The metadata of a shipped model (`builtin:<name>`: `<name>/<name>.json`): how to call it
    (`pipeline_kwargs`), how it was trained, what was measured; `{}` for any other model string."""
    name = pretrained.removeprefix(BUILTIN_PREFIX)
    if not pretrained.startswith(BUILTIN_PREFIX) or name not in BUILTIN_MODELS:
        return {}
    path = BUILTIN_MODELS[name].parent / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}  # a missing model is reported by its loader


def digits_metadata() -> dict[str, Any]:
    """The shipped `digits.json`: call kwargs (`pipeline_kwargs`), prompt template, measured accuracies."""
    return builtin_metadata("builtin:digits")


def load_shapes_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load `builtin:shapes` as a `FluxPipeline` on `device`/`dtype` (default float32; eval mode, progress bar
    off). Returns `(pipe, metadata)`; call it with `pipe(prompts, **metadata["pipeline_kwargs"])`. Its prompts, in
    GenEval's `.jsonl` schema: `treegrpo.builtin.shapes_world.split_prompts()` (in a checkout also
    `recipes/prompts/shapes_train.jsonl` and `shapes_test.jsonl`)."""
    return _load_builtin("shapes", "FluxPipeline", device, dtype)


def load_shapes_edit_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load `builtin:shapes_edit` as a `FluxKontextPipeline` (recolours one object of a 32x32 shapes scene) on
    `device`/`dtype` (default float32). Returns `(pipe, metadata)`; call it with `pipe(image=source, prompt="make
    the red circle blue", **metadata["pipeline_kwargs"])`. Its prompts with their sources: in a checkout
    `recipes/prompts/shapes_edit_train.jsonl` and `shapes_edit_test.jsonl`."""
    return _load_builtin("shapes_edit", "FluxKontextPipeline", device, dtype)


def load_digits_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load `builtin:digits` as a `StableDiffusion3Pipeline` on `device`/`dtype` (default float32; eval mode,
    progress bar off).

    Returns `(pipe, metadata)`; call the pipeline with `pipe(prompts, **metadata["pipeline_kwargs"])`.
    """
    return _load_builtin("digits", "StableDiffusion3Pipeline", device, dtype)


def _load_builtin(name: str, pipeline_class: str, device, dtype):
    """`builtin:<name>` as its diffusers `pipeline_class` on `device`/`dtype` (fp32 on disk and by default), progress
    bar off, with its metadata."""
    import diffusers
    import torch

    pipe = getattr(diffusers, pipeline_class).from_pretrained(resolve_pretrained(f"{BUILTIN_PREFIX}{name}"))
    pipe.to(device, torch.float32 if dtype is None else dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, builtin_metadata(f"{BUILTIN_PREFIX}{name}")
