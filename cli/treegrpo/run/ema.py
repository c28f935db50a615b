"""Exponential moving average of the trainable weights (optional, `train.ema_decay`); exported at the end."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (its shard under FSDP2, the tensor itself otherwise)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class EMA:
    """`shadow ← decay · shadow + (1 - decay) · param` after every optimizer step. Saved with each checkpoint as
    safetensors (`tensors`/`load_tensors`: this process's shards), so resume stays exact and nothing is unpickled.

    Why not `diffusers.training_utils.EMAModel`: its decay is not the constant `train.ema_decay` the recipe
    documents (it ramps as (1 + t) / (10 + t), or with warm-up, up to `decay`), its state is meant to be pickled
    with `torch.save`, and it copies whole parameters, not this process's FSDP2 shard, when saving."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, param in zip(self.shadow, self.params, strict=True):
            shadow.lerp_(param.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for shadow, param in zip(self.shadow, self.params, strict=True):
            param.copy_(shadow.to(param.dtype))

    @contextmanager
    def applied(self):
        """The averaged weights in place of the trained ones while the block runs (mid-run samples, the LoRA file
        of a checkpoint), the trained ones restored after (training and accelerate's state go on from those)."""
        with torch.no_grad():
            trained = [param.detach().clone() for param in self.params]
            self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, trained, strict=True):
                    param.copy_(value)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"shadow.{i}": _local(s).detach().contiguous().cpu() for i, s in enumerate(self.shadow)}

    @torch.no_grad()
    def load_tensors(self, saved: dict[str, torch.Tensor]) -> None:
        if len(saved) != len(self.shadow):
            raise ValueError(f"the saved EMA has {len(saved)} tensors, this model {len(self.shadow)}")
        for i, shadow in enumerate(self.shadow):
            _local(shadow).copy_(saved[f"shadow.{i}"])
