"""The reward kinds and the options each accepts, without importing any reward code (torch, transformers): the
recipe validator reads this, so a typo in a `[[reward]]` table is reported in well under a second.

The factories in `treegrpo.rewards` are the source of truth; a test checks this table against their signatures.
"""

from __future__ import annotations

REWARD_OPTION_NAMES: dict[str, frozenset[str]] = {
    "pickscore": frozenset({"pretrained", "processor", "scale", "batch_size"}),
    "hpsv2": frozenset({"version", "pretrained", "processor", "clip_config", "batch_size"}),
    "imagereward": frozenset({"pretrained", "processor", "vision_config", "batch_size"}),
    "aesthetic": frozenset({"pretrained", "clip_pretrained", "processor", "batch_size"}),
    "clipscore": frozenset({"pretrained", "processor", "scale", "clamp", "batch_size"}),
    "jpeg": frozenset({"quality"}),
    "digits": frozenset({"name", "classifier", "strict"}),
    "diversity": frozenset({"size"}),
    "preservation": frozenset(),
    "geneval": frozenset({"detector", "score", "pretrained", "threshold", "extras", "vocabulary"}),
    "ocr": frozenset({"psm", "lang", "tesseract_cmd", "parallel", "timeout"}),
    "python": frozenset({"function", "batch_size"}),
    "http": frozenset({"url", "body", "timeout", "retries", "backoff", "batch_size", "parallel", "headers",
                       "api_key_env"}),
    "vlm": frozenset({"base_url", "model", "template", "score", "answer_tokens", "scale_max", "max_tokens",
                      "timeout", "retries", "backoff", "parallel", "api_key_env", "max_unreadable"}),
}


# options a kind cannot do without (the factories' keyword-only arguments without a default)
REQUIRED_OPTIONS: dict[str, tuple[str, ...]] = {"python": ("function",), "http": ("url",),
                                                "vlm": ("base_url", "model")}


def reward_option_names(kind: str) -> frozenset[str]:
    """The options `kind` takes; ValueError naming the known kinds for an unknown one."""
    if kind not in REWARD_OPTION_NAMES:
        raise ValueError(f"Unknown reward kind {kind!r}; known kinds: {', '.join(sorted(REWARD_OPTION_NAMES))}.")
    return REWARD_OPTION_NAMES[kind]
