"""HPS v2.1: an open_clip-format checkpoint (original key names, fp16, under "state_dict") converted into a
transformers CLIPModel at load time."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from treegrpo.rewards import build_reward
from treegrpo.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from treegrpo.rewards.hpsv2 import hps_pixels, open_clip_to_transformers


def hps(folder, **options):
    return build_reward("hpsv2", pretrained=folder, processor=folder, clip_config=folder, **options)


def test_conversion_round_trips_every_tensor(tiny):
    model, _ = tiny.tiny_clip()
    converted = open_clip_to_transformers(tiny.clip_to_open_clip(model), model.config)
    expected = model.state_dict()
    assert converted.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(converted[key], tensor, rtol=0, atol=0, msg=key)


def test_own_image_scores_highest(arranged_hps_dir, color_pairs, tiny):
    features = [F.layer_norm(tiny.color_feature(tiny.COLORS[c]), (tiny.HIDDEN,)) for c in ("red", "blue")]
    mismatch = float(F.cosine_similarity(features[0], features[1], dim=0))
    scores = hps(arranged_hps_dir)(*color_pairs)  # cosine, no logit scale
    torch.testing.assert_close(scores, torch.tensor([1.0, mismatch, mismatch, 1.0]), rtol=0, atol=1e-3)


def test_matches_clipscore_of_the_same_weights_on_model_sized_images(hps_dir, clip_dir, noise_images, tiny):
    """At the model's own resolution both preprocessings are the identity, so HPS is the CLIP cosine of the same
    weights (up to the checkpoint's fp16 rounding)."""
    images, prompts = noise_images(4, size=tiny.IMAGE_SIZE), ["a cat", "red", "a photo of a dog", "blue square"]
    torch.testing.assert_close(
        hps(hps_dir)(images, prompts),
        build_reward("clipscore", pretrained=clip_dir)(images, prompts),
        rtol=0,
        atol=5e-3,
    )


def test_preprocessing_scales_the_longest_side_and_pads_on_black():
    image = Image.new("RGB", (20, 10), (255, 255, 255))  # width 20, height 10 → 16 x 8, centred vertically
    pixels = hps_pixels([image], 16)[0]  # [3, 16, 16]
    mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None], torch.tensor(OPENAI_CLIP_STD)[:, None]
    black, white = ((0 - mean) / std)[..., None], ((1 - mean) / std)[..., None]  # [3, 1, 1]
    assert pixels.shape == (3, 16, 16)
    torch.testing.assert_close(pixels[:, :4], black.expand(3, 4, 16))  # pad rows: (16 - 8) // 2 = 4 on top
    torch.testing.assert_close(pixels[:, 12:], black.expand(3, 4, 16))  # and 4 below
    torch.testing.assert_close(pixels[:, 4:12], white.expand(3, 8, 16))


def _write(folder, tiny, state_dict):
    model, tokenizer = tiny.tiny_clip()
    return tiny.save_hps(folder, model, tokenizer, state_dict)


def test_missing_key_fails_loudly(tmp_path, tiny):
    model, _ = tiny.tiny_clip()
    state_dict = tiny.clip_to_open_clip(model)
    del state_dict["visual.proj"], state_dict["transformer.resblocks.1.attn.in_proj_weight"]
    with pytest.raises(
        ValueError, match=r"missing keys \['transformer.resblocks.1.attn.in_proj_weight', 'visual.proj'\]"
    ):
        hps(_write(tmp_path, tiny, state_dict)).load()


def test_unexpected_key_fails_loudly(tmp_path, tiny):
    model, _ = tiny.tiny_clip()
    state_dict = tiny.clip_to_open_clip(model)
    state_dict["visual.transformer.resblocks.2.ln_1.weight"] = torch.ones(tiny.HIDDEN)  # a third layer
    with pytest.raises(ValueError, match=r"unexpected keys \['visual.transformer.resblocks.2.ln_1.weight'\]"):
        hps(_write(tmp_path, tiny, state_dict)).load()


def test_ddp_prefix_and_causal_mask_buffer_are_accepted(tmp_path, tiny, hps_dir, noise_images):
    model, _ = tiny.tiny_clip()
    state_dict = {"module." + k: v for k, v in tiny.clip_to_open_clip(model).items()}
    state_dict["module.attn_mask"] = torch.full((77, 77), float("-inf")).triu(1)
    images, prompts = noise_images(2), ["a cat", "a dog"]
    torch.testing.assert_close(hps(_write(tmp_path, tiny, state_dict))(images, prompts), hps(hps_dir)(images, prompts))


def test_wrong_shape_fails_loudly(tmp_path, tiny):
    model, _ = tiny.tiny_clip()
    state_dict = tiny.clip_to_open_clip(model)
    state_dict["visual.proj"] = torch.zeros(tiny.HIDDEN, 16)
    with pytest.raises(ValueError, match=r"shape mismatches.*visual_projection.weight"):
        hps(_write(tmp_path, tiny, state_dict)).load()


def test_version_picks_the_checkpoint_file(hps_dir):
    with pytest.raises(FileNotFoundError, match="HPS_v2_compressed.pt"):
        hps(hps_dir, version="v2.0").load()
    with pytest.raises(ValueError, match="v2.1"):
        hps(hps_dir, version="v3")


def test_default_architecture_is_vit_h14():
    from treegrpo.rewards.hpsv2 import vit_h14_config

    config = vit_h14_config()
    vision, text = config.vision_config, config.text_config
    assert config.projection_dim == vision.projection_dim == text.projection_dim == 1024
    assert (vision.num_hidden_layers, vision.hidden_size, vision.num_attention_heads) == (32, 1280, 16)
    assert (vision.patch_size, vision.image_size) == (14, 224)
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads) == (24, 1024, 16)
    assert text.max_position_embeddings == 77
    assert vision.hidden_act == text.hidden_act == "gelu" and vision.layer_norm_eps == text.layer_norm_eps == 1e-5
    assert text.eos_token_id == 49407  # pool at the end-of-text token, as open_clip's argmax does
