"""TreeRolloutPipeline: unique-node row counts, equality with the stock pipeline, the record, best-of-tree."""

import inspect
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from diffusers_tree import TreeRolloutPipeline, TreeSDEScheduler, backup_advantages, unique_rows  # noqa: E402
from diffusers_tree.adapters import adapter_for, stock_call_kwargs  # noqa: E402
from diffusers_tree.search import best_of_n, count_rows  # noqa: E402
from diffusers_tree.testing import TINY_PIPELINES, rescoring_ratio_error  # noqa: E402

FAMILIES = TINY_PIPELINES
PROMPTS = ["a red cat", "a blue dog"]
SIZE = {"height": 32, "width": 32}


def rollout_pipe(family, **tree_kwargs):
    build, kwargs = FAMILIES[family]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    return TreeRolloutPipeline.from_pipe(pipe, **tree_kwargs), kwargs


def stock_leaves(pipe, per_prompt: int, **kwargs) -> torch.Tensor:
    """The stock pipeline's output for `PROMPTS`: image pipelines take `num_images_per_prompt` and return `.images`,
    video pipelines (Wan) `num_videos_per_prompt` and `.frames`; both are the output's first field."""
    kind = "videos" if "num_videos_per_prompt" in inspect.signature(pipe.__call__).parameters else "images"
    # FLUX.2: roots in the layout of the stock pipeline's `latents=` (identity for the others)
    kwargs["latents"] = adapter_for(pipe).pipeline_latents(kwargs["latents"], **SIZE)
    # a copy: Z-Image's pipeline writes its chat-templated prompts into the list it is given
    return pipe(prompt=list(PROMPTS), **{f"num_{kind}_per_prompt": per_prompt}, **stock_call_kwargs(pipe, kwargs))[0]


def tree_latent_output(tree, out, **kwargs):
    """The tree's leaves as the stock pipeline returns output_type="latent" (FLUX.2 klein unpacks them)."""
    return tree.adapter.latent_output(out.images, tree.encode(PROMPTS, **SIZE, **kwargs))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_rows_equal_unique_node_count(family, guidance):
    tree, kwargs = rollout_pipe(family, window_start=3)
    k, w, s, T, trees = 3, 3, 3, 8, 2
    with count_rows(tree.denoiser) as counter:  # counted at the model, independently of the pipeline's own count
        out = tree(PROMPTS, num_trees=trees, num_inference_steps=T, guidance_scale=guidance, output_type="latent",
                   max_batch_size=40, generator=torch.Generator().manual_seed(0), **SIZE, **kwargs)
    # guidance-distilled families (FLUX) take one row per node; CFG families two
    cfg = 2 if tree.encode(PROMPTS[:1], guidance_scale=guidance, **kwargs).do_cfg else 1
    expected = len(PROMPTS) * trees * (s + (k**w - 1) // (k - 1) + k**w * (T - s - w)) * cfg
    assert counter.rows == out.rows == expected == len(PROMPTS) * trees * unique_rows(T, k, w, s) * cfg
    assert counter.max_rows <= 40  # chunked to max_batch_size, CFG halves included
    assert out.images.shape[0] == len(PROMPTS) * trees * k**w


@pytest.mark.parametrize("family", list(FAMILIES))
def test_roots_are_unit_noise_whatever_the_base_scheduler(family):
    """SDXL ships an Euler scheduler (init_noise_sigma ≈ 14.6); the tree steps DDIM from unit-variance noise."""
    tree, _ = rollout_pipe(family)
    roots = tree.prepare_roots(4, 32, 32, torch.Generator().manual_seed(0), torch.float32)
    assert abs(float(roots.std()) - 1) < 0.1


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype,s", [(torch.float32, 2), (torch.float32, 0), (torch.bfloat16, 1)])
def test_leaves_equal_stock_pipeline_with_tree_scheduler(family, dtype, s):
    """Window start 0 steps from the schedule's first sigma (below 1 for SANA and Wan); in bf16 the roots keep the
    dtype the stock pipeline keeps (fp32 for Z-Image, SANA and Wan, which assert or cast so)."""
    build, kwargs = FAMILIES[family]
    pipe = build().to(dtype)
    pipe.set_progress_bar_config(disable=True)
    k, w, T = 2, 3, 7
    tree = TreeRolloutPipeline.from_pipe(pipe, branch_factor=k, window_width=w, window_start=s)
    frames = {"num_frames": kwargs["num_frames"]} if "num_frames" in kwargs else {}
    roots = tree.prepare_roots(len(PROMPTS), 32, 32, torch.Generator().manual_seed(5), dtype, **frames)
    out = tree(PROMPTS, num_inference_steps=T, latents=roots, generator=torch.Generator().manual_seed(11),
               output_type="latent", max_batch_size=6, **SIZE, **kwargs)

    pipe.scheduler = TreeSDEScheduler.from_scheduler(pipe.scheduler, branch_factor=k, window_width=w,
                                                     window_start=s).manual_seed(11)
    stock = stock_leaves(pipe, k**w, num_inference_steps=T, latents=roots.repeat_interleave(k**w, dim=0),
                         output_type="latent", **SIZE, **kwargs)
    leaves = tree_latent_output(tree, out, **kwargs)
    assert stock.shape == leaves.shape
    torch.testing.assert_close(leaves, stock, rtol=1e-4, atol=1e-4)
    assert (leaves - stock).abs().max() < 1e-3 * stock.abs().max()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_record_rescoring_gives_stored_log_probs(family):
    """The training recompute: one forward per parent (CFG as sampled) re-scores every child to ratio 1."""
    tree, kwargs = rollout_pipe(family, window_start=1)
    frames = {"num_frames": kwargs["num_frames"]} if "num_frames" in kwargs else {}
    cond = tree.encode(PROMPTS, guidance_scale=4.0, max_sequence_length=kwargs.get("max_sequence_length"), **SIZE,
                       **frames)
    out = tree(PROMPTS, num_inference_steps=6, conditioning=cond, generator=torch.Generator().manual_seed(0),
               output_type="latent")
    record = out.record
    assert record.parent_latents.shape[0] == len(PROMPTS) * 13 and record.child_latents.shape[0] == 2 * 39
    assert rescoring_ratio_error(tree, record, cond) < 1e-4


def test_record_structure_and_backup():
    tree, kwargs = rollout_pipe("flux", window_start=2)
    out = tree(PROMPTS, num_trees=2, num_inference_steps=8, generator=torch.Generator().manual_seed(0),
               output_type="latent", **SIZE, **kwargs)
    r = out.record
    per_tree = 3 + 3 + 9 + 27 + 27  # levels 0-2, window levels 3-5, leaves (ODE tail not stored)
    assert r.num_nodes == 4 * per_tree
    assert torch.equal(r.leaf_prompt_index, torch.arange(4 * 27) // 54)
    assert torch.equal(r.tree_index[r.leaf_node], torch.arange(4 * 27) // 27)
    assert torch.equal(r.depth[r.leaf_node], torch.full((108,), 3))
    assert torch.isfinite(r.log_prob[r.edge_child]).all() and r.edge_child.numel() == 4 * 39
    assert torch.isnan(r.log_prob[r.leaf_node]).all()  # the collapsed ODE tail
    # each leaf's parent is a window-end node whose own stored latent is the trained child
    leaf_values = torch.randn(108)
    adv = backup_advantages(r.parent, r.node_values(leaf_values), r.log_prob)
    window_end = r.parent[r.leaf_node]
    torch.testing.assert_close(adv[window_end], leaf_values)  # Eq. 10
    assert torch.isfinite(adv[r.edge_child]).all()


@pytest.mark.parametrize("algorithm,expected_rows", [("flat", 1 + 8 * 5), ("mix", 2 + 1 + 8 * 3)])
def test_peer_shapes_roll_out(algorithm, expected_rows):
    tree, kwargs = rollout_pipe("sd3", algorithm=algorithm, branch_factor=2, window_width=3, window_start=2)
    out = tree(PROMPTS, num_inference_steps=6, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
               output_type="latent", **SIZE, **kwargs)
    assert out.rows == 2 * expected_rows and out.images.shape[0] == 2 * 8
    trained = 8 * 6 if algorithm == "flat" else 8 * 3
    assert out.record.edge_child.numel() == 2 * trained


def brightness(images, prompts):
    return [float(np.asarray(im.convert("L"), dtype=np.float32).mean()) for im in images]


def test_best_of_tree_returns_best_per_prompt():
    tree, kwargs = rollout_pipe("sd3", window_start=1)
    out = tree.best_of_tree(PROMPTS, brightness, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                            **SIZE, **kwargs)
    assert len(out.images) == 2 and out.scores.shape == (2,)
    for p in range(2):
        assert out.candidate_scores[p].numel() == 27
        assert out.scores[p] == out.candidate_scores[p].max()
        assert brightness([out.images[p]], None)[0] == pytest.approx(float(out.scores[p]))


def test_tree_search_prunes_and_spends_fewer_rows():
    tree, kwargs = rollout_pipe("sd3", window_start=1)
    full = tree(PROMPTS, num_inference_steps=6, guidance_scale=1.0, output_type="latent",
                generator=torch.Generator().manual_seed(0), **SIZE, **kwargs)
    out = tree.tree_search(PROMPTS, brightness, beam=2, num_inference_steps=6, guidance_scale=1.0,
                           generator=torch.Generator().manual_seed(0), **SIZE, **kwargs)
    # per prompt: step 0 (1) + step 1 (1, branches) + step 2 (3 -> keep 2) + step 3 (6 -> keep 2)
    #             + step 4 (6 -> keep 2) + step 5 (2): 1 + 1 + 3 + 6 + 6 + 2 = 19 rows, vs 1 + 1 + 3 + 9 + 27·2
    assert out.rows == 2 * 19 < full.rows
    assert [c.numel() for c in out.candidate_scores] == [2, 2]


def test_best_of_n_counts_rows():
    build, kwargs = FAMILIES["sd3"]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    out = best_of_n(pipe, PROMPTS, brightness, n=3, num_inference_steps=4, guidance_scale=1.0, **SIZE, **kwargs)
    assert out.rows == 2 * 3 * 4 and [c.numel() for c in out.candidate_scores] == [3, 3]


def test_size_comes_from_the_conditioning():
    """FLUX's image ids (and SDXL's time ids) are encoded for one size; a rollout given pre-encoded conditioning but
    no height/width used to fall back to the pipeline default (1024 px for FLUX) and crash or sample the wrong size."""
    tree, kwargs = rollout_pipe("flux", window_start=1)
    cond = tree.encode(PROMPTS, **SIZE, **kwargs)
    out = tree(PROMPTS, num_inference_steps=4, conditioning=cond, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (32, 32)  # PIL by default, as in every diffusers pipeline
    with pytest.raises(ValueError, match="differ from the conditioning"):
        tree(PROMPTS, num_inference_steps=4, conditioning=cond, height=64, width=64)


def test_errors():
    tree, kwargs = rollout_pipe("sd3", window_start=1)
    with pytest.raises(ValueError, match="expected num_prompts × num_trees = 2"):
        tree(PROMPTS, latents=torch.zeros(3, 4, 16, 16), **SIZE, **kwargs)
    with pytest.raises(TypeError, match="TreeSDEScheduler"):
        TreeRolloutPipeline(tree.pipe, tree.pipe.scheduler)


def test_called_like_a_diffusers_pipeline():
    """`prompt=` (a string or a list) and PIL images by default, as every diffusers pipeline."""
    tree, kwargs = rollout_pipe("sd3", window_start=1)
    out = tree(prompt="a red cat", num_inference_steps=4, generator=torch.Generator().manual_seed(0), **SIZE,
               **kwargs)
    assert len(out.images) == 27 and out.images[0].size == (32, 32)
    assert out.images[0].mode == "RGB"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_per_step_children_counts_roll_out(family):
    """(4, 2, 1) children at the window steps: rows are the unique-node count, and the leaves equal the stock
    pipeline's with the same scheduler swapped in (every leaf computed there)."""
    build, kwargs = FAMILIES[family]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    factors, s, T = [4, 2, 1], 1, 6
    tree = TreeRolloutPipeline.from_pipe(pipe, branch_factor=factors, window_start=s)
    assert tree.scheduler.config.window_width == 3
    roots = tree.prepare_roots(len(PROMPTS), 32, 32, torch.Generator().manual_seed(5), torch.float32)
    with count_rows(tree.denoiser) as counter:
        out = tree(PROMPTS, num_inference_steps=T, latents=roots, generator=torch.Generator().manual_seed(11),
                   guidance_scale=1.0, output_type="latent", **SIZE, **kwargs)
    per_tree = s + (1 + 4 + 8) + 8 * (T - s - 3)  # levels before each step: 1·s, then 1, 4, 8, then 8 per tail step
    cfg = 2 if tree.encode(PROMPTS[:1], guidance_scale=1.0, **kwargs).do_cfg else 1  # Z-Image guides at any g > 0
    assert counter.rows == out.rows == len(PROMPTS) * per_tree * cfg == len(PROMPTS) * unique_rows(T, factors, None,
                                                                                                  s) * cfg
    assert out.record.child_latents.shape[0] == len(PROMPTS) * (4 + 8 + 8)

    pipe.scheduler = TreeSDEScheduler.from_scheduler(pipe.scheduler, branch_factor=factors,
                                                     window_start=s).manual_seed(11)
    stock = stock_leaves(pipe, 8, num_inference_steps=T, guidance_scale=1.0,
                         latents=roots.repeat_interleave(8, dim=0), output_type="latent", **SIZE, **kwargs)
    assert (tree_latent_output(tree, out, **kwargs) - stock).abs().max() < 1e-3 * stock.abs().max()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_uses_cfg_is_what_encode_does(family):
    """`treegrpo check` counts rows with the adapter's `uses_cfg` before any model loads; it must be the rule
    `encode` applies (FLUX never, Z-Image at any g > 0, klein unless distilled, the rest at g > 1)."""
    from diffusers_tree.adapters import adapter_class

    tree, kwargs = rollout_pipe(family)
    frames = {"num_frames": kwargs["num_frames"]} if "num_frames" in kwargs else {}
    cls = adapter_class(type(tree.pipe).__name__)
    assert cls is type(tree.adapter)
    for guidance in (0.0, 1.0, 4.0):
        cond = tree.encode(PROMPTS[:1], guidance_scale=guidance, max_sequence_length=kwargs.get("max_sequence_length"),
                           **SIZE, **frames)
        assert cls.uses_cfg(guidance, dict(tree.pipe.config)) == cond.do_cfg, (family, guidance)
