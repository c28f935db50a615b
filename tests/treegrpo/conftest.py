"""Shared fixtures for trainer tests: a tiny SD3 pipeline saved to disk in the real layout, prompts, a reward."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REWARD_MODULE = '''
import numpy as np

def brightness(images, prompts):
    return [float(np.asarray(image, dtype=np.float32).mean()) / 255.0 for image in images]

def red(images, prompts):
    return [float(np.asarray(image, dtype=np.float32)[..., 0].mean()) / 255.0 for image in images]

def nan_reward(images, prompts):
    return [float("nan")] * len(images)

CALLS = [0]

def nan_from_second_call(images, prompts):
    CALLS[0] += 1
    return brightness(images, prompts) if CALLS[0] < 2 else nan_reward(images, prompts)

RISING, FALLING = [0], [0]

def rising(images, prompts):  # the same score for every leaf, one more at every call: a rollout reward that rises
    RISING[0] += 1
    return [float(RISING[0])] * len(images)

def falling(images, prompts):  # one less at every call: an evaluation reward that falls
    FALLING[0] += 1
    return [-float(FALLING[0])] * len(images)

def interrupt_on_second_epoch(images, prompts):
    import os, signal
    CALLS[0] += 1
    if CALLS[0] == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return brightness(images, prompts)
'''


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    from diffusers_tree.testing import tiny_sd3_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny_sd3"
    tiny_sd3_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    (tmp_path / "prompts.txt").write_text("a red cat\na blue dog\na green tree\na white house\n")
    (tmp_path / "test_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import sys

    sys.modules.pop("test_rewards", None)
    return tmp_path


def write_recipe(folder: Path, model: Path, *, epochs: int = 2, function: str = "brightness",
                 name: str = "recipe.toml", evaluation: dict | None = None) -> Path:
    """A small valid recipe; tests change it with `--set`-style overrides. Evaluation during training is off unless
    `evaluation` gives its table (`{}`: the defaults): many tests count their reward's calls, which evaluating with
    the training reward would change; the tests of evaluation turn it on."""
    import json

    evaluation_table = "\n".join(f"{key} = {json.dumps(value)}" for key, value in
                                  ({"enabled": False} if evaluation is None else evaluation).items())
    text = textwrap.dedent(f"""
        [model]
        pretrained = "{model}"
        [model.lora]
        rank = 4
        alpha = 8
        [sampling]
        num_inference_steps = 5
        guidance_scale = 3.0
        height = 32
        width = 32
        max_sequence_length = 16
        [tree]
        branch_factor = 2
        window_width = 2
        [[reward]]
        kind = "python"
        function = "test_rewards:{function}"
        [data]
        prompts = "prompts.txt"
        prompts_per_epoch = 2
        [train]
        epochs = {epochs}
        learning_rate = 0.01
        micro_batch_size = 4
        [output]
        dir = "{folder / 'run'}"
        checkpoint_every = 1
        eval_every = 100
        log_with = "none"
        samples = false
        [evaluation]
    """) + evaluation_table + "\n"
    path = folder / name
    path.write_text(text)
    return path
