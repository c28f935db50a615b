"""Smoke test with the real reward weights (GPU only; skipped without CUDA, and skipped when the weights can be
neither downloaded nor found in the hub cache).

Two real photos ship inside scikit-learn (a temple, a flower). Each reward must land in its usual range on them, and
the text-conditioned rewards must prefer each photo's own caption to the other photo's.
"""

import pytest
import torch

from treegrpo.rewards import build_reward

pytestmark = pytest.mark.gpu

PROMPTS = ["a photo of a chinese temple with trees in front of it", "a close-up photo of a pink flower"]
# kind: (options, lowest, highest) -- the typical ranges, widened a little for two photos
RANGES = {
    "pickscore": ({}, 15.0, 26.0),  # raw, typically 18–24
    "hpsv2": ({}, 0.15, 0.40),  # typically 0.2–0.4
    "imagereward": ({}, -3.0, 3.0),  # ≈ N(0, 1)
    "aesthetic": ({}, 3.0, 8.0),  # typically 4–7
    "clipscore": ({}, 0.15, 0.45),  # raw cosine, typically 0.2–0.4
}
TEXT_CONDITIONED = ("pickscore", "hpsv2", "imagereward", "clipscore")


@pytest.fixture(scope="module")
def photos():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    datasets = pytest.importorskip("sklearn.datasets")
    from PIL import Image

    return [Image.fromarray(image) for image in datasets.load_sample_images().images]  # temple, flower


@pytest.mark.parametrize("kind", list(RANGES))
def test_real_weights_score_in_range(photos, kind):
    options, lowest, highest = RANGES[kind]
    reward = build_reward(kind, device="cuda", dtype=torch.float32, **options)
    try:
        reward.load()
    except OSError as error:  # offline and not cached; conversion errors (ValueError) must fail the test
        pytest.skip(f"real {kind} weights unavailable: {error}")
    scores = reward(photos, PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    assert ((scores >= lowest) & (scores <= highest)).all(), scores
    if kind in TEXT_CONDITIONED:
        swapped = reward(photos, PROMPTS[::-1])
        assert (scores > swapped).all(), (scores, swapped)
    half = build_reward(kind, device="cuda", dtype=torch.bfloat16, **options)(photos, PROMPTS)
    torch.testing.assert_close(half, scores, rtol=0.05, atol=0.05 * float(scores.abs().max()))
