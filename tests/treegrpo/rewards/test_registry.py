"""The registry, `to_pil`, and the two model-free rewards (jpeg, python)."""

import io
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from treegrpo.rewards import REWARD_KINDS, RewardBase, build_reward, reward_options, to_pil

MODEL_KINDS = ["pickscore", "clipscore", "hpsv2", "imagereward", "aesthetic"]


# ---- registry -------------------------------------------------------------------------------------------------------
def test_kinds():
    assert {"pickscore", "hpsv2", "imagereward", "aesthetic", "clipscore", "jpeg", "python"} <= set(REWARD_KINDS)


def test_unknown_kind_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown reward kind 'hps'; known kinds: aesthetic, clipscore") as error:
        build_reward("hps")
    assert all(kind in str(error.value) for kind in REWARD_KINDS)


def test_unknown_option_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"Unknown option 'qualty' for reward kind 'jpeg'; allowed options: quality"):
        build_reward("jpeg", qualty=80)
    allowed = "allowed options: pretrained, processor, scale, batch_size"
    with pytest.raises(ValueError, match=f"Unknown options 'path', 'scal' for reward kind 'pickscore'; {allowed}"):
        build_reward("pickscore", scal="raw", path="x")


def test_missing_required_option():
    with pytest.raises(ValueError, match="reward kind 'python' needs the option 'function'"):
        build_reward("python")


def test_options_and_defaults():
    assert reward_options("hpsv2") == {
        "version": "v2.1",
        "pretrained": "xswu/HPSv2",
        "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        "clip_config": None,
        "batch_size": 32,
    }
    assert reward_options("pickscore")["pretrained"] == "yuvalkirstain/PickScore_v1"
    assert reward_options("imagereward")["pretrained"] == "THUDM/ImageReward"
    assert reward_options("aesthetic")["pretrained"] == "trl-lib/ddpo-aesthetic-predictor"
    assert reward_options("aesthetic")["clip_pretrained"] == "openai/clip-vit-large-patch14"
    assert reward_options("clipscore") == {
        "pretrained": "openai/clip-vit-large-patch14",
        "processor": None,
        "scale": 1.0,
        "clamp": False,
        "batch_size": 32,
    }


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_model_rewards_build_with_hub_defaults_without_touching_the_hub(kind):
    reward = build_reward(kind, device="cpu", dtype="bfloat16")  # lazy: nothing is downloaded or read
    assert isinstance(reward, RewardBase) and reward.name == kind and reward.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("batch_size", [0, -1, 2.0, "8"])
def test_batch_size_must_be_a_positive_integer(kind, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        build_reward(kind, batch_size=batch_size)


def test_bad_dtype():
    with pytest.raises(ValueError, match="Unknown dtype 'half8'"):
        build_reward("clipscore", dtype="half8")


# ---- to_pil -------------------------------------------------------------------------------------------------------
def test_to_pil_rounds_and_clamps():
    images = torch.tensor([0.0, 0.2, 0.5, 1.0, -0.3, 1.7]).reshape(1, 1, 2, 3).expand(2, 3, 2, 3)
    pil = to_pil(images)
    assert len(pil) == 2 and pil[0].size == (3, 2) and pil[0].mode == "RGB"
    # 0.2·255 = 51; 0.5·255 = 127.5 rounds (half to even) to 128; out-of-range values clamp to 0 and 255
    np.testing.assert_array_equal(np.asarray(pil[1])[..., 0], [[0, 51, 128], [255, 0, 255]])


def test_to_pil_rejects_other_shapes():
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        to_pil(torch.rand(3, 8, 8))


# ---- jpeg -----------------------------------------------------------------------------------------------------------
def _jpeg_kb(image, quality):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000


def test_jpeg_is_minus_the_size_in_kb(noise_images):
    flat = Image.new("RGB", (64, 64), (90, 120, 200))
    noisy = noise_images(1, size=64)[0]
    scores = build_reward("jpeg")([flat, noisy], ["a", "b"])
    torch.testing.assert_close(scores, -torch.tensor([_jpeg_kb(flat, 95), _jpeg_kb(noisy, 95)]))
    assert scores[0] > scores[1]  # flat images compress better
    low = build_reward("jpeg", quality=10)([noisy], ["b"])
    assert low.item() == pytest.approx(-_jpeg_kb(noisy, 10)) and low > scores[1]


@pytest.mark.parametrize("quality", [0, 96, 50.0, True])
def test_jpeg_quality_range(quality):
    with pytest.raises(ValueError, match="quality"):
        build_reward("jpeg", quality=quality)


# ---- python ---------------------------------------------------------------------------------------------------------
USER_MODULE = """
import numpy as np
import torch

CALLS = []

def green(images, prompts):
    CALLS.append(len(images))
    return [float(np.asarray(image)[..., 1].mean()) / 255 for image in images]

def as_numpy(images, prompts):
    return np.arange(len(images), dtype=np.float64)

def as_column(images, prompts):
    return torch.arange(len(images), dtype=torch.float64, requires_grad=True)[:, None] * 1.0

def short(images, prompts):
    return [0.0] * (len(images) - 1)

def nan(images, prompts):
    return [float("nan")] * len(images)

def words(images, prompts):
    return ["high"] * len(images)

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    return tmp_path / "my_rewards.py"


def test_python_reward_from_a_module(user_module):
    reward = build_reward("python", function="my_rewards:green")
    images = [Image.new("RGB", (4, 4), (0, g, 0)) for g in (0, 51, 255)]
    assert reward.name == "green"
    torch.testing.assert_close(reward(images, ["x"] * 3), torch.tensor([0.0, 0.2, 1.0]))


def test_python_reward_from_a_file_path(user_module):
    reward = build_reward("python", function=f"{user_module}:as_numpy")
    scores = reward([Image.new("RGB", (4, 4))] * 3, ["x"] * 3)
    assert scores.dtype == torch.float32 and scores.tolist() == [0.0, 1.0, 2.0]


def test_python_reward_accepts_a_column_tensor_with_grad(user_module):
    scores = build_reward("python", function="my_rewards:as_column")([Image.new("RGB", (4, 4))] * 2, ["x"] * 2)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and not scores.requires_grad


def test_python_reward_batches(user_module):
    import my_rewards

    reward = build_reward("python", function="my_rewards:green", batch_size=2)
    my_rewards.CALLS.clear()
    assert reward([Image.new("RGB", (4, 4))] * 5, ["x"] * 5).shape == (5,)
    assert my_rewards.CALLS == [2, 2, 1]


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("my_rewards.green", "must look like 'package.module:function'"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'.*ModuleNotFoundError"),
        ("my_rewards:no_such", "'my_rewards' has no attribute 'no_such'"),
        ("my_rewards:NOT_A_FUNCTION", "is a int, not a function"),
        ("missing/file.py:f", "cannot import 'missing/file.py'.*no such file"),
    ],
)
def test_python_reward_fails_at_build_time(user_module, function, message):
    with pytest.raises(ValueError, match=message):
        build_reward("python", function=function)


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("short", r"must return one score per image \(3\); got shape \(2,\)"),
        ("nan", r"non-finite scores at positions \[0, 1, 2\]"),
        ("words", "not a sequence of numbers"),
    ],
)
def test_python_reward_checks_what_the_function_returns(user_module, function, message):
    reward = build_reward("python", function=f"my_rewards:{function}")
    with pytest.raises(ValueError, match=message):
        reward([Image.new("RGB", (4, 4))] * 3, ["x"] * 3)


def test_the_validators_option_table_matches_the_factories():
    """`treegrpo.recipe.reward_kinds` (read by the recipe validator without importing reward code) must list exactly
    the options each factory takes."""
    import inspect

    from treegrpo.recipe.reward_kinds import REQUIRED_OPTIONS, REWARD_OPTION_NAMES

    assert set(REWARD_OPTION_NAMES) == set(REWARD_KINDS)
    for kind in REWARD_KINDS:
        assert REWARD_OPTION_NAMES[kind] == set(reward_options(kind)), kind
        required = {name for name, default in reward_options(kind).items() if default is inspect.Parameter.empty}
        assert required == set(REQUIRED_OPTIONS.get(kind, ())), kind
