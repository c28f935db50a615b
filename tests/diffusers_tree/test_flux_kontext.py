"""FLUX.1 Kontext (editing): the tree conditioned on a source image equals the stock FluxKontextPipeline with
TreeSDEScheduler swapped in, the source tokens cost no rows, and the record re-scores to ratio 1."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from diffusers_tree import TreeRolloutPipeline, TreeSDEScheduler, unique_rows  # noqa: E402
from diffusers_tree.adapters import adapter_for  # noqa: E402
from diffusers_tree.search import count_rows  # noqa: E402
from diffusers_tree.testing import rescoring_ratio_error, tiny_flux_kontext_pipeline, tiny_flux_pipeline  # noqa: E402

PROMPTS = ["make the circle blue", "turn the square into a red triangle on a white background"]
SIZE = {"height": 32, "width": 32}
KWARGS = {"max_sequence_length": 16}


def source(seed: int, width: int = 32, height: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def kontext(dtype=torch.float32, **tree_kwargs) -> tuple:
    pipe = tiny_flux_kontext_pipeline().to(dtype)
    return pipe, TreeRolloutPipeline.from_pipe(pipe, **tree_kwargs)


@pytest.mark.parametrize("dtype,s", [(torch.float32, 0), (torch.float32, 2), (torch.bfloat16, 1)])
@pytest.mark.parametrize("source_size", [(32, 32), (48, 32)])  # the source's tokens need not match the target's
def test_leaves_equal_stock_kontext_pipeline_with_tree_scheduler(dtype, s, source_size):
    pipe, tree = kontext(dtype, branch_factor=2, window_width=2, window_start=s)
    k, w, T = 2, 2, 6
    image = source(0, *source_size)
    roots = tree.prepare_roots(len(PROMPTS), 32, 32, torch.Generator().manual_seed(5), dtype)
    conditioning = tree.encode(PROMPTS, image=image, auto_resize=False, **SIZE, **KWARGS)
    out = tree(PROMPTS, num_inference_steps=T, latents=roots, conditioning=conditioning, output_type="latent",
               generator=torch.Generator().manual_seed(11), max_batch_size=6)
    pipe.scheduler = TreeSDEScheduler.from_scheduler(pipe.scheduler, branch_factor=k, window_width=w,
                                                     window_start=s).manual_seed(11)
    stock = pipe(image=image, prompt=list(PROMPTS), num_images_per_prompt=k**w, num_inference_steps=T,
                 latents=roots.repeat_interleave(k**w, dim=0), output_type="latent", _auto_resize=False,
                 max_area=32 * 32, **SIZE, **KWARGS).images  # the stock target size is rescaled to max_area
    assert stock.shape == out.images.shape
    torch.testing.assert_close(out.images, stock, rtol=1e-4, atol=1e-4)


def test_the_source_changes_the_leaves_and_each_prompt_has_its_own():
    _, tree = kontext(branch_factor=2, window_width=1, window_start=0)
    roots = tree.prepare_roots(2, 32, 32, torch.Generator().manual_seed(0), torch.float32)

    def leaves(image):
        cond = tree.encode(PROMPTS, image=image, auto_resize=False, **SIZE, **KWARGS)
        return tree(PROMPTS, num_inference_steps=4, latents=roots, conditioning=cond,
                    generator=torch.Generator().manual_seed(1), output_type="latent").images

    text_only, one, per_prompt = leaves(None), leaves(source(0)), leaves([source(0), source(1)])
    assert not torch.allclose(text_only, one)
    torch.testing.assert_close(per_prompt[:2], one[:2])  # prompt 0 has the same source in both calls
    assert not torch.allclose(per_prompt[2:], one[2:])  # prompt 1's differs


def test_source_tokens_cost_no_rows_and_the_record_rescores_to_ratio_one():
    _, tree = kontext(branch_factor=3, window_width=2, window_start=1)
    cond = tree.encode(PROMPTS, image=[source(0), source(1)], auto_resize=False, **SIZE, **KWARGS)
    with count_rows(tree.denoiser) as counter:
        out = tree(PROMPTS, num_inference_steps=6, conditioning=cond, generator=torch.Generator().manual_seed(0),
                   output_type="latent")
    assert counter.rows == out.rows == len(PROMPTS) * unique_rows(6, 3, 2, 1)
    # the record stores noisy latents only: the source tokens are conditioning, re-attached at every forward
    assert out.record.parent_latents.shape[1:] == out.images.shape[1:]
    assert cond.cond["source_latents"].shape[0] == len(PROMPTS)
    assert rescoring_ratio_error(tree, out.record, cond) < 1e-4


def test_auto_resize_takes_kontexts_resolution_nearest_the_aspect_ratio():
    _, tree = kontext(branch_factor=2, window_width=1)
    pixels = tree.adapter.source_pixels([source(0, 64, 32)], auto_resize=True, dtype=torch.float32)
    # a 2:1 source becomes the stock list's (width, height) nearest 2:1, floored to a multiple of 16
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    width, height = min(PREFERRED_KONTEXT_RESOLUTIONS, key=lambda wh: abs(2 - wh[0] / wh[1]))
    assert tuple(pixels.shape[-2:]) == (height // 16 * 16, width // 16 * 16)


def test_bad_sources_are_one_clear_error():
    _, tree = kontext(branch_factor=2, window_width=1)
    with pytest.raises(ValueError, match="3 source images for 2 prompts"):
        tree.encode(PROMPTS, image=[source(0)] * 3, **SIZE, **KWARGS)
    with pytest.raises(ValueError, match=r"source image 1 becomes 48x32 pixels but image 0 32x32"):
        tree.encode(PROMPTS, image=[source(0), source(1, 48)], auto_resize=False, **SIZE, **KWARGS)
    text_only = TreeRolloutPipeline.from_pipe(tiny_flux_pipeline(), branch_factor=2, window_width=1)
    with pytest.raises(ValueError, match="FluxPipeline takes no source image; pipelines that take one: "
                                         "Flux2Pipeline, Flux2KleinPipeline, FluxKontextPipeline, "
                                         "QwenImageEditPipeline"):
        text_only.encode(PROMPTS, image=source(0), **SIZE, **KWARGS)
    assert adapter_for(tiny_flux_kontext_pipeline()).hub_task == "image-to-image"
