"""Wan 2.1 text-to-video: the tree samples videos exactly as the stock `WanPipeline` with the tree scheduler, every
unique node through the transformer once (CFG halves batched), and the video protocol (`num_frames`, `[N, F, 3, H, W]`
leaves, the stock output types) holds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline, WanPipeline  # noqa: E402

from diffusers_tree import TreeRolloutPipeline, TreeSDEScheduler, unique_rows  # noqa: E402
from diffusers_tree.adapters import adapter_for  # noqa: E402
from diffusers_tree.search import count_rows  # noqa: E402
from diffusers_tree.testing import tiny_sd3_pipeline  # noqa: E402
from diffusers_tree.testing.wan import tiny_wan_pipeline  # noqa: E402

PROMPTS = ["a red cat", "a blue dog"]
CALL = {"height": 32, "width": 32, "num_frames": 5, "max_sequence_length": 16}  # latents [B, 4, 2, 4, 4]


@pytest.fixture(scope="module")
def pipe():
    return tiny_wan_pipeline()


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_rows_are_unique_nodes_and_leaves_equal_the_stock_pipeline(pipe, guidance):
    k, w, s, T = 2, 2, 1, 5
    tree = TreeRolloutPipeline.from_pipe(pipe, branch_factor=k, window_width=w, window_start=s)
    roots = tree.prepare_roots(len(PROMPTS), 32, 32, torch.Generator().manual_seed(5), torch.float32, num_frames=5)
    assert roots.shape == (2, 4, 2, 4, 4)  # (5 - 1) / 4 + 1 = 2 latent frames of 32 / 8 = 4 pixels square
    with count_rows(tree.denoiser) as counter:  # counted at the model
        out = tree(PROMPTS, num_inference_steps=T, guidance_scale=guidance, latents=roots, output_type="latent",
                   generator=torch.Generator().manual_seed(11), **CALL)
    cfg = 2 if guidance > 1 else 1  # Wan: plain CFG, [uncond; cond] in one forward
    # per tree: s nodes before the window, 1 + k in it, k^w for each of the T - s - w steps after it
    assert counter.rows == out.rows == len(PROMPTS) * cfg * (s + 1 + k + k**w * (T - s - w))
    assert out.rows == len(PROMPTS) * cfg * unique_rows(T, k, w, s)

    original = pipe.scheduler
    pipe.scheduler = TreeSDEScheduler.from_scheduler(original, branch_factor=k, window_width=w,
                                                     window_start=s).manual_seed(11)
    try:
        stock = pipe(PROMPTS, num_videos_per_prompt=k**w, num_inference_steps=T, guidance_scale=guidance,
                     latents=roots.repeat_interleave(k**w, dim=0), output_type="latent", **CALL).frames
    finally:
        pipe.scheduler = original
    assert stock.shape == out.images.shape == (2 * k**w, 4, 2, 4, 4)
    torch.testing.assert_close(out.images, stock, rtol=1e-4, atol=1e-4)


def test_video_leaves_in_every_output_type_match_the_stock_pipeline(pipe):
    """One leaf per prompt (k = 1, eta = 0: the ODE): the tree's decoded leaves are the stock pipeline's frames, and
    `"np"`/`"pil"` have the stock pipeline's layout."""
    tree = TreeRolloutPipeline.from_pipe(pipe, branch_factor=1, window_width=1, window_start=0, sde_type="ode",
                                         eta=0.0)
    cond = tree.encode(PROMPTS, **CALL)
    latents = tree(PROMPTS, num_inference_steps=3, conditioning=cond, output_type="latent", return_record=False,
                   generator=torch.Generator().manual_seed(3)).images
    ours = {kind: tree.decode(latents, cond, output_type=kind) for kind in ("pt", "np", "pil")}
    assert ours["pt"].shape == (2, 5, 3, 32, 32) and 0 <= ours["pt"].min() and ours["pt"].max() <= 1
    np.testing.assert_allclose(ours["np"][1], ours["pt"][1].permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert ours["pil"][0][0].size == (32, 32) and ours["pil"][0][0].mode == "RGB"

    original = pipe.scheduler
    pipe.scheduler = TreeSDEScheduler.from_scheduler(original, branch_factor=1, window_width=1, window_start=0,
                                                     sde_type="ode", eta=0.0)
    try:  # the stock pipeline's own VAE normalization and video processor on the same leaves
        stock = {kind: pipe(PROMPTS, num_inference_steps=3, output_type=kind,
                            generator=torch.Generator().manual_seed(3), **CALL).frames for kind in ("pt", "np", "pil")}
    finally:
        pipe.scheduler = original
    torch.testing.assert_close(ours["pt"], stock["pt"], rtol=1e-4, atol=1e-4)
    assert ours["np"].shape == stock["np"].shape == (2, 5, 32, 32, 3)
    np.testing.assert_allclose(ours["np"], stock["np"], atol=1e-4)
    assert [len(video) for video in ours["pil"]] == [len(video) for video in stock["pil"]] == [5, 5]


def test_num_frames_travels_with_the_conditioning(pipe):
    tree = TreeRolloutPipeline.from_pipe(pipe, window_start=1)
    cond = tree.encode(PROMPTS, **CALL)
    assert cond.num_frames == 5 and cond.do_cfg  # default guidance 5.0
    assert tree.encode(PROMPTS[:1], max_sequence_length=16).num_frames == 81  # WanPipeline's default
    assert cond.cond["encoder_hidden_states"].shape == (2, 16, 32)  # padded to max_sequence_length
    out = tree(PROMPTS, num_inference_steps=4, conditioning=cond, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape[2:] == (2, 4, 4)  # the conditioning's 5 frames and 32x32
    with pytest.raises(ValueError, match="num_frames=9 differs from the conditioning's 5"):
        tree(PROMPTS, num_inference_steps=4, conditioning=cond, num_frames=9)
    with pytest.raises(ValueError, match="4k \\+ 1 frames"):
        tree(PROMPTS, num_inference_steps=4, **{**CALL, "num_frames": 6})
    with pytest.raises(ValueError, match="multiples of 16"):
        tree.prepare_roots(1, 40, 32, None, torch.float32, num_frames=5)
    assert tree._size(None, None) == (480, 832)  # the stock pipeline's defaults


def test_image_families_refuse_num_frames():
    tree = TreeRolloutPipeline.from_pipe(tiny_sd3_pipeline(), window_start=1)
    assert tree.encode(PROMPTS[:1], max_sequence_length=16).num_frames is None
    with pytest.raises(ValueError, match="makes images; num_frames is for video pipelines"):
        tree.encode(PROMPTS[:1], max_sequence_length=16, num_frames=5)


def test_wan22_pipelines_are_refused(pipe):
    parts = {name: pipe.components[name] for name in ("tokenizer", "text_encoder", "vae", "scheduler", "transformer")}
    with pytest.raises(ValueError, match="transformer_2"):
        adapter_for(WanPipeline(**parts, transformer_2=pipe.transformer, boundary_ratio=0.875))
    with pytest.raises(ValueError, match="expand_timesteps"):
        adapter_for(WanPipeline(**parts, expand_timesteps=True))


def test_lora_targets_exist_in_every_attention(pipe):
    adapter = adapter_for(pipe)
    names = {name for name, _ in adapter.denoiser.named_modules()}
    for block in range(len(pipe.transformer.blocks)):
        for attention in ("attn1", "attn2"):
            for target in adapter.lora_target_modules:
                assert f"blocks.{block}.{attention}.{target}" in names
    assert adapter.pixels_per_patch == 16


def test_save_pretrained_round_trips(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is WanPipeline and type(loaded.scheduler) is type(pipe.scheduler)
    for name in ("transformer", "vae", "text_encoder"):
        ours, theirs = pipe.components[name].state_dict(), loaded.components[name].state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    loaded.set_progress_bar_config(disable=True)
    before = pipe(PROMPTS[:1], num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
                  **CALL).frames
    after = loaded(PROMPTS[:1], num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **CALL).frames
    # same weights bit for bit; the outputs agree to fp32 rounding (the loaded tensors sit at other memory
    # alignments, so CPU matmul kernels may sum in another order)
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-5)


def test_best_of_tree_scores_whole_videos_and_best_of_n_refuses_them(pipe):
    from diffusers_tree.search import best_of_n

    tree = TreeRolloutPipeline.from_pipe(pipe, branch_factor=2, window_width=1, window_start=1)
    seen = []

    def scorer(videos, prompts):  # the second leaf wins: every video is a list of its 5 frames
        seen.extend(len(video) for video in videos)
        return [float(i) for i in range(len(videos))]

    out = tree.best_of_tree(["a red cat"], scorer, num_inference_steps=3, height=32, width=32, num_frames=5,
                            max_sequence_length=16, generator=torch.Generator().manual_seed(0))
    assert seen == [5, 5] and out.scores.tolist() == [1.0] and len(out.images[0]) == 5
    with pytest.raises(ValueError, match="best_of_n samples and scores images; WanPipeline makes videos"):
        best_of_n(pipe, ["a red cat"], scorer, n=2, num_inference_steps=2, height=32, width=32)


def test_tree_search_samples_the_frames_asked_for(pipe):
    """tree_search encoded without `num_frames`, so any length but Wan's default 81 failed."""
    tree = TreeRolloutPipeline.from_pipe(pipe, branch_factor=2, window_width=2, window_start=1)
    seen = []

    def scorer(videos, prompts):
        seen.extend(len(video) for video in videos)
        return [float(i) for i in range(len(videos))]

    out = tree.tree_search(["a red cat"], scorer, beam=1, num_inference_steps=4, height=32, width=32, num_frames=5,
                           max_sequence_length=16, generator=torch.Generator().manual_seed(0))
    assert len(out.images[0]) == 5 and set(seen) == {5}
