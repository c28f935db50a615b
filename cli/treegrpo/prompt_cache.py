"""Prompt embeddings encoded once per unique prompt per run.

Every epoch draws prompts again; encoding them again (CLIP + CLIP + T5-XXL for SD3) is work whose result never
changes, since the text encoders are frozen. The cache keeps each prompt's conditioning rows, on the CPU by default
so that the accelerator holds only the epoch's rows. It lives in memory: after a resume each prompt is encoded once
more. diffusers has no such cache (its pipelines encode per call), so this small class is ours.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffusers_tree.adapters import Conditioning


class PromptEmbeddingCache:
    """`cache(prompts)` returns `encode(prompts)` (each prompt encoded alone, so equal to a batched encode up to float
    rounding), encoding only prompts it has not seen.

    Args:
        encode: prompts -> `Conditioning` (the rollout pipeline's `encode` with the run's guidance, size, length).
        device: where the returned conditioning lives (the accelerator).
        storage_device: where the cached rows live between epochs ("cpu": off the accelerator).
    """

    def __init__(self, encode: Callable[[list[str]], Conditioning], device: torch.device | str,
                 storage_device: torch.device | str = "cpu"):
        self._encode, self.device, self.storage_device = encode, torch.device(device), torch.device(storage_device)
        self._rows: dict[str, Conditioning] = {}
        self.encoded_prompts = 0  # how many prompts went through the text encoders (for tests and logs)

    def __len__(self) -> int:
        return len(self._rows)

    def __call__(self, prompts: list[str]) -> Conditioning:
        for prompt in dict.fromkeys(p for p in prompts if p not in self._rows):
            # one prompt per encoder call: text encoders' batched matmuls round differently at different batch
            # sizes (~1e-7), and a prompt's embedding must not depend on which prompts were drawn with it, or a
            # resumed run (empty cache, other draws) would drift from the uninterrupted one
            self._rows[prompt] = self._encode([prompt]).to(self.storage_device)
            self.encoded_prompts += 1
        return Conditioning.concat([self._rows[p] for p in prompts]).to(self.device)
