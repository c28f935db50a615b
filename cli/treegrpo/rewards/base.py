"""The reward interface and the helpers the reward adapters share.

A reward maps a batch of images and their prompts to one float32 score per image:
``reward(images: list[PIL.Image.Image], prompts: list[str]) -> torch.Tensor  # [N], float32, on CPU``.
Images go in as 8-bit PIL images (use `to_pil` for float tensors in [0, 1]): every processor here rescales uint8
to [0, 1] itself, so float input would be rescaled twice.

The model rewards load lazily (at the first call or at an explicit ``.load()``), run in eval mode under
``torch.no_grad()`` in the device and dtype they were built with, and score in chunks of ``batch_size`` images.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator, Mapping
from types import MappingProxyType

import torch
from PIL import Image

from treegrpo.dtypes import DTYPE_NAMES, LONG_NAMES, torch_dtype

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = {name: torch_dtype(name) for name in (*LONG_NAMES, *DTYPE_NAMES)}


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float images in [0, 1], ``[N, 3, H, W]`` (any device), to N 8-bit RGB PIL images (rounded, clamped)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"to_pil expects images of shape [N, 3, H, W]; got {tuple(images.shape)}.")
    if images.dtype != torch.uint8:
        images = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = images.permute(0, 2, 3, 1).cpu().numpy()  # [N, H, W, 3]
    return [Image.fromarray(image, mode="RGB") for image in array]


class RewardBase:
    """Base of every reward adapter: the hooks the trainer, `treegrpo eval` and the reward server read, each with
    its default, so nothing asks a reward whether it has one.

    - `name` labels the metrics (`reward/<name>/mean`); the trainer sets the recipe's name.
    - `frame_reduction` says how video leaves are scored ("mean" | "min" | "max" | "whole"); set from the recipe.
    - `takes_metadata`: `__call__` accepts `metadata=` (a `.jsonl` prompt file's fields per image).
    - `takes_source_images`: `__call__` accepts `source_images=` (editing: each image's source as an RGB PIL image,
      read from its prompt line's `image`).
    - `last_subscores`: `{name: float32 [N]}` of the last call (remote rewards' sub-scores); empty by default.
    - `subscore_names`: the sub-scores every call returns (geneval's extras), which evaluation reports as
      `eval/<name>/<sub-score>`; a sub-score a call may or may not send (a remote reward's) is logged in training only.
    - `score_and_accuracy`: the scores and, for rewards that judge right/wrong (digits), the accuracy.
    - `load()` loads what loads lazily and returns the reward; `modules()` lists the torch models it holds once
      loaded (what `model.offload_rewards` moves), none by default.
    - `share_from(earlier)`: adopt a model that a reward built before this one already holds, where both would load
      the same one (two `geneval` rewards on one detector); nothing by default (`registry.share_models`).

    `__call__(images, prompts)` takes N 8-bit RGB PIL images and N prompts (image i was generated for prompt i) and
    returns float32 scores of shape `[N]` on the CPU; higher is better."""

    name: str = "reward"
    frame_reduction: str = "mean"
    takes_metadata: bool = False
    takes_source_images: bool = False
    last_subscores: Mapping[str, torch.Tensor] = MappingProxyType({})
    subscore_names: tuple[str, ...] = ()

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def load(self) -> RewardBase:
        return self

    def modules(self) -> list[torch.nn.Module]:
        return []

    def share_from(self, earlier: list[RewardBase]) -> None:
        """Adopt a model of a reward in `earlier` where this one would load the same; nothing by default."""

    def score(self, images: list[Image.Image], prompts: list[str], metadata: list[dict] | None = None,
              source_images: list[Image.Image] | None = None) -> torch.Tensor:
        """`self(images, prompts)`, with each image's metadata and source image for rewards that take them. The
        sources are `source_images` when given (a reward server's request), else read from the metadata's `image`
        paths (training), else None (text-to-image prompts)."""
        extra = {}
        if metadata is not None and self.takes_metadata:
            extra["metadata"] = metadata
        if self.takes_source_images:
            extra["source_images"] = source_images if source_images is not None else source_images_of(metadata)
        return self(images, prompts, **extra)

    def score_and_accuracy(self, images: list[Image.Image], prompts: list[str],
                           metadata: list[dict] | None = None) -> tuple[torch.Tensor, float | None]:
        """Scores `[N]` and the accuracy when the reward can judge right/wrong (`None` here)."""
        return self.score(images, prompts, metadata), None


def source_images_of(metadata: list[dict] | None) -> list[Image.Image] | None:
    """Each image's source (its prompt line's `image`, a path; its first for a line naming several: the image edited)
    as an RGB PIL image; None for text-to-image prompts (a reward that needs sources says so itself)."""
    from treegrpo.sources import first_sources, load_source_images, source_paths

    paths = source_paths(metadata)
    return None if paths is None else load_source_images(first_sources(paths))


def score_with_accuracy(reward: RewardBase, images, prompts, metadata: list[dict] | None = None
                        ) -> tuple[torch.Tensor, float | None]:
    """Scores `[N]` float32 on the CPU, and the accuracy for rewards that can also judge right/wrong (e.g. digits:
    one model pass for both); `None` for the others."""
    scores, accuracy = reward.score_and_accuracy(images, prompts, metadata)
    return torch.as_tensor(scores, dtype=torch.float32).flatten().cpu(), accuracy


def check_batch(images: list[Image.Image], prompts: list[str], name: str) -> int:
    """Validate one scoring call and return N."""
    if isinstance(images, torch.Tensor):
        raise TypeError(f"reward {name!r} takes a list of PIL images; convert tensors with `to_pil` first.")
    if len(images) != len(prompts):
        raise ValueError(
            f"reward {name!r} got {len(images)} images but {len(prompts)} prompts; pass one prompt per image."
        )
    return len(images)


def chunks(n: int, batch_size: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in order, ``batch_size`` items at most each."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def check_batch_size(batch_size: int) -> int:
    """``batch_size`` if it is a positive integer; ValueError otherwise."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    return batch_size


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype, or one of the names in `DTYPES` ("bfloat16", "bf16", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"Unknown dtype {dtype!r}; use a torch.dtype or one of {sorted(DTYPES)}.")


def resolve_file(pretrained: str | os.PathLike, filename: str) -> str:
    """Path of ``filename`` from a hub repo id, a local folder holding it, or a direct path to the file.

    Hub ids go through `huggingface_hub.hf_hub_download`, so the hub cache and ``HF_HUB_OFFLINE=1`` work.
    """
    pretrained = os.fspath(pretrained)
    if os.path.isfile(pretrained):
        return pretrained
    if os.path.isdir(pretrained):
        path = os.path.join(pretrained, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{filename!r} not found in the folder {pretrained!r}.")
        return path
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=pretrained, filename=filename)


def load_checkpoint(path: str) -> dict:
    """``torch.load`` a checkpoint on the CPU without executing pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path!r} holds more than tensors and plain containers; refusing to unpickle it "
            f"(torch.load with weights_only=True failed: {error})."
        ) from error


def features(output) -> torch.Tensor:
    """The embedding from `get_image_features`/`get_text_features`: a tensor in transformers 4, an output object
    whose ``pooler_output`` is the projected embedding in transformers 5."""
    if isinstance(output, torch.Tensor):
        return output
    for field in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, field, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find an embedding in a {type(output).__name__}.")


def unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalize the last dimension in float32."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True)


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict`` that names every missing, unexpected or misshapen key in one ValueError."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshapen = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", misshapen),
        )
        if keys
    ]
    if problems:
        raise ValueError(f"cannot load {source}: " + "; ".join(problems))
    module.load_state_dict(dict(state_dict), strict=True)


@contextlib.contextmanager
def empty_init() -> Iterator[None]:
    """Skip random initialization while building a model whose weights are loaded right after (speed only)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext
    with no_init_weights():
        yield


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report while loading a sub-model from a full checkpoint on purpose."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


class ScoreMLP(torch.nn.Module):
    """The 768→1024→128→64→16→1 head of the LAION aesthetic predictor and of ImageReward: linear layers with
    dropout between them and no activations. Parameter names (``layers.0``, ``.2``, ``.4``, ``.6``, ``.7``) match
    both original checkpoints."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_score_mlp(state_dict: Mapping[str, torch.Tensor], source: str) -> ScoreMLP:
    """A `ScoreMLP` sized from ``layers.0.weight`` and loaded strictly from ``state_dict``."""
    if "layers.0.weight" not in state_dict:
        raise ValueError(f"cannot load {source}: missing key layers.0.weight (found {sorted(state_dict)[:8]}).")
    mlp = ScoreMLP(int(state_dict["layers.0.weight"].shape[1]))
    load_strict(mlp, state_dict, source)
    return mlp.eval().requires_grad_(False)


# ---- CLIP-family helpers (PickScore, CLIPScore, HPS, aesthetic) -----------------------------------------------------
def load_image_processor(source: str):
    """An image processor on the PIL backend (transformers 5's default backend needs torchvision)."""
    import transformers
    from transformers import AutoImageProcessor

    if int(transformers.__version__.split(".")[0]) >= 5:
        return AutoImageProcessor.from_pretrained(source, backend="pil")
    return AutoImageProcessor.from_pretrained(source, use_fast=False)


def load_clip_parts(pretrained: str, processor: str):
    """(tokenizer, image processor, CLIPModel) of a CLIP-style reward; the model on CPU in fp32 (cast by the caller,
    after reading anything that loses precision in low-precision dtypes)."""
    from transformers import AutoTokenizer, CLIPModel

    return AutoTokenizer.from_pretrained(processor), load_image_processor(processor), CLIPModel.from_pretrained(
        pretrained)


def pixel_values(image_processor, images: list[Image.Image], device, dtype) -> torch.Tensor:
    """``[B, 3, S, S]`` model input from 8-bit PIL images."""
    pixels = image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
    return pixels.to(device=device, dtype=dtype)


def text_features_by_prompt(model, tokenizer, prompts: list[str], *, batch_size: int, device) -> torch.Tensor:
    """Unit CLIP text embeddings, float32 ``[N, D]`` on ``device``; each distinct prompt is encoded once (a tree
    scores many images of the same prompt)."""
    unique = list(dict.fromkeys(prompts))
    max_length = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))
    embeds = []
    for part in chunks(len(unique), batch_size):
        tokens = tokenizer(unique[part], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        input_ids, attention_mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        embeds.append(unit(features(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))))
    index = {prompt: i for i, prompt in enumerate(unique)}
    return torch.cat(embeds)[torch.tensor([index[p] for p in prompts], device=device)]


def clip_cosine(
    model, tokenizer, images: list[Image.Image], prompts: list[str], *, to_pixels, batch_size: int, device
) -> torch.Tensor:
    """cos(text_i, image_i) of a transformers `CLIPModel`, float32 ``[N]`` on ``device``.

    ``to_pixels`` maps a list of PIL images to the model's ``pixel_values`` (on ``device``, in the model's dtype).
    """
    if not images:
        return torch.empty(0, device=device)
    text = text_features_by_prompt(model, tokenizer, prompts, batch_size=batch_size, device=device)  # [N, D]
    cos = torch.empty(len(images), device=device)
    for part in chunks(len(images), batch_size):
        image = unit(features(model.get_image_features(pixel_values=to_pixels(images[part]))))  # [B, D]
        cos[part] = (image * text[part]).sum(-1)
    return cos
