"""PickScore, CLIPScore and the aesthetic predictor on an arranged tiny CLIP where the prompt "red" and a flat red
image embed to the same direction (see conftest): cos = 1 for a matching pair, and the mismatched pair's cosine is
cos(LN(red feature), LN(blue feature)), computed here independently."""

import pytest
import torch
import torch.nn.functional as F

from treegrpo.rewards import build_reward
from treegrpo.rewards.base import ScoreMLP


@pytest.fixture(scope="module")
def unit_color(tiny):
    """``unit_color(name)``: the arranged CLIP's unit embedding of a flat image (or the prompt) of colour name."""

    def embed(name: str) -> torch.Tensor:
        embedding = F.layer_norm(tiny.color_feature(tiny.COLORS[name]), (tiny.HIDDEN,))
        return embedding / embedding.norm()

    return embed


@pytest.fixture(scope="module")
def mismatch_cos(unit_color) -> float:
    return float(unit_color("red") @ unit_color("blue"))


def test_arranged_pairs_are_far_apart(mismatch_cos):
    assert mismatch_cos < 0  # red and blue features point in roughly opposite directions after LN


def test_clipscore_is_the_cosine(arranged_clip_dir, color_pairs, mismatch_cos):
    scores = build_reward("clipscore", pretrained=arranged_clip_dir)(*color_pairs)
    expected = torch.tensor([1.0, mismatch_cos, mismatch_cos, 1.0])
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-4)


def test_clipscore_scale_and_clamp(arranged_clip_dir, color_pairs):
    raw = build_reward("clipscore", pretrained=arranged_clip_dir)(*color_pairs)
    flow_grpo = build_reward("clipscore", pretrained=arranged_clip_dir, scale=100 / 30)(*color_pairs)
    torchmetrics = build_reward("clipscore", pretrained=arranged_clip_dir, scale=100.0, clamp=True)(*color_pairs)
    torch.testing.assert_close(flow_grpo, raw * 100 / 30)
    torch.testing.assert_close(torchmetrics, (100 * raw).clamp(min=0))
    assert torchmetrics[1] == 0  # the negative mismatched cosine is clamped


@pytest.mark.parametrize("bad", [{"scale": 0}, {"scale": "x"}, {"scale": float("nan")}, {"clamp": "yes"}])
def test_clipscore_rejects_bad_options(arranged_clip_dir, bad):
    with pytest.raises(ValueError, match="clipscore"):
        build_reward("clipscore", pretrained=arranged_clip_dir, **bad)


def test_pickscore_scales(arranged_clip_dir, color_pairs, mismatch_cos):
    from transformers import CLIPModel

    logit_scale = CLIPModel.from_pretrained(arranged_clip_dir).logit_scale.exp().item()
    options = dict(pretrained=arranged_clip_dir, processor=arranged_clip_dir)
    raw = build_reward("pickscore", **options)(*color_pairs)
    torch.testing.assert_close(
        raw, logit_scale * torch.tensor([1.0, mismatch_cos, mismatch_cos, 1.0]), atol=1e-3, rtol=0
    )
    assert raw[0] > raw[1] and raw[3] > raw[2]  # each prompt's own image wins
    torch.testing.assert_close(build_reward("pickscore", scale="flow_grpo", **options)(*color_pairs), raw / 26)
    torch.testing.assert_close(build_reward("pickscore", scale="mixgrpo", **options)(*color_pairs), (raw - 18) / 8)
    with pytest.raises(ValueError, match="flow_grpo"):
        build_reward("pickscore", scale="raw/26", **options)


def test_prompts_are_encoded_once_per_distinct_prompt(arranged_clip_dir, color_pairs):
    """Trees score many images of one prompt; the text tower runs once per distinct prompt."""
    reward = build_reward("clipscore", pretrained=arranged_clip_dir).load()
    calls = []
    handle = reward._model.text_model.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        images, prompts = color_pairs
        reward(images * 4, prompts * 4)  # 16 images, 2 distinct prompts
    finally:
        handle.remove()
    assert len(calls) == 1  # one batch holding both distinct prompts


def test_aesthetic_is_the_head_on_the_unit_embedding(
    tiny, arranged_clip_dir, color_pairs, tmp_path, unit_color, mismatch_cos
):
    """A head that reads the unit embedding along red's direction scores red 1 and blue cos(red, blue)."""
    head = ScoreMLP(tiny.HIDDEN)
    with torch.no_grad():
        for layer in head.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
                layer.weight[0, 0] = 1.0
        head.layers[0].weight[0] = unit_color("red")
    torch.save(head.state_dict(), tmp_path / "aesthetic-model.pth")
    reward = build_reward("aesthetic", pretrained=str(tmp_path), clip_pretrained=arranged_clip_dir)
    scores = reward(*color_pairs)
    torch.testing.assert_close(scores, torch.tensor([1.0, mismatch_cos, 1.0, mismatch_cos]), rtol=0, atol=1e-4)
    # the prompt is ignored; a direct file path works too
    file_reward = build_reward(
        "aesthetic", pretrained=str(tmp_path / "aesthetic-model.pth"), clip_pretrained=arranged_clip_dir
    )
    torch.testing.assert_close(file_reward(color_pairs[0], ["x"] * 4), scores)


def test_aesthetic_head_must_match_exactly(tiny, arranged_clip_dir, tmp_path):
    state = ScoreMLP(tiny.HIDDEN).state_dict()
    del state["layers.4.bias"]
    state["layers.5.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "aesthetic-model.pth")
    reward = build_reward("aesthetic", pretrained=str(tmp_path), clip_pretrained=arranged_clip_dir)
    with pytest.raises(ValueError, match=r"missing keys \(1\): layers\.4\.bias.*unexpected keys \(1\): layers\.5"):
        reward.load()
