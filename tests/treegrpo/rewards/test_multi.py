"""Several rewards: per-reward group normalization, weights, and per-reward metrics."""

import textwrap

import pytest
import torch
from PIL import Image

from treegrpo.rewards import MultiReward, build_reward
from treegrpo.rewards.base import RewardBase  # noqa: E402

USER_MODULE = """
import numpy as np

def red(images, prompts):
    return [float(np.asarray(image)[..., 0].mean()) for image in images]

def blue(images, prompts):
    return [float(np.asarray(image)[..., 2].mean()) / 255 for image in images]
"""
REDS, BLUES = [0, 10, 30, 100, 200, 250], [255, 0, 51, 0, 102, 255]


@pytest.fixture
def rewards(tmp_path):
    path = tmp_path / "colors.py"
    path.write_text(textwrap.dedent(USER_MODULE))
    red, blue = (build_reward("python", function=f"{path}:{name}") for name in ("red", "blue"))
    images = [Image.new("RGB", (4, 4), (r, 0, b)) for r, b in zip(REDS, BLUES, strict=True)]
    return {"red": red, "blue": blue}, images, ["p"] * len(images)


def normalize(values, groups, eps=1e-4):
    """Eq. 9 written out: (x - group mean) / (group std, ddof 0, + eps)."""
    values, out = torch.tensor(values, dtype=torch.float64), torch.empty(len(values), dtype=torch.float64)
    for group in set(groups):
        index = torch.tensor([i for i, g in enumerate(groups) if g == group])
        part = values[index]
        out[index] = (part - part.mean()) / (part.std(unbiased=False) + eps)
    return out


def test_advantage_mode_weights_the_normalized_rewards(rewards):
    named, images, prompts = rewards
    multi = MultiReward(named, {"red": 0.8, "blue": 0.2})
    scores = multi.score(images, prompts)
    assert scores.names == ("red", "blue") and scores.scores.shape == (2, 6)
    torch.testing.assert_close(scores["blue"], torch.tensor(BLUES) / 255)
    groups = [0, 0, 0, 1, 1, 1]
    blues = [b / 255 for b in BLUES]
    expected = 0.8 * normalize(REDS, groups) + 0.2 * normalize(blues, groups)
    advantages = multi.advantages(scores, torch.tensor(groups))
    torch.testing.assert_close(advantages, expected.float(), rtol=1e-5, atol=1e-5)


def test_reward_mode_normalizes_the_weighted_sum(rewards):
    named, images, prompts = rewards
    multi = MultiReward(named, {"red": 0.5, "blue": 2.0}, mode="reward")
    groups = [0, 1, 0, 1, 0, 1]
    total = [0.5 * r + 2.0 * b / 255 for r, b in zip(REDS, BLUES, strict=True)]
    advantages = multi.advantages(multi.score(images, prompts), torch.tensor(groups))
    torch.testing.assert_close(advantages, normalize(total, groups).float(), rtol=1e-5, atol=1e-5)


def test_per_reward_metrics(rewards):
    named, images, prompts = rewards
    multi = MultiReward(named)
    metrics = multi.metrics(multi.score(images, prompts))
    assert set(metrics) == {"reward/red/mean", "reward/red/std", "reward/blue/mean", "reward/blue/std"}
    assert metrics["reward/red/mean"] == pytest.approx(sum(REDS) / 6)
    assert metrics["reward/red/std"] == pytest.approx(
        float(torch.tensor(REDS, dtype=torch.float64).std(unbiased=False))
    )


def test_from_specs(tmp_path):
    (tmp_path / "colors.py").write_text(textwrap.dedent(USER_MODULE))
    specs = {
        "compress": {"kind": "jpeg", "weight": 0.8, "quality": 90},
        "blue": {"kind": "python", "function": f"{tmp_path / 'colors.py'}:blue"},
    }
    multi = MultiReward.from_specs(specs)
    assert multi.names == ("compress", "blue") and multi.weights == (0.8, 1.0)
    assert multi.rewards["compress"].quality == 90
    with pytest.raises(ValueError, match="reward 'x' needs a 'kind'"):
        MultiReward.from_specs({"x": {"weight": 1.0}})
    with pytest.raises(ValueError, match="Unknown reward kind"):
        MultiReward.from_specs({"x": {"kind": "nope"}})


def test_configuration_errors(rewards):
    named, _, _ = rewards
    with pytest.raises(ValueError, match="at least one reward"):
        MultiReward({})
    with pytest.raises(ValueError, match=r"weights must name exactly the rewards \['blue', 'red'\]"):
        MultiReward(named, {"red": 1.0})
    with pytest.raises(ValueError, match="finite number"):
        MultiReward(named, {"red": 1.0, "blue": float("inf")})
    with pytest.raises(ValueError, match="aggregation mode"):
        MultiReward(named, mode="sum")


def test_a_reward_returning_the_wrong_shape_is_caught(rewards):
    named, images, prompts = rewards

    class Broken(RewardBase):
        name = "broken"

        def __call__(self, images, prompts):
            return torch.zeros(len(images), 1)

    with pytest.raises(ValueError, match=r"reward 'broken' returned shape \(6, 1\); expected \(6,\)"):
        MultiReward({**named, "broken": Broken()}).score(images, prompts)
