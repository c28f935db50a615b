"""The digit reward: probability of the prompted digit under the small classifier shipped with `builtin:digits`.

The classifier (`DigitClassifier`) and its preprocessing (`images_to_pixels`) are defined here once; the training
script (`scripts/train_digits.py`) imports them, so what is trained is exactly what scores.

Example:

```py
>>> from treegrpo.builtin import load_digits_pipeline
>>> from treegrpo.rewards.digits import DigitsReward
>>> pipe, meta = load_digits_pipeline()
>>> prompts = [meta["prompt_template"].format(digit="seven")] * 4
>>> images = pipe(prompts, **meta["pipeline_kwargs"]).images
>>> reward = DigitsReward()
>>> reward(images, prompts).shape
torch.Size([4])
```
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from treegrpo.rewards.base import RewardBase

__all__ = [
    "DIGIT_WORDS",
    "DigitClassifier",
    "DigitClassifierConfig",
    "DigitsReward",
    "images_to_pixels",
    "load_digit_classifier",
    "prompt_digits",
    "upsample_digits",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT_PATTERN = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b", re.IGNORECASE)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class DigitClassifierConfig:
    """Shape of a `DigitClassifier`; saved as `config.json` next to its weights.

    Args:
        image_size (`int`, defaults to 16): side of the grey input the network sees; other sizes are resized.
        channels (`tuple[int, ...]`, defaults to `(16, 32, 64)`): conv widths; every conv after the first halves
            the side.
        hidden (`int`, defaults to 64): width of the hidden linear layer.
        temperature (`float`, defaults to 1.0): logits are divided by it (fit on held-out digits after training).
    """

    image_size: int = 16
    channels: tuple[int, ...] = (16, 32, 64)
    hidden: int = 64
    temperature: float = 1.0


class DigitClassifier(nn.Module):
    """Small CNN that reads a grey digit (dark ink on light paper, values in [0, 1]) and returns calibrated logits.

    Input `pixels` [N, 1, image_size, image_size]; output logits [N, 10] (already divided by the temperature).
    """

    def __init__(self, config: DigitClassifierConfig | None = None):
        super().__init__()
        self.config = config or DigitClassifierConfig()
        layers: list[nn.Module] = []
        side, width_in = self.config.image_size, 1
        for i, width in enumerate(self.config.channels):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(width_in, width, 3, stride=stride, padding=1), nn.ReLU()]
            side, width_in = (side + stride - 1) // stride, width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(width_in * side * side, self.config.hidden), nn.ReLU(),
            nn.Linear(self.config.hidden, len(DIGIT_WORDS)),
        )  # fmt: skip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        ink = 1.0 - pixels  # ink positive, paper zero: the convs' zero padding then reads as blank paper
        return self.head(self.features(ink)) / self.config.temperature


def images_to_pixels(images: list[Image.Image] | torch.Tensor, image_size: int = 16) -> torch.Tensor:
    """Grey float pixels [N, 1, image_size, image_size] in [0, 1] from PIL images (any mode and size) or from a
    float tensor [N, C, H, W] in [0, 1] (C = 1 or 3, as the pipelines return with `output_type="pt"`)."""
    if isinstance(images, torch.Tensor):
        pixels = images.float()
        if pixels.ndim != 4 or pixels.shape[1] not in (1, 3):
            raise ValueError(f"expected a float tensor [N, 1 or 3, H, W] in [0, 1], got shape {tuple(pixels.shape)}")
        pixels = pixels.mean(dim=1, keepdim=True)
        if pixels.shape[-2:] != (image_size, image_size):
            pixels = nn.functional.interpolate(pixels, size=(image_size, image_size), mode="bilinear", antialias=True)
        return pixels.clamp(0.0, 1.0)
    arrays = []
    for image in images:
        grey = image.convert("L")
        if grey.size != (image_size, image_size):
            grey = grey.resize((image_size, image_size), Image.BILINEAR)
        arrays.append(np.asarray(grey, dtype=np.float32) / 255.0)
    if not arrays:
        return torch.zeros(0, 1, image_size, image_size)
    return torch.from_numpy(np.stack(arrays))[:, None]


def upsample_digits(images8: np.ndarray | torch.Tensor, image_size: int = 16) -> torch.Tensor:
    """scikit-learn's 8x8 digits (ink 0..16, [N, 8, 8]) as the images the model is trained on: grey pixels
    [N, 1, image_size, image_size] in [0, 1], dark ink on light paper, bilinear upsampling."""
    ink = torch.as_tensor(np.asarray(images8), dtype=torch.float32)[:, None] / 16.0
    ink = nn.functional.interpolate(ink, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (1.0 - ink).clamp(0.0, 1.0)


def pixels_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """Grey pixels [N, 1, H, W] in [0, 1] to N 8-bit RGB PIL images (grey repeated over the 3 channels)."""
    array = (pixels[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(grey, mode="L").convert("RGB") for grey in array]


def prompt_digits(prompts: list[str]) -> torch.Tensor:
    """The digit each prompt names (a word such as "seven" or a numeral "7"), as int64 [N].

    Raises `ValueError` for a prompt that names no digit or several different ones."""
    labels = []
    for prompt in prompts:
        found = {_word_to_digit(match) for match in _DIGIT_PATTERN.findall(prompt)}
        if len(found) != 1:
            problem = "names no digit" if not found else f"names several digits {sorted(found)}"
            raise ValueError(
                f"The digits reward needs each prompt to name exactly one digit, but {prompt!r} {problem}. "
                f"Write it as a word ({', '.join(DIGIT_WORDS)}) or a numeral 0-9, e.g. 'a handwritten digit seven'."
            )
        labels.append(found.pop())
    return torch.tensor(labels, dtype=torch.int64)


def _word_to_digit(token: str) -> int:
    return int(token) if token.isdigit() else DIGIT_WORDS.index(token.lower())


def load_digit_classifier(path: str | Path | None = None) -> DigitClassifier:
    """Load a `DigitClassifier` saved as `config.json` + `model.safetensors` (default: the one shipped with
    `builtin:digits`), in eval mode, fp32, on CPU."""
    from safetensors.torch import load_file

    if path is None:
        from treegrpo.builtin import BUILTIN_DIGITS_DIR

        path = BUILTIN_DIGITS_DIR / "classifier"
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"no digit classifier at {path}: expected {CONFIG_NAME} and {WEIGHTS_NAME} there "
            "(run `python scripts/train_digits.py` to rebuild the shipped one)."
        )
    raw = json.loads((path / CONFIG_NAME).read_text())
    fields = DigitClassifierConfig.__dataclass_fields__
    config = DigitClassifierConfig(**{k: tuple(v) if k == "channels" else v for k, v in raw.items() if k in fields})
    model = DigitClassifier(config)
    model.load_state_dict(load_file(path / WEIGHTS_NAME))
    return model.eval()


def save_digit_classifier(model: DigitClassifier, path: str | Path, extra: dict | None = None) -> None:
    """Save `model` as `config.json` (its config plus `extra` metadata) and fp32 `model.safetensors`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path / WEIGHTS_NAME)
    config = {**asdict(model.config), **(extra or {})}
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


class DigitTypicality:
    """Whether a digit image lies as close to a real digit of its class as `quantile` of the real digits do: the
    check a blob cannot pass, whatever a classifier says about it. Real digits are scikit-learn's 1,797 (UCI,
    CC BY 4.0; `builtin/digits/reference.npz`), upsampled as the model saw them; distance is the L2 distance of the
    grey pixels; a class's threshold is the `quantile` of its real digits' distances to their nearest other real
    digit of the class (leave one out)."""

    def __init__(self, image_size: int = 16, quantile: float = 0.99, path: str | Path | None = None):
        from treegrpo.builtin import BUILTIN_DIGITS_DIR

        data = np.load(path or BUILTIN_DIGITS_DIR / "reference.npz")
        pixels = upsample_digits(data["images"], image_size).flatten(1)
        labels = torch.as_tensor(data["labels"].astype(np.int64))
        self.image_size = image_size
        self.real = [pixels[labels == digit] for digit in range(len(DIGIT_WORDS))]
        thresholds = []
        for real in self.real:
            distances = torch.cdist(real, real)
            distances.fill_diagonal_(float("inf"))
            thresholds.append(torch.quantile(distances.min(dim=1).values, quantile))
        self.thresholds = torch.stack(thresholds)

    def nearest_distance(self, pixels: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
        """L2 distance `[N]` of each grey image `[N, 1, S, S]` to the nearest real digit of its class `digits[i]`."""
        flat = pixels.detach().float().cpu().flatten(1)
        return torch.stack([torch.cdist(flat[i:i + 1], self.real[int(d)]).min() for i, d in enumerate(digits)]) \
            if len(flat) else torch.zeros(0)

    def __call__(self, pixels: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
        """Bool `[N]`: image i is a typical `digits[i]`."""
        return self.nearest_distance(pixels, digits) <= self.thresholds[digits.cpu()]


class DigitsReward(RewardBase):
    """Probability of the prompted digit under the shipped digit classifier (independent of the generator).

    Args:
        name (`str`, *optional*, defaults to `"digits"`): the reward's name in metrics.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where the classifier runs.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): classifier dtype; scores are float32.
        classifier (`str`, *optional*): folder with `config.json` + `model.safetensors`, or `"judge"` for the shipped
            judge (a second classifier trained on the images the default one never saw; use it to check that a
            run's accuracy is not the reward classifier's blind spots); defaults to the one
            shipped with `builtin:digits`.
        strict (`bool`, defaults to `False`): also require every image to be a typical digit of its class
            ([`DigitTypicality`]: as close to a real one as 99 % of real digits are). Its score is then 0 and it
            counts as wrong otherwise, so a blob the classifier likes earns nothing: the judge for evaluation.

    Calling it with `(images, prompts)` returns float32 [N] in [0, 1]. On real digits the true class gets ~0.95 on
    average, so the reward tops out near that, not at 1. Loading is lazy (first call).
    """

    def __init__(
        self,
        name: str = "digits",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        classifier: str | None = None,
        strict: bool = False,
    ):
        if classifier == "judge":  # the shipped second classifier that no run trains on (scripts/train_digit_judge.py)
            from treegrpo.builtin import BUILTIN_DIGITS_DIR

            classifier = str(BUILTIN_DIGITS_DIR / "judge")
            name = "judge" if name == "digits" else name
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        self.classifier_path = classifier
        if not isinstance(strict, bool):  # `strict = "false"` in a recipe would otherwise read as true
            raise ValueError(f"strict must be true or false, got {strict!r}.")
        self.strict = strict
        self._model: DigitClassifier | None = None
        self._typicality: DigitTypicality | None = None

    def modules(self) -> list[torch.nn.Module]:
        """The loaded models (none before the first load)."""
        return [m for m in (self._model,) if m is not None]

    def load(self) -> DigitsReward:
        """Load the classifier now (otherwise the first call does)."""
        if self._model is None:
            self._model = load_digit_classifier(self.classifier_path).to(self.device, self.dtype)
        return self

    @property
    def model(self) -> DigitClassifier:
        return self.load()._model

    @torch.no_grad()
    def probabilities(self, images: list[Image.Image] | torch.Tensor) -> torch.Tensor:
        """Class probabilities float32 [N, 10]."""
        pixels = images_to_pixels(images, self.model.config.image_size).to(self.device, self.dtype)
        return self.model(pixels).float().softmax(dim=-1).cpu()

    def __call__(self, images: list[Image.Image] | torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score_and_accuracy(images, prompts)[0]

    def accuracy(self, images: list[Image.Image] | torch.Tensor, prompts: list[str]) -> float:
        """Fraction of images whose most likely class is the prompted digit."""
        return self.score_and_accuracy(images, prompts)[1]

    def score_and_accuracy(self, images: list[Image.Image] | torch.Tensor, prompts: list[str],
                           metadata: list[dict] | None = None) -> tuple[torch.Tensor, float]:
        """The reward `[N]` and the accuracy from one classifier pass (the trainer logs both every epoch)."""
        labels = prompt_digits(prompts)
        if len(images) != len(labels):
            raise ValueError(f"got {len(images)} images for {len(labels)} prompts; pass one prompt per image")
        probabilities = self.probabilities(images)
        scores = probabilities.gather(1, labels[:, None])[:, 0]
        correct = probabilities.argmax(dim=-1) == labels
        if self.strict:
            if self._typicality is None:
                self._typicality = DigitTypicality(self.model.config.image_size)
            typical = self._typicality(images_to_pixels(images, self.model.config.image_size), labels)
            scores, correct = scores * typical, correct & typical
        return scores, correct.float().mean().item()
