"""The dtype names recipes, commands and rewards take, in one place. No torch import here: `check` and the CLI's
argument checks judge a name before torch loads."""

from __future__ import annotations

DTYPE_NAMES = ("fp32", "bf16", "fp16")  # what `model.dtype` and `--dtype` take
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # the attribute of `torch` each names
LONG_NAMES = tuple(TORCH_NAMES.values())  # rewards also take torch's own spelling ("bfloat16")


def torch_dtype(name: str):
    """`torch.bfloat16` for "bf16" or "bfloat16" (KeyError for any other name)."""
    import torch

    return getattr(torch, name if name in LONG_NAMES else TORCH_NAMES[name])
