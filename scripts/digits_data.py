"""The handwritten digits (scikit-learn's 8×8 set, upsampled) and the reward's digit classifier trained on them;
shared by `train_digits.py` (the builtin:digits model) and `train_digit_judge.py` (the independent judge)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from treegrpo.rewards.digits import DigitClassifier, DigitClassifierConfig, upsample_digits

logger = logging.getLogger("train_digits")
IMAGE_SIZE = 16


@dataclass
class Digits:
    pixels: torch.Tensor  # [N, 1, 16, 16] grey in [0, 1], paper = 1
    labels: torch.Tensor  # [N] int64
    train: np.ndarray  # indices of the classifier's splits
    val: np.ndarray
    test: np.ndarray


def load_data(seed: int) -> Digits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    pixels = upsample_digits(data.images, IMAGE_SIZE)
    labels = torch.tensor(data.target, dtype=torch.int64)
    index = np.arange(len(labels))
    train, rest = train_test_split(index, test_size=0.3, stratify=data.target, random_state=seed)
    val, test = train_test_split(rest, test_size=2 / 3, stratify=data.target[rest], random_state=seed)
    return Digits(pixels, labels, train, val, test)


# ---------------------------------------------------------------- classifier


def augment(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random rotation (±12°), scale (0.9-1.1), shift (±1.5 px) and pixel noise, on ink so borders stay paper."""
    n = pixels.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(12)
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (1.5 * 2 / IMAGE_SIZE)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    ink = F.grid_sample(1.0 - pixels, grid, align_corners=False, padding_mode="zeros")
    noise = torch.randn(pixels.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.08
    return (1.0 - ink + noise).clamp(0, 1)


def fit_classifier(config: DigitClassifierConfig, x: torch.Tensor, y: torch.Tensor, *, seed: int, epochs: int,
                   batch: int = 64) -> DigitClassifier:
    """A `DigitClassifier` trained on `(x, y)` with augmentation, AdamW and a one-cycle schedule (eval mode)."""
    torch.manual_seed(seed)
    model = DigitClassifier(config)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(y) / batch)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(augment(x[idx], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def train_classifier(data: Digits, seed: int, epochs: int) -> tuple[DigitClassifier, dict]:
    model = fit_classifier(DigitClassifierConfig(), data.pixels[data.train], data.labels[data.train], seed=seed,
                           epochs=epochs)
    with torch.no_grad():
        val_logits = model(data.pixels[data.val])
        temps = torch.logspace(-1, 1, 201)
        nll = torch.stack([F.cross_entropy(val_logits / t, data.labels[data.val]) for t in temps])
    model.config = replace(model.config, temperature=round(float(temps[nll.argmin()]), 4))
    report = {"temperature": model.config.temperature, **classifier_metrics(model, data.pixels, data.labels, data)}
    return model, report


@torch.no_grad()
def classifier_metrics(model: DigitClassifier, pixels: torch.Tensor, labels: torch.Tensor, data: Digits) -> dict:
    probs = model(pixels).softmax(-1)
    correct = (probs.argmax(-1) == labels).float()
    true_prob = probs.gather(1, labels[:, None])[:, 0]
    test = torch.as_tensor(data.test)
    return {
        "test_accuracy": round(correct[test].mean().item(), 4),
        "test_mean_true_prob": round(true_prob[test].mean().item(), 4),
        "test_size": len(test),
        "all_accuracy": round(correct.mean().item(), 4),
    }


# ---------------------------------------------------------------- VAE
