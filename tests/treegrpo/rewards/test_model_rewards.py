"""Properties every model reward shares, on tiny random checkpoints in their real layouts, loaded from folders
through the same code path as hub ids."""

import pytest
import torch

from treegrpo.rewards import RewardBase, build_reward

MODEL_KINDS = ["pickscore", "clipscore", "hpsv2", "imagereward", "aesthetic"]
PROMPTS = ["a photo of a cat", "a red square", "a photo of a cat", "a blue dog", "green", "a photo of a dog"]


@pytest.fixture(scope="module")
def loaded(reward_paths):
    """One loaded reward of each kind, shared by the tests of this module."""
    return {kind: build_reward(kind, **reward_paths[kind]).load() for kind in MODEL_KINDS}


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_scores_are_float32_vector_on_cpu(loaded, kind, noise_images):
    reward = loaded[kind]
    scores = reward(noise_images(len(PROMPTS)), PROMPTS)
    assert isinstance(reward, RewardBase) and reward.name == kind
    assert scores.shape == (len(PROMPTS),) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.isfinite(scores).all() and not scores.requires_grad
    assert scores.std() > 0  # random weights still tell the inputs apart


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_deterministic_across_calls_and_loads(loaded, reward_paths, kind, noise_images):
    images = noise_images(4, seed=1)
    first = loaded[kind](images, PROMPTS[:4])
    torch.testing.assert_close(loaded[kind](images, PROMPTS[:4]), first, rtol=0, atol=0)
    torch.testing.assert_close(build_reward(kind, **reward_paths[kind])(images, PROMPTS[:4]), first, rtol=0, atol=0)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_batch_size_does_not_change_scores(reward_paths, kind, noise_images):
    images = noise_images(len(PROMPTS), seed=2)
    one = build_reward(kind, batch_size=1, **reward_paths[kind])(images, PROMPTS)
    four = build_reward(kind, batch_size=4, **reward_paths[kind])(images, PROMPTS)
    torch.testing.assert_close(one, four, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_each_image_scores_independently_of_its_batch(loaded, kind, noise_images):
    images = noise_images(3, seed=3)
    together = loaded[kind](images, PROMPTS[:3])
    alone = torch.cat([loaded[kind]([image], [prompt]) for image, prompt in zip(images, PROMPTS[:3], strict=True)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_models_are_frozen_and_in_eval_mode(loaded, kind):
    modules = [m for m in vars(loaded[kind]).values() if isinstance(m, torch.nn.Module)]
    assert modules
    for module in modules:
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_loading_is_lazy(tmp_path, reward_paths, kind):
    options = {**reward_paths[kind], "pretrained": str(tmp_path / "missing")}
    reward = build_reward(kind, **options)  # nothing is read yet
    with pytest.raises((OSError, ValueError)):
        reward.load()


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_input_errors(loaded, kind, noise_images):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        loaded[kind](noise_images(2), ["a cat"])
    with pytest.raises(TypeError, match="to_pil"):
        loaded[kind](torch.rand(2, 3, 8, 8), ["a", "b"])
    assert loaded[kind]([], []).shape == (0,)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_bfloat16_weights_give_float32_scores_close_to_float32(loaded, reward_paths, kind, noise_images):
    images = noise_images(3, seed=4)
    reward = build_reward(kind, dtype="bfloat16", **reward_paths[kind])
    scores = reward(images, PROMPTS[:3])
    assert scores.dtype == torch.float32
    heads = {id(getattr(reward, "_mlp", None))}  # the small score heads stay float32 by design
    modules = [m for m in vars(reward).values() if isinstance(m, torch.nn.Module) and id(m) not in heads]
    assert all(p.dtype == torch.bfloat16 for m in modules for p in m.parameters())
    reference = loaded[kind](images, PROMPTS[:3])
    torch.testing.assert_close(scores, reference, rtol=0.05, atol=0.05 * float(reference.abs().max()))


@pytest.mark.parametrize("kind", [*MODEL_KINDS, "digits"])
def test_modules_lists_every_parameter_the_reward_holds(reward_paths, kind):
    """`modules()` is what `model.offload_rewards` moves: none before the lazy load, and after it every parameter
    tensor the reward holds (found here by walking its attributes, which the trainer no longer does)."""
    reward = build_reward(kind, **reward_paths.get(kind, {}))
    assert reward.modules() == []
    reward.load()
    held = {id(p) for value in vars(reward).values() if isinstance(value, torch.nn.Module)
            for p in value.parameters()}
    declared = {id(p) for module in reward.modules() for p in module.parameters()}
    assert held and declared == held
