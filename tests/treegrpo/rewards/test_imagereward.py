"""ImageReward: the released layout (ImageReward.pt with BLIP's ViT / med.py BERT / MLP key names, plus
med_config.json) loaded into transformers' BlipVisionModel + BlipTextModel + the MLP head."""

import json

import pytest
import torch
import torch.nn.functional as F

from treegrpo.rewards import build_reward
from treegrpo.rewards.imagereward import REWARD_MEAN, REWARD_STD


def imagereward(folder, **options):
    return build_reward("imagereward", pretrained=folder, processor=folder, vision_config=folder, **options)


def test_own_image_scores_highest(arranged_imagereward_dir, color_pairs, tiny):
    """The arranged model's [CLS] state is LN(e_text + e_image): LN(e0) for a matching pair and LN(e0 + e1) for a
    mismatched one; the head reads −(h0 + h1), then ImageReward's standardization."""
    scores = imagereward(arranged_imagereward_dir)(*color_pairs)
    match, mismatch = (F.layer_norm(v, (tiny.HIDDEN,), eps=1e-12) for v in torch.eye(tiny.HIDDEN)[[0, 1]].cumsum(0))
    expected = [(-(state[0] + state[1]) - REWARD_MEAN) / REWARD_STD for state in (match, mismatch, mismatch, match)]
    torch.testing.assert_close(scores, torch.stack(expected), rtol=0, atol=1e-3)
    assert scores[0] > scores[1] and scores[3] > scores[2]


def test_prompt_is_truncated_to_35_tokens(imagereward_dir, noise_images):
    """[CLS] + 33 words + [SEP]: words past the 33rd do not change the score."""
    reward = imagereward(imagereward_dir)
    words = ["cat", "dog", "red"] * 20
    long, cut = " ".join(words), " ".join(words[:33])
    image = noise_images(1)
    torch.testing.assert_close(reward(image, [long]), reward(image, [cut]), rtol=0, atol=0)
    assert not torch.equal(reward(image, [cut]), reward(image, [" ".join(words[:32])]))


def _write(folder, tiny, state_dict):
    return tiny.save_imagereward(folder, state_dict, tiny.bert_tokenizer())


def test_missing_key_fails_loudly(tmp_path, tiny):
    state_dict = tiny.blip_to_imagereward(*tiny.tiny_blip())
    del state_dict["blip.text_encoder.encoder.layer.0.crossattention.self.value.weight"]
    with pytest.raises(
        ValueError, match=r"text encoder.*missing keys \(1\): encoder.layer.0.crossattention.self.value"
    ):
        imagereward(_write(tmp_path, tiny, state_dict)).load()


def test_missing_vision_key_fails_loudly(tmp_path, tiny):
    state_dict = tiny.blip_to_imagereward(*tiny.tiny_blip())
    del state_dict["blip.visual_encoder.blocks.1.attn.qkv.bias"]
    with pytest.raises(ValueError, match=r"vision tower.*missing keys \(1\): encoder.layers.1.self_attn.qkv.bias"):
        imagereward(_write(tmp_path, tiny, state_dict)).load()


@pytest.mark.parametrize("key", ["blip.itm_head.weight", "blip.visual_encoder.blocks.0.attn.rel_pos", "head.weight"])
def test_unexpected_key_fails_loudly(tmp_path, tiny, key):
    state_dict = tiny.blip_to_imagereward(*tiny.tiny_blip())
    state_dict[key] = torch.zeros(2)
    with pytest.raises(ValueError, match=f"unexpected keys.*{key}"):
        imagereward(_write(tmp_path, tiny, state_dict)).load()


def test_med_config_must_enable_cross_attention(tmp_path, tiny):
    folder = _write(tmp_path, tiny, tiny.blip_to_imagereward(*tiny.tiny_blip()))
    (tmp_path / "med_config.json").write_text(json.dumps({**tiny.MED_CONFIG, "add_cross_attention": False}))
    with pytest.raises(ValueError, match="add_cross_attention"):
        imagereward(folder).load()


def test_default_vision_tower_is_blip_vit_large():
    from transformers import BlipVisionConfig

    from treegrpo.rewards.imagereward import blip_large_vision_config

    config = BlipVisionConfig(**blip_large_vision_config())
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1024, 24, 16)
    assert (config.patch_size, config.image_size, config.layer_norm_eps) == (16, 224, 1e-6)
