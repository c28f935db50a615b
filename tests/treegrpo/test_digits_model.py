"""The shipped `builtin:digits` model and the `digits` reward: they load offline with stock diffusers, sample with the
stored settings, and the classifier behind the reward reads real handwritten digits."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from treegrpo.builtin import BUILTIN_DIGITS_DIR, digits_metadata, load_digits_pipeline, resolve_pretrained
from treegrpo.rewards.digits import DIGIT_WORDS, DigitsReward, pixels_to_images, prompt_digits, upsample_digits

# The first "7" and the first "1" of sklearn.datasets.load_digits (indices 7 and 1), ink 0..16.
SEVEN = [
    [0, 0, 7, 8, 13, 16, 15, 1], [0, 0, 7, 7, 4, 11, 12, 0], [0, 0, 0, 0, 8, 13, 1, 0], [0, 4, 8, 8, 15, 15, 6, 0],
    [0, 2, 11, 15, 15, 4, 0, 0], [0, 0, 0, 16, 5, 0, 0, 0], [0, 0, 9, 15, 1, 0, 0, 0], [0, 0, 13, 5, 0, 0, 0, 0],
]  # fmt: skip
ONE = [
    [0, 0, 0, 12, 13, 5, 0, 0], [0, 0, 0, 11, 16, 9, 0, 0], [0, 0, 3, 15, 16, 6, 0, 0], [0, 7, 15, 16, 16, 2, 0, 0],
    [0, 0, 1, 16, 16, 3, 0, 0], [0, 0, 1, 16, 16, 6, 0, 0], [0, 0, 1, 16, 16, 6, 0, 0], [0, 0, 0, 11, 16, 10, 0, 0],
]  # fmt: skip
PIPELINE_DIR = BUILTIN_DIGITS_DIR / "pipeline"


@pytest.fixture(scope="module")
def shipped():
    pipe = StableDiffusion3Pipeline.from_pretrained(PIPELINE_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe, digits_metadata()


@pytest.fixture(scope="module")
def reward():
    return DigitsReward().load()


def test_shipped_folder_is_small_and_fp32():
    files = [path for path in BUILTIN_DIGITS_DIR.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= 10 * 2**20
    assert not [path for path in files if path.suffix in (".bin", ".pt", ".pth")], "weights must be safetensors"
    from safetensors import safe_open

    for path in (p for p in files if p.suffix == ".safetensors"):
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}, path


def test_builtin_name_resolves_and_unknown_names_list_the_known_ones():
    assert resolve_pretrained("builtin:digits") == str(PIPELINE_DIR)
    assert resolve_pretrained("org/model") == "org/model"
    with pytest.raises(ValueError, match="known: builtin:digits"):
        resolve_pretrained("builtin:letters")


def test_metadata_holds_the_call_kwargs_the_model_was_trained_with(shipped):
    pipe, meta = shipped
    kwargs = meta["pipeline_kwargs"]
    assert kwargs == {"height": 16, "width": 16, "num_inference_steps": 10, "guidance_scale": 1.0,
                      "max_sequence_length": pipe.tokenizer.model_max_length}  # fmt: skip
    assert kwargs["max_sequence_length"] < 256  # the SD3 default would wreck the model (FACTS)
    # The pipeline pads CLIP (32 + 32) up to the T5 width with F.pad; a narrower T5 would silently crop.
    clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_3.config.d_model == clip_width
    assert 0.3 <= meta["base_accuracy"]["guidance_1"]["accuracy"] <= 0.7


def test_each_digit_prompt_gets_its_own_pooled_embedding(shipped):
    """The tiny CLIPs pool at argmax(input_ids): the digit word must hold the highest id in every prompt."""
    pipe, meta = shipped
    prompts = [meta["prompt_template"].format(digit=word) for word in DIGIT_WORDS]
    with torch.no_grad():
        _, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                             max_sequence_length=meta["max_sequence_length"])  # fmt: skip
    distances = torch.cdist(pooled, pooled) + torch.eye(10)
    assert distances.min() > 1e-3


def test_pipeline_samples_16px_images_deterministically(shipped):
    pipe, meta = shipped
    prompts = ["a handwritten digit seven", "a handwritten digit zero"]
    first = pipe(prompts, generator=torch.Generator().manual_seed(0), output_type="pt", **meta["pipeline_kwargs"])
    again = pipe(prompts, generator=torch.Generator().manual_seed(0), output_type="pt", **meta["pipeline_kwargs"])
    assert first.images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(first.images, again.images)
    images = pipe(prompts, generator=torch.Generator().manual_seed(0), **meta["pipeline_kwargs"]).images
    assert [image.size for image in images] == [(16, 16), (16, 16)]


def test_base_model_follows_its_prompt_only_partly(shipped, reward):
    """The point of the model: RL has something to fix. 100 samples, so a loose band around the stored 30-70 %."""
    pipe, meta = shipped
    prompts = [meta["prompt_template"].format(digit=word) for word in DIGIT_WORDS for _ in range(10)]
    images = pipe(prompts, generator=torch.Generator().manual_seed(0), **meta["pipeline_kwargs"]).images
    assert 0.15 <= reward.accuracy(images, prompts) <= 0.85


def test_load_digits_pipeline_returns_the_pipeline_and_its_metadata():
    pipe, meta = load_digits_pipeline()
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert meta == json.loads((BUILTIN_DIGITS_DIR / "digits.json").read_text())


def test_loads_and_samples_with_the_hub_offline(tmp_path):
    code = (
        "from treegrpo.builtin import load_digits_pipeline\n"
        "pipe, meta = load_digits_pipeline()\n"
        "print(pipe(['a handwritten digit three'], **meta['pipeline_kwargs']).images[0].size)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("(16, 16)")


def test_reward_ranks_a_real_seven_above_a_real_one(reward):
    images = pixels_to_images(upsample_digits(np.array([SEVEN, ONE])))
    scores = reward(images, ["a handwritten digit seven"] * 2)
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert scores[0] > 0.5 > scores[1]
    # Probabilities over the ten digits sum to one, so the "one" prompt flips the ranking.
    assert reward(images, ["a handwritten digit one"] * 2).argmax() == 1


def test_classifier_reads_real_digits():
    datasets = pytest.importorskip("sklearn.datasets")  # scikit-learn is a build-time extra only
    digits = datasets.load_digits()
    images = pixels_to_images(upsample_digits(digits.images))
    prompts = [f"a handwritten digit {DIGIT_WORDS[label]}" for label in digits.target]
    reward = DigitsReward()
    assert reward.accuracy(images, prompts) >= 0.9
    scores = reward(images, prompts)
    assert ((scores >= 0) & (scores <= 1)).all() and scores.mean() >= 0.85


def test_prompt_digits_parses_words_and_numerals_and_rejects_the_rest():
    assert prompt_digits(["a handwritten digit Seven", "the number 3", "zero"]).tolist() == [7, 3, 0]
    with pytest.raises(ValueError, match="names no digit"):
        prompt_digits(["a handwritten cat"])
    with pytest.raises(ValueError, match="several digits"):
        prompt_digits(["one or two"])


def test_reward_is_lazy_and_checks_lengths(tmp_path):
    lazy = DigitsReward(classifier=str(tmp_path))  # an empty folder: fails only when used
    with pytest.raises(FileNotFoundError, match="no digit classifier"):
        lazy.load()
    real = DigitsReward()
    images = pixels_to_images(upsample_digits(np.array([SEVEN])))
    with pytest.raises(ValueError, match="1 images for 2 prompts"):
        real(images, ["seven", "one"])


def test_judge_is_a_different_classifier_that_reads_the_same_digits(reward):
    """The judge (`classifier="judge"`): its own name, architecture and weights, trained on other images, and it
    reads real digits like the reward's classifier does."""
    judge = DigitsReward(classifier="judge").load()
    assert judge.name == "judge"
    assert judge.model.config.channels != reward.model.config.channels
    config = json.loads((BUILTIN_DIGITS_DIR / "judge" / "config.json").read_text())
    assert config["training"]["train_images"] == 540 and config["training"]["unseen_accuracy"] >= 0.99
    images = pixels_to_images(upsample_digits(np.array([SEVEN, ONE])))
    assert judge.accuracy(images, ["seven", "one"]) == 1.0
    assert judge(images, ["a handwritten digit seven"] * 2).argmax() == 0


def test_judge_reads_the_digits_it_never_trained_on():
    datasets = pytest.importorskip("sklearn.datasets")  # scikit-learn is a build-time extra only
    from sklearn.model_selection import train_test_split

    digits = datasets.load_digits()
    index = np.arange(len(digits.target))
    unseen, _ = train_test_split(index, test_size=0.3, stratify=digits.target, random_state=0)  # reward's train split
    images = pixels_to_images(upsample_digits(digits.images[unseen]))
    prompts = [f"a handwritten digit {DIGIT_WORDS[label]}" for label in digits.target[unseen]]
    assert DigitsReward(classifier="judge").accuracy(images, prompts) >= 0.99
