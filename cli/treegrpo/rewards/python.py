"""Your own reward: any Python function ``f(images: list[PIL.Image.Image], prompts: list[str])`` returning one
number per image (a list, a NumPy array or a tensor), named as ``"package.module:function"`` or
``"path/to/file.py:function"``. A function that also takes a ``metadata`` parameter receives each image's prompt
metadata (a list of dicts; the fields of a ``.jsonl`` prompt file's lines); one that takes ``source_images``
receives each image's source image (editing prompts: the ``image`` of its prompt line, an RGB PIL image).

The function is imported when the reward is built, so a typo fails before any model loads or any image is sampled.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from treegrpo.rewards.base import RewardBase, check_batch, check_batch_size, chunks


def import_function(spec: str) -> Callable:
    """The callable named by ``"module:attribute"`` (dotted module) or ``"file.py:attribute"``.

    Raises:
        ValueError: if the spec is malformed, the module does not import, or the attribute is missing or not
            callable; the message says which.
    """
    module_name, sep, attribute = str(spec).rpartition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"python reward function must look like 'package.module:function' or "
            f"'path/to/file.py:function'; got {spec!r}."
        )
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise FileNotFoundError(f"no such file: {module_name!r}")
            name = f"treegrpo_user_reward_{abs(hash(os.path.abspath(module_name)))}"
            file_spec = importlib.util.spec_from_file_location(name, module_name)
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[name] = module
            file_spec.loader.exec_module(module)
        else:
            # a module in the working directory is importable, as with `python -m` (console scripts drop '')
            cwd = os.getcwd()
            if cwd not in sys.path:
                sys.path.append(cwd)
            module = importlib.import_module(module_name)
    except Exception as error:
        raise ValueError(
            f"cannot import {module_name!r} for the python reward {spec!r}: {type(error).__name__}: {error}"
        ) from error
    function = module
    for part in attribute.split("."):
        if not hasattr(function, part):
            raise ValueError(f"{module_name!r} has no attribute {attribute!r} (python reward {spec!r}).")
        function = getattr(function, part)
    if not callable(function):
        raise ValueError(f"{spec!r} is a {type(function).__name__}, not a function.")
    return function


def as_scores(result, n: int, spec: str) -> torch.Tensor:
    """A user function's result as float32 ``[n]`` on the CPU; ValueError on a wrong length or non-finite value."""
    try:
        scores = torch.as_tensor(result.detach() if isinstance(result, torch.Tensor) else result)
        scores = scores.to(device="cpu", dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"the python reward {spec!r} returned a {type(result).__name__} that is not a sequence of numbers: {error}"
        ) from error
    if scores.ndim == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if scores.shape != (n,):
        raise ValueError(
            f"the python reward {spec!r} must return one score per image ({n}); got shape {tuple(scores.shape)}."
        )
    if not bool(torch.isfinite(scores).all()):
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        raise ValueError(f"the python reward {spec!r} returned non-finite scores at positions {bad[:8]}.")
    return scores


class PythonReward(RewardBase):
    """A reward defined by a Python function.

    Args:
        function (`str`): ``"package.module:function"`` (importable from the current environment) or
            ``"path/to/file.py:function"``; called as ``function(images, prompts)``.
        batch_size (`int`, *optional*): call the function on chunks of at most this many images; all at once if
            not set.
        device, dtype: unused; your function decides where it runs.

    Example:
        ```py
        >>> from PIL import Image
        >>> from treegrpo.rewards import build_reward
        >>> reward = build_reward("python", function="treegrpo.rewards.python:mean_brightness")
        >>> reward([Image.new("RGB", (8, 8), (255, 255, 255))], ["a white square"])
        tensor([1.])
        ```
    """

    def __init__(
        self,
        *,
        function: str,
        batch_size: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
    ):
        self.function = str(function)
        self._function = import_function(self.function)
        try:  # a function with a `metadata` parameter gets each image's prompt metadata (.jsonl prompt files),
            # one with `source_images` each image's source image (editing prompts)
            parameters = inspect.signature(self._function).parameters
        except (TypeError, ValueError):  # builtins and some C callables have no signature
            parameters = {}
        self.takes_metadata = "metadata" in parameters
        self.takes_source_images = "source_images" in parameters
        self.name = self.function.rpartition(":")[2]
        self.batch_size = None if batch_size is None else check_batch_size(batch_size)

    def load(self) -> PythonReward:
        """Nothing to load; the function was imported when the reward was built."""
        return self

    def __call__(self, images: list[Image.Image], prompts: list[str], metadata: list[dict] | None = None,
                 source_images: list[Image.Image] | None = None) -> torch.Tensor:
        n = check_batch(images, prompts, self.name)
        size = n if self.batch_size is None else self.batch_size
        parts = []
        for part in chunks(n, max(size, 1)):
            extra = {"metadata": list(metadata[part]) if metadata is not None else [{}] * (part.stop - part.start)} \
                if self.takes_metadata else {}
            if self.takes_source_images:
                extra["source_images"] = list(source_images[part]) if source_images is not None else None
            parts.append(as_scores(self._function(list(images[part]), list(prompts[part]), **extra),
                                   part.stop - part.start, self.function))
        return torch.cat(parts) if parts else torch.empty(0)


def mean_brightness(images: list[Image.Image], prompts: list[str]) -> list[float]:
    """A toy reward for examples and smoke tests: the mean pixel value in [0, 1] of each image's grayscale."""
    del prompts
    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255) for image in images]
