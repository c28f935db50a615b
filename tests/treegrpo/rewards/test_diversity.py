"""The diversity reward: each image's mean RMS pixel distance to the other images of its prompt in the batch."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from treegrpo.recipe.schema import RewardRecipe
from treegrpo.rewards import build_reward
from treegrpo.rewards.diversity import within_prompt_distance
from treegrpo.train.diagnostics import leaf_diversity


def _image(rng: np.random.Generator, side: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def _expected(images: list[Image.Image], prompts: list[str]) -> list[float]:
    """Written out per pair with numpy, independently of the reward's cdist."""
    arrays = [np.asarray(im, dtype=np.float64).reshape(-1) / 255.0 for im in images]
    out = []
    for i, prompt in enumerate(prompts):
        others = [j for j, p in enumerate(prompts) if p == prompt and j != i]
        rms = [math.sqrt(((arrays[i] - arrays[j]) ** 2).mean()) for j in others]
        out.append(sum(rms) / len(rms) if rms else 0.0)
    return out


@pytest.mark.parametrize("prompts", [["a", "a", "a", "b", "b", "c"], ["x", "y", "x", "y", "x", "z"]])
def test_each_image_scores_its_mean_distance_to_its_prompts_other_images(prompts):
    rng = np.random.default_rng(0)
    images = [_image(rng, 12) for _ in prompts]
    scores = build_reward("diversity")(images, prompts)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor(_expected(images, prompts), dtype=torch.float32), atol=1e-6,
                               rtol=1e-5)
    assert scores[prompts.index("c" if "c" in prompts else "z")] == 0  # alone with its prompt


def test_its_mean_over_a_group_is_the_logged_leaf_diversity():
    """What it rewards is what `tree/leaf_diversity` and `eval/diversity` show."""
    rng = np.random.default_rng(1)
    images = [_image(rng, 8) for _ in range(5)]
    scores = build_reward("diversity")(images, ["p"] * 5)
    pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
                          for im in images])
    total, groups = leaf_diversity(pixels, torch.zeros(5, dtype=torch.long))
    assert groups == 1
    assert float(scores.mean()) == pytest.approx(total, rel=1e-5)


def test_identical_images_score_zero_and_black_against_white_scores_one():
    black, white = Image.new("RGB", (8, 8), (0, 0, 0)), Image.new("RGB", (8, 8), (255, 255, 255))
    reward = build_reward("diversity")
    assert reward([black, black, black], ["p"] * 3).tolist() == [0.0, 0.0, 0.0]
    assert reward([black, white, black], ["p", "p", "q"]).tolist() == [1.0, 1.0, 0.0]
    assert within_prompt_distance(torch.zeros(0, 4), []).shape == (0,)


def test_large_images_are_measured_at_size():
    rng = np.random.default_rng(2)
    images = [_image(rng, 96) for _ in range(3)]
    small = [im.resize((32, 32), Image.BILINEAR) for im in images]
    torch.testing.assert_close(build_reward("diversity", size=32)(images, ["p"] * 3),
                               torch.tensor(_expected(small, ["p"] * 3), dtype=torch.float32), atol=1e-6, rtol=1e-5)


def test_bad_size_and_mixed_sizes_are_refused():
    with pytest.raises(ValueError, match="diversity size must be a positive integer.*got 0"):
        build_reward("diversity", size=0)
    with pytest.raises(ValueError, match=r"images of one size in a batch; got \[\(8, 8\), \(9, 9\)\]"):
        build_reward("diversity")([Image.new("RGB", (8, 8)), Image.new("RGB", (9, 9))], ["p", "p"])
    assert RewardRecipe(kind="diversity", weight=0.3, size=16).options() == {"size": 16}
    with pytest.raises(ValueError, match=r"does not take \['quality'\]; it takes \['size'\]"):
        RewardRecipe(kind="diversity", quality=3)
