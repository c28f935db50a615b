"""FLUX.2 [dev] and [klein]: leaves equal the stock pipelines' with the tree scheduler swapped in, rows per node with
and without CFG, the guidance embedding, the tiny pipelines' conditioning and their save/load round trip.

The stock FLUX.2 pipelines take `latents=` unpacked ([N, 4·C, H/2, W/2]) while they step packed latents, and klein's
output_type="latent" is the VAE's latents: the adapter's `pipeline_latents` / `latent_output` convert."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402

from diffusers_tree import TreeRolloutPipeline, TreeSDEScheduler, unique_rows  # noqa: E402
from diffusers_tree.search import count_rows  # noqa: E402
from diffusers_tree.testing import TINY_PIPELINES  # noqa: E402

FAMILIES = {name: TINY_PIPELINES[name] for name in ("flux2", "flux2_klein")}
PROMPTS = ["a red cat", "a blue dog"]
SIZE = {"height": 32, "width": 32}


def rollout_pipe(family, **tree_kwargs):
    build, kwargs = FAMILIES[family]
    return TreeRolloutPipeline.from_pipe(build(), **tree_kwargs), kwargs


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("output_type", ["latent", "pt"])
def test_leaves_equal_stock_pipeline_with_tree_scheduler(family, output_type):
    """"pt" also checks decoding: un-pack, batch-norm de-normalisation, un-patchify, as the pipelines."""
    tree, kwargs = rollout_pipe(family, branch_factor=2, window_width=2, window_start=1)
    k, w, s, T = 2, 2, 1, 5
    roots = tree.prepare_roots(len(PROMPTS), 32, 32, torch.Generator().manual_seed(5), torch.float32)
    out = tree(PROMPTS, num_inference_steps=T, latents=roots, generator=torch.Generator().manual_seed(11),
               output_type=output_type, max_batch_size=6, **SIZE, **kwargs)
    leaves = out.images
    if output_type == "latent":
        leaves = tree.adapter.latent_output(leaves, tree.encode(PROMPTS, **SIZE, **kwargs))

    pipe = tree.pipe
    pipe.scheduler = TreeSDEScheduler.from_scheduler(pipe.scheduler, branch_factor=k, window_width=w,
                                                     window_start=s).manual_seed(11)
    stock_roots = tree.adapter.pipeline_latents(roots, **SIZE).repeat_interleave(k**w, dim=0)
    # both pipelines take `image` as their first positional argument: the prompt goes by keyword
    stock = pipe(prompt=PROMPTS, num_images_per_prompt=k**w, num_inference_steps=T, latents=stock_roots,
                 output_type=output_type, **SIZE, **kwargs).images
    assert stock.shape == leaves.shape
    torch.testing.assert_close(leaves, stock, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,guidance,cfg", [("flux2", 1.0, 1), ("flux2", 4.0, 1),  # distilled guidance
                                                 ("flux2_klein", 1.0, 1), ("flux2_klein", 4.0, 2)])  # true CFG
def test_rows_per_node(family, guidance, cfg):
    tree, kwargs = rollout_pipe(family, branch_factor=2, window_width=2, window_start=1)
    T = 4
    with count_rows(tree.denoiser) as counter:  # counted at the model
        out = tree(PROMPTS, num_inference_steps=T, guidance_scale=guidance, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **SIZE, **kwargs)
    assert counter.rows == out.rows == len(PROMPTS) * unique_rows(T, 2, 2, 1) * cfg


def test_distilled_klein_takes_no_cfg():
    tree, kwargs = rollout_pipe("flux2_klein")
    assert tree.encode(PROMPTS, guidance_scale=4.0, **SIZE, **kwargs).do_cfg
    tree.pipe.register_to_config(is_distilled=True)  # the step-distilled klein checkpoints
    assert not tree.encode(PROMPTS, guidance_scale=4.0, **SIZE, **kwargs).do_cfg


def test_klein_negative_prompt():
    tree, kwargs = rollout_pipe("flux2_klein")
    empty = tree.pipe.encode_prompt([""] * 2, **kwargs)[0]  # the pipeline's own negative
    default = tree.encode(PROMPTS, guidance_scale=4.0, **SIZE, **kwargs).uncond["encoder_hidden_states"]
    torch.testing.assert_close(default, empty, rtol=0, atol=0)
    given = tree.encode(PROMPTS, guidance_scale=4.0, negative_prompt="small", **SIZE, **kwargs)
    assert not torch.equal(given.uncond["encoder_hidden_states"], empty)


def test_dev_guidance_is_a_transformer_input():
    tree, kwargs = rollout_pipe("flux2")
    latents = tree.prepare_roots(2, 32, 32, torch.Generator().manual_seed(0), torch.float32)
    timestep = torch.full((2,), 500.0)
    outputs = []
    for guidance in (1.0, 4.0):
        cond = tree.encode(PROMPTS, guidance_scale=guidance, **SIZE, **kwargs)
        assert not cond.do_cfg
        outputs.append(tree.adapter.model_forward(latents, timestep, cond.cond, cond))
    assert not torch.allclose(*outputs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_conditioning_shapes_and_prompts_fit(family):
    """Each prompt survives the chat template within the tiny `max_sequence_length` (the embeddings differ), the
    stacked layers give 3 × the encoder width, and the 4D ids are shared: text [L, 4], image [8·8, 4]."""
    tree, kwargs = rollout_pipe(family)
    cond = tree.encode(PROMPTS, **SIZE, **kwargs)
    embeds = cond.cond["encoder_hidden_states"]
    length = kwargs["max_sequence_length"]
    assert embeds.shape == (2, length, 3 * tree.pipe.text_encoder.config.get_text_config().hidden_size)
    assert not torch.allclose(embeds[0], embeds[1])
    assert cond.shared["txt_ids"].shape == (length, 4) and cond.shared["img_ids"].shape == (64, 4)
    assert tree.adapter.pixels_per_patch == 4
    modules = dict(tree.denoiser.named_modules())
    for target in tree.adapter.lora_target_modules:  # peft matches name endings and wraps only Linear layers here
        matched = [module for name, module in modules.items() if name.endswith("." + target)]
        assert matched and all(isinstance(module, torch.nn.Linear) for module in matched), target


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_pipeline_round_trips_on_disk(family, tmp_path):
    build, kwargs = FAMILIES[family]
    pipe = build()
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is type(pipe)
    call = dict(prompt=PROMPTS[:1], num_inference_steps=2, output_type="pt", **SIZE, **kwargs)
    torch.testing.assert_close(loaded(generator=torch.Generator().manual_seed(0), **call).images,
                               pipe(generator=torch.Generator().manual_seed(0), **call).images, rtol=0, atol=0)


def test_klein_stock_call_guides_against_the_given_negative_prompt():
    """The stock klein pipeline takes no `negative_prompt`, so sample grids dropped it: stock_call_kwargs hands it
    the negative prompt's embeddings, the same ones the tree guides with."""
    from diffusers_tree.adapters import stock_call_kwargs

    tree, kwargs = rollout_pipe("flux2_klein")
    pipe = tree.pipe
    pipe.set_progress_bar_config(disable=True)
    given = tree.encode(PROMPTS, guidance_scale=4.0, negative_prompt="small", **SIZE, **kwargs)
    call = stock_call_kwargs(pipe, {"prompt": list(PROMPTS), "guidance_scale": 4.0, "negative_prompt": "small",
                                    **SIZE, **kwargs})
    assert "negative_prompt" not in call
    torch.testing.assert_close(call["negative_prompt_embeds"], given.uncond["encoder_hidden_states"], rtol=0, atol=0)
    images = {}
    for negative in (None, "small"):
        generator = torch.Generator().manual_seed(0)
        images[negative] = pipe(num_inference_steps=2, output_type="pt", generator=generator, **stock_call_kwargs(
            pipe, {"prompt": list(PROMPTS), "guidance_scale": 4.0, "negative_prompt": negative, **SIZE, **kwargs}
        )).images
    assert (images[None] - images["small"]).abs().max() > 1e-3
    # no CFG (guidance 1) or a step-distilled checkpoint: nothing to encode
    assert "negative_prompt_embeds" not in stock_call_kwargs(pipe, {"prompt": PROMPTS, "guidance_scale": 1.0,
                                                                    "negative_prompt": "small"})


def reference(seed: int, width: int = 32, height: int = 32):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("family,refs,s", [("flux2", 1, 0), ("flux2", 2, 2), ("flux2_klein", 1, 1)])
def test_reference_images_leaves_equal_stock_pipeline(family, refs, s):
    """FLUX.2 with reference images (one or two, of different sizes): the tree equals the stock pipeline with
    TreeSDEScheduler, one prompt per stock call (the stock pipeline gives every prompt of a call the same
    references); the references' tokens cost no rows; the record re-scores to ratio 1."""
    from diffusers_tree.testing import rescoring_ratio_error

    tree, kwargs = rollout_pipe(family, branch_factor=2, window_width=2, window_start=s)
    k, w, T = 2, 2, 5
    images = [reference(0, 64, 64), reference(1, 96, 64)][:refs]  # the stock pipeline takes 64 px and more
    prompt = ["a red cat"]
    roots = tree.prepare_roots(1, 32, 32, torch.Generator().manual_seed(5), torch.float32)
    conditioning = tree.encode(prompt, image=[images], **SIZE, **kwargs)
    assert conditioning.cond["source_latents"].shape[1] == 256 + (384 if refs == 2 else 0)  # 16x16, 24x16 patches
    out = tree(prompt, num_inference_steps=T, latents=roots, conditioning=conditioning, output_type="latent",
               generator=torch.Generator().manual_seed(11), max_batch_size=6)
    assert out.rows == (2 if conditioning.do_cfg else 1) * unique_rows(T, k, w, s)
    assert rescoring_ratio_error(tree, out.record, conditioning) < 1e-5
    leaves = tree.adapter.latent_output(out.images, conditioning)
    pipe = tree.pipe
    pipe.scheduler = TreeSDEScheduler.from_scheduler(pipe.scheduler, branch_factor=k, window_width=w,
                                                     window_start=s).manual_seed(11)
    stock_roots = tree.adapter.pipeline_latents(roots, **SIZE).repeat_interleave(k**w, dim=0)
    stock = pipe(image=images, prompt=prompt, num_images_per_prompt=k**w, num_inference_steps=T,
                 latents=stock_roots, output_type="latent", **SIZE, **kwargs).images
    torch.testing.assert_close(leaves, stock, rtol=1e-4, atol=1e-4)
    without = tree(prompt, num_inference_steps=T, latents=roots, output_type="latent", **SIZE, **kwargs,
                   generator=torch.Generator().manual_seed(11), max_batch_size=6).images
    assert not torch.allclose(without, out.images)  # the references change the leaves
