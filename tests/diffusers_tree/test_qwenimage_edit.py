"""Qwen-Image-Edit: the tree conditioned on a source image equals the stock QwenImageEditPipeline with
TreeSDEScheduler swapped in (with and without true CFG), the source is seen by the VL encoder and as latents, its
tokens cost no rows, and the record re-scores to ratio 1."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from diffusers_tree import TreeRolloutPipeline, TreeSDEScheduler, unique_rows  # noqa: E402
from diffusers_tree.testing import rescoring_ratio_error, tiny_qwenimage_edit_pipeline  # noqa: E402

PROMPTS = ["make the circle blue", "turn the square into a red triangle on a white background"]
SIZE = {"height": 32, "width": 32}


def source(seed: int, width: int = 32, height: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe():
    return tiny_qwenimage_edit_pipeline()


@pytest.mark.parametrize("dtype,s,prompt,cfg", [(torch.float32, 0, 0, False), (torch.float32, 2, 1, True),
                                                (torch.bfloat16, 1, 1, False)])
def test_leaves_equal_stock_edit_pipeline_with_tree_scheduler(pipe, dtype, s, prompt, cfg):
    """One prompt per stock call (a stock batch of several prompts tiles the sources in the wrong order); the
    source 48x32 (its own aspect ratio: resized to 1248x832 for the VAE and the VL encoder, as the stock does)."""
    pipe = pipe.to(dtype)
    try:
        k, w, T = 2, 2, 5
        image = source(prompt, 48, 32)
        tree = TreeRolloutPipeline.from_pipe(pipe, branch_factor=k, window_width=w, window_start=s)
        roots = tree.prepare_roots(1, 32, 32, torch.Generator().manual_seed(5), dtype)
        guidance = {"guidance_scale": 4.0, "negative_prompt": "blurry"} if cfg else {}
        conditioning = tree.encode([PROMPTS[prompt]], image=image, **guidance, **SIZE)
        out = tree([PROMPTS[prompt]], num_inference_steps=T, latents=roots, conditioning=conditioning,
                   output_type="latent", generator=torch.Generator().manual_seed(11), max_batch_size=6)
        assert out.rows == (2 if cfg else 1) * unique_rows(T, k, w, s)  # the source's tokens are no rows
        original = pipe.scheduler
        pipe.scheduler = TreeSDEScheduler.from_scheduler(original, branch_factor=k, window_width=w,
                                                         window_start=s).manual_seed(11)
        stock_guidance = {"true_cfg_scale": 4.0, "negative_prompt": "blurry"} if cfg else {}
        stock = pipe(image=image, prompt=PROMPTS[prompt], num_images_per_prompt=k**w, num_inference_steps=T,
                     latents=roots.repeat_interleave(k**w, dim=0), output_type="latent", **stock_guidance,
                     **SIZE).images
        pipe.scheduler = original
        assert stock.shape == out.images.shape
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.images.float(), stock.float(), rtol=tolerance, atol=tolerance)
    finally:
        pipe.to(torch.float32)


def test_the_source_reaches_text_and_latents_and_rescores_to_ratio_one(pipe):
    tree = TreeRolloutPipeline.from_pipe(pipe, branch_factor=2, window_width=2, window_start=0)
    one = tree.encode(PROMPTS, image=source(0), **SIZE)
    other = tree.encode(PROMPTS, image=[source(0), source(1)], **SIZE)
    # prompt 0 keeps its source, prompt 1 gets another: its embeddings (the VL encoder saw it) and latents change
    for key in ("encoder_hidden_states", "source_latents"):
        torch.testing.assert_close(one.cond[key][0], other.cond[key][0])
        assert not torch.allclose(one.cond[key][1], other.cond[key][1])
    assert one.cond["source_latents"].shape == (2, 64 * 64, 16)  # 1024² pixels / 8 / 2, 2×2 patches of 4 channels
    out = tree(PROMPTS, num_inference_steps=4, conditioning=other, generator=torch.Generator().manual_seed(0),
               output_type="latent")
    assert out.record.log_prob is not None
    assert rescoring_ratio_error(tree, out.record, other) < 1e-5


def test_one_line_errors(pipe):
    tree = TreeRolloutPipeline.from_pipe(pipe, branch_factor=2, window_width=1)
    with pytest.raises(ValueError, match="edits a source image: pass image="):
        tree.encode(PROMPTS, **SIZE)
    with pytest.raises(ValueError, match="3 source images for 2 prompts"):
        tree.encode(PROMPTS, image=[source(0)] * 3, **SIZE)
    with pytest.raises(ValueError, match="must share their number and aspect ratios"):
        tree.encode(PROMPTS, image=[source(0), source(1, 64, 32)], **SIZE)
    with pytest.raises(ValueError, match="exceed max_sequence_length=8"):
        tree.encode(PROMPTS, image=source(0), max_sequence_length=8, **SIZE)


@pytest.fixture(scope="module")
def plus():
    from diffusers_tree.testing import tiny_qwenimage_edit_plus_pipeline

    return tiny_qwenimage_edit_plus_pipeline()


@pytest.mark.parametrize("sources,s,cfg", [(1, 0, False), (2, 1, True)])
def test_plus_leaves_equal_stock_pipeline_with_one_or_two_sources(plus, sources, s, cfg):
    """Qwen-Image-Edit-Plus (2509/2511): one or two sources of different aspect ratios, the VL encoder seeing each at
    about 384² pixels and the VAE at 1024², one RoPE grid per source; the stock pipeline takes one prompt per call."""
    k, w, T = 2, 2, 4
    images = [source(3, 48, 32), source(4, 32, 64)][:sources]
    tree = TreeRolloutPipeline.from_pipe(plus, branch_factor=k, window_width=w, window_start=s)
    roots = tree.prepare_roots(1, 32, 32, torch.Generator().manual_seed(5), torch.float32)
    guidance = {"guidance_scale": 4.0, "negative_prompt": "blurry"} if cfg else {}
    conditioning = tree.encode([PROMPTS[1]], image=[images], **guidance, **SIZE)
    assert sum(1 for key in conditioning.shared if key.startswith("source_grid")) == sources
    out = tree([PROMPTS[1]], num_inference_steps=T, latents=roots, conditioning=conditioning, output_type="latent",
               generator=torch.Generator().manual_seed(11), max_batch_size=6)
    assert out.rows == (2 if cfg else 1) * unique_rows(T, k, w, s)
    assert rescoring_ratio_error(tree, out.record, conditioning) < 1e-5
    original = plus.scheduler
    plus.scheduler = TreeSDEScheduler.from_scheduler(original, branch_factor=k, window_width=w,
                                                     window_start=s).manual_seed(11)
    stock_guidance = {"true_cfg_scale": 4.0, "negative_prompt": "blurry"} if cfg else {}
    stock = plus(image=images, prompt=PROMPTS[1], num_images_per_prompt=k**w, num_inference_steps=T,
                 latents=roots.repeat_interleave(k**w, dim=0), output_type="latent", **stock_guidance, **SIZE).images
    plus.scheduler = original
    torch.testing.assert_close(out.images, stock, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"1 to 3 source images per prompt; got \[4\]"):
        tree.encode([PROMPTS[0]], image=[[source(0)] * 4], **SIZE)
