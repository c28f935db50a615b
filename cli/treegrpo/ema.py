"""Exponential moving average of the trainable weights (optional, `train.ema_decay`); exported at the end."""

from __future__ import annotations

import torch


class EMA:
    """`shadow ← decay · shadow + (1 - decay) · param` after every optimizer step. Checkpointed with the run
    (`state_dict`/`load_state_dict`, registered with accelerate), so resume stays exact."""

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

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for shadow, saved in zip(self.shadow, state["shadow"], strict=True):
            shadow.copy_(saved)
