"""The reward kinds by name: `build_reward(kind, **options)` and the options each kind takes."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from treegrpo.rewards.aesthetic import AestheticReward
from treegrpo.rewards.base import RewardBase, resolve_dtype
from treegrpo.rewards.clipscore import CLIPScoreReward
from treegrpo.rewards.digits import DigitsReward
from treegrpo.rewards.diversity import DiversityReward
from treegrpo.rewards.geneval import GenEvalReward
from treegrpo.rewards.hpsv2 import HPSv2Reward
from treegrpo.rewards.http import HttpReward
from treegrpo.rewards.imagereward import ImageRewardReward
from treegrpo.rewards.jpeg import JpegCompressibilityReward
from treegrpo.rewards.ocr import OcrReward
from treegrpo.rewards.pickscore import PickScoreReward
from treegrpo.rewards.preservation import PreservationReward
from treegrpo.rewards.python import PythonReward
from treegrpo.rewards.vlm import VlmReward

# kind → factory; every factory takes keyword-only options plus `device` and `dtype`.
REWARD_KINDS: dict[str, Callable[..., RewardBase]] = {
    "pickscore": PickScoreReward,
    "hpsv2": HPSv2Reward,
    "imagereward": ImageRewardReward,
    "aesthetic": AestheticReward,
    "clipscore": CLIPScoreReward,
    "jpeg": JpegCompressibilityReward,
    "digits": DigitsReward,
    "diversity": DiversityReward,
    "preservation": PreservationReward,
    "geneval": GenEvalReward,
    "ocr": OcrReward,
    "python": PythonReward,
    "http": HttpReward,
    "vlm": VlmReward,
}
_RUN_ARGUMENTS = ("device", "dtype")


def _check_kind(kind: str) -> Callable[..., RewardBase]:
    if kind not in REWARD_KINDS:
        raise ValueError(f"Unknown reward kind {kind!r}; known kinds: {', '.join(sorted(REWARD_KINDS))}.")
    return REWARD_KINDS[kind]


def reward_options(kind: str) -> dict[str, object]:
    """The options a reward kind accepts, each with its default (`inspect.Parameter.empty` when required)."""
    parameters = inspect.signature(_check_kind(kind)).parameters.values()
    return {
        p.name: p.default
        for p in parameters
        if p.name not in _RUN_ARGUMENTS and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def build_reward(
    kind: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32, **options
) -> RewardBase:
    """Build the reward ``kind`` with ``options``; nothing heavy loads until its first call (or ``.load()``).

    Kinds and options (defaults in parentheses; every model reward also takes ``batch_size`` (32)):

    - ``pickscore``: ``pretrained`` ("yuvalkirstain/PickScore_v1"), ``processor``
      ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K"), ``scale`` ("raw" | "flow_grpo" | "mixgrpo").
    - ``hpsv2``: ``version`` ("v2.1" | "v2.0"), ``pretrained`` ("xswu/HPSv2"), ``processor``
      ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K"), ``clip_config`` (open_clip ViT-H-14).
    - ``imagereward``: ``pretrained`` ("THUDM/ImageReward"), ``processor`` ("google-bert/bert-base-uncased"),
      ``vision_config`` (BLIP ViT-L/16).
    - ``aesthetic``: ``pretrained`` ("trl-lib/ddpo-aesthetic-predictor"), ``clip_pretrained``
      ("openai/clip-vit-large-patch14"), ``processor`` (= ``clip_pretrained``).
    - ``clipscore``: ``pretrained`` ("openai/clip-vit-large-patch14"), ``processor`` (= ``pretrained``),
      ``scale`` (1.0), ``clamp`` (False).
    - ``jpeg``: ``quality`` (95). ``digits``: the toy digit classifier of ``builtin:digits``.
    - ``diversity``: mean pixel distance to the prompt's other images in the batch (anti-collapse): ``size`` (64).
    - ``preservation``: editing: 1 - mean pixel difference to the source outside the prompt's ``edit_region``.
    - ``geneval``: GenEval's rules on the prompt's metadata: ``detector`` ("shapes" | "shapes_judge" | "owlv2"),
      ``score`` ("dense"|"binary"), ``pretrained``, ``threshold`` (0.3), ``extras`` ("allow"|"forbid"), ``vocabulary``.
    - ``ocr``: 1 - normalised edit distance to the prompt's quoted text, read by Tesseract: ``psm`` (6), ``lang``
      ("eng"), ``tesseract_cmd`` ("tesseract"), ``parallel`` (4), ``timeout`` (60).
    - ``python``: ``function`` (required, "module:function" or "file.py:function"), ``batch_size`` (all at once).
    - ``http``: ``url`` (required), ``body`` ("json" | "multipart"), ``timeout`` (120), ``retries`` (2),
      ``backoff`` (1.0), ``batch_size`` (32), ``parallel`` (1), ``headers``, ``api_key_env`` (see
      `treegrpo.rewards.remote` for the protocol).
    - ``vlm``: ``base_url`` and ``model`` (required), ``template`` ("yes_no" | "quality" | your text),
      ``score`` ("logprobs" | "parse"), ``answer_tokens``, ``scale_max`` (10), ``max_tokens``, ``timeout``,
      ``retries``, ``backoff``, ``parallel`` (8), ``api_key_env``.

    Raises:
        ValueError: an unknown kind or option, a missing required option or a bad value; it says what is allowed.

    Example:
        ```py
        >>> from treegrpo.rewards import build_reward
        >>> build_reward("jpeg", quality=90).name
        'jpeg'
        >>> build_reward("jpg")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Unknown reward kind 'jpg'; known kinds: aesthetic, clipscore, digits, diversity, geneval, ...
        ```
    """
    factory = _check_kind(kind)
    allowed = reward_options(kind)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"Unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for "
            f"reward kind {kind!r}; allowed options: {', '.join(allowed) or 'none'}."
        )
    missing = [name for name, default in allowed.items() if default is inspect.Parameter.empty and name not in options]
    if missing:
        raise ValueError(
            f"reward kind {kind!r} needs the option{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}."
        )
    return factory(device=torch.device(device), dtype=resolve_dtype(dtype), **options)


def share_models(rewards: list[RewardBase]) -> list[RewardBase]:
    """Let each reward adopt the models of those before it (`RewardBase.share_from`), so a run that judges with the
    same detector twice (GenEval's dense credit and its verdict, in training and in evaluation) holds it once and,
    for a batch both score, runs it once. Returns `rewards`."""
    for i, reward in enumerate(rewards):
        reward.share_from(rewards[:i])
    return rewards
