"""Prompt embeddings encoded once per unique prompt per run.

Every epoch draws prompts again; encoding them again (CLIP + CLIP + T5-XXL for SD3) is work whose result never
changes, since the text encoders are frozen. The cache keeps each prompt's conditioning rows, on the CPU by default
so that the accelerator holds only the epoch's rows. It lives in memory: after a resume each prompt is encoded once
more. diffusers has no such cache (its pipelines encode per call), so this small class is ours.

Editing prompts are keyed by prompt AND source image (`sources`: the paths of a `.jsonl` file's `image` fields):
one instruction over two sources is two entries, and a source is VAE-encoded once per run with its prompt.

What is the same for every prompt is stored once: the negative prompt's rows (one row per prompt otherwise: 3.7 MB
each for Qwen-Image, ~15 GB over a 4,000-prompt file) and the `shared` tensors (FLUX's position ids), on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace

import torch

from diffusers_tree.adapters import Conditioning


def _move(value, device: torch.device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _same_rows(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None) -> bool:
    if a is None or b is None or a.keys() != b.keys():
        return False
    return all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


class PromptEmbeddingCache:
    """`cache(prompts, sources)` returns `encode(prompts, sources)` (each prompt encoded alone, so equal to a batched
    encode up to float rounding), encoding only (prompt, source) pairs it has not seen.

    Args:
        encode: prompts -> `Conditioning` (the rollout pipeline's `encode` with the run's guidance, size, length),
            called as `encode(prompts, sources)` for editing prompts (their source image paths); only inside
            `encoders_ready()`.
        device: where the returned conditioning lives (the accelerator).
        storage_device: where the cached rows live between epochs ("cpu": off the accelerator).
        encoders_ready: a context manager factory around every batch of new prompts (the run's text-encoder
            offload: the encoders visit the accelerator at most once per call, not once per new prompt).
    """

    def __init__(self, encode: Callable[[list[str]], Conditioning], device: torch.device | str,
                 storage_device: torch.device | str = "cpu",
                 encoders_ready: Callable[[], AbstractContextManager] = nullcontext):
        self._encode, self.device, self.storage_device = encode, torch.device(device), torch.device(storage_device)
        self._encoders_ready = encoders_ready
        self._rows: dict[tuple[str, str | None], Conditioning] = {}  # per (prompt, source): its cond rows, and
        # uncond rows unless common
        self._common_uncond: dict[str, torch.Tensor] | None = None  # the negative prompt's rows, stored once
        self._template: Conditioning | None = None  # guidance, size and the `shared` tensors (stored once)
        self.encoded_prompts = 0  # how many prompts went through the text encoders (for tests and logs)

    def __len__(self) -> int:
        return len(self._rows)

    def __call__(self, prompts: list[str], sources: list[str] | None = None) -> Conditioning:
        keys = list(zip(prompts, [tuple(s) if isinstance(s, list) else s for s in sources]  # several: a tuple
                        if sources is not None else [None] * len(prompts), strict=True))
        new = list(dict.fromkeys(key for key in keys if key not in self._rows))
        if new:
            with self._encoders_ready():
                for prompt, source in new:
                    # one prompt per encoder call: text encoders' batched matmuls round differently at different
                    # batch sizes (~1e-7), and a prompt's embedding must not depend on which prompts were drawn with
                    # it, or a resumed run (empty cache, other draws) would drift from the uninterrupted one
                    encoded = self._encode([prompt]) if source is None else self._encode([prompt], [source])
                    self._store((prompt, source), encoded.to(self.storage_device))
                    self.encoded_prompts += 1
        parts = [self._rows[key] for key in keys]
        parts = [part if part.uncond is not None or self._common_uncond is None
                 else replace(part, uncond=self._common_uncond) for part in parts]
        joined = Conditioning.concat(parts).to(self.device)
        return replace(joined, shared={k: _move(v, self.device) for k, v in self._template.shared.items()})

    def _store(self, key: tuple[str, str | None], conditioning: Conditioning) -> None:
        if self._template is None:
            shared = {k: _move(v, self.storage_device) for k, v in conditioning.shared.items()}
            self._template = replace(conditioning, cond={}, uncond=None, shared=shared)
            self._common_uncond = conditioning.uncond
        uncond = conditioning.uncond
        if _same_rows(uncond, self._common_uncond):
            uncond = None  # the common rows, joined back in at `__call__`
        self._rows[key] = replace(conditioning, uncond=uncond, shared={})
