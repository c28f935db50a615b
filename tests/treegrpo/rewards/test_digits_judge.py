"""The strict digits judge: a typical digit of its class (as close to a real one as 99 % of real digits are), else
nothing, whatever the classifier says."""

import numpy as np
import pytest
import torch

from treegrpo.builtin import BUILTIN_DIGITS_DIR
from treegrpo.rewards import build_reward
from treegrpo.rewards.digits import DIGIT_WORDS, DigitTypicality, pixels_to_images, upsample_digits


@pytest.fixture(scope="module")
def real():
    data = np.load(BUILTIN_DIGITS_DIR / "reference.npz")
    assert data["images"].shape == (1797, 8, 8) and data["images"].max() == 16
    return upsample_digits(data["images"], 16), torch.as_tensor(data["labels"].astype(np.int64))


def test_thresholds_are_the_99th_percentile_of_leave_one_out_neighbour_distances(real):
    pixels, labels = real
    typicality = DigitTypicality()
    for digit in (0, 4, 7):
        flat = pixels[labels == digit].flatten(1).double()
        nearest = []
        for i in range(len(flat)):  # written out: each real digit against every other of its class
            others = torch.cat([flat[:i], flat[i + 1:]])
            nearest.append(float(((others - flat[i]) ** 2).sum(1).sqrt().min()))
        assert float(typicality.thresholds[digit]) == pytest.approx(float(np.quantile(nearest, 0.99)), rel=1e-5)
        above = int(np.sum(np.array(nearest) > float(typicality.thresholds[digit])))
        assert 1 <= above <= 0.01 * len(nearest) + 1  # about 99 % of real digits pass when scored against the others


def test_strict_scores_are_the_judge_scores_of_typical_digits_and_zero_otherwise(real):
    pixels, labels = real
    generator = torch.Generator().manual_seed(0)
    chosen = torch.randperm(len(labels), generator=generator)[:20]
    blob = torch.ones(4, 1, 16, 16)
    blob[:, :, 3:13, 4:12] = 0.0  # a dark rectangle: no real digit looks like it
    images = pixels_to_images(torch.cat([pixels[chosen], blob]))
    prompts = [f"a handwritten digit {DIGIT_WORDS[int(d)]}" for d in labels[chosen]] + ["a handwritten digit four"] * 4
    lenient = build_reward("digits", classifier="judge")
    strict = build_reward("digits", classifier="judge", strict=True)
    plain_scores, plain_accuracy = lenient.score_and_accuracy(images, prompts)
    scores, accuracy = strict.score_and_accuracy(images, prompts)
    torch.testing.assert_close(scores[:20], plain_scores[:20])  # real digits: distance 0 to themselves
    assert torch.equal(scores[20:], torch.zeros(4))
    real_correct = (plain_scores[:20] > 0).sum()  # every real digit is typical, so only the blobs are lost
    judged = lenient.probabilities(images).argmax(-1) == torch.cat([labels[chosen], torch.full((4,), 4)])
    assert accuracy == pytest.approx(float(judged[:20].sum()) / 24)
    assert plain_accuracy == pytest.approx(float(judged.float().mean()))
    assert real_correct == 20


def test_strict_must_be_a_boolean():
    with pytest.raises(ValueError, match="strict must be true or false, got 'false'"):
        build_reward("digits", strict="false")
