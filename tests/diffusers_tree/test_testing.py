import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from diffusers_tree.adapters import stock_call_kwargs  # noqa: E402
from diffusers_tree.testing import TINY_PIPELINES, tiny_tokenizer  # noqa: E402

PROMPTS = ["a red cat", "a blue dog"]

# builder, extra call kwargs (each pipeline samples with its own default guidance)
FAMILIES = TINY_PIPELINES


def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def test_tiny_tokenizer_vocab():
    tok = tiny_tokenizer()
    assert [tok.convert_tokens_to_ids(t) for t in ["<s>", "<pad>", "</s>", "<unk>"]] == [0, 1, 2, 3]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.model_max_length == 77
    ids = tok("a red cat xyzzy").input_ids
    assert len(ids) == 4 and ids[-1] == tok.unk_token_id and min(ids[:3]) > 3
    for word in ["photo", "of", "dog", "blue", "zero", "nine"]:
        assert tok.convert_tokens_to_ids(word) > 3

    custom = tiny_tokenizer(["hello", "world"], model_max_length=8)
    assert custom("hello world")["input_ids"] == [4, 5]
    assert len(custom) == 6 and custom.model_max_length == 8
    padded = custom("hello", padding="max_length", max_length=8, truncation=True).input_ids
    assert padded == [4] + [1] * 7


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_pipeline_generates(family):
    build, kwargs = FAMILIES[family]
    pipe = build(seed=0)
    for name, module in _modules(pipe).items():
        assert not module.training, name
        assert all(p.dtype == torch.float32 for p in module.parameters()), name
    generator = torch.Generator().manual_seed(0)
    kwargs = stock_call_kwargs(pipe, kwargs)  # SANA: at 32×32, not binned to 512×512
    images = pipe(
        prompt=list(PROMPTS), num_inference_steps=4, height=32, width=32, output_type="pt", generator=generator,
        **kwargs,
    )[0]  # `.images`, or a video pipeline's `.frames`
    frames = (kwargs["num_frames"],) if "num_frames" in kwargs else ()  # video families: [B, F, 3, H, W]
    assert images.shape == (2, *frames, 3, 32, 32)
    assert torch.isfinite(images).all()

    again = pipe(
        prompt=list(PROMPTS),
        num_inference_steps=4,
        height=32,
        width=32,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )[0]
    torch.testing.assert_close(images, again)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_seed_same_weights(family):
    build, _ = FAMILIES[family]
    state = torch.random.get_rng_state()
    first, second, other = _modules(build(seed=0)), _modules(build(seed=0)), _modules(build(seed=1))
    assert torch.equal(torch.random.get_rng_state(), state), "building must not disturb the global RNG"
    assert first.keys() == second.keys() == other.keys()
    differs = False
    for name in first:
        a, b, c = first[name].state_dict(), second[name].state_dict(), other[name].state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"
            differs = differs or not torch.equal(a[key], c[key])
    assert differs, "a different seed should give different weights"
