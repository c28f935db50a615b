"""TreeSDEScheduler: config round-trip, base-scheduler behaviour, and the four stock pipelines in fixed-batch mode."""

import inspect
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from diffusers_tree import TreeSDEScheduler  # noqa: E402
from diffusers_tree.adapters import stock_call_kwargs  # noqa: E402
from diffusers_tree.dynamics import flow_step  # noqa: E402
from diffusers_tree.testing import TINY_PIPELINES  # noqa: E402

SD_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def public(config):
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@pytest.mark.parametrize(
    "base",
    [FlowMatchEulerDiscreteScheduler(shift=3.0), DDIMScheduler(**SD_CONFIG, set_alpha_to_one=False)],
    ids=["flow", "ddim"],
)
def test_config_round_trip(tmp_path, base):
    tree = TreeSDEScheduler.from_scheduler(base, branch_factor=2, window_width=4, window_start=1, window_ratio=0.7)
    tree.save_pretrained(tmp_path)
    loaded = TreeSDEScheduler.from_pretrained(tmp_path)
    assert public(loaded.config) == public(tree.config)
    assert public(loaded.base.config) == public(tree.base.config)
    loaded.set_timesteps(10)
    tree.set_timesteps(10)
    assert torch.equal(loaded.timesteps, tree.timesteps)
    assert loaded.plan == tree.plan


def test_per_step_children_counts_config(tmp_path):
    tree = TreeSDEScheduler.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), branch_factor=[9, 3, 1],
                                           window_start=2, algorithm="tree")
    assert tree.config.window_width == 3 and tree.config.branch_factor == [9, 3, 1]
    tree.save_pretrained(tmp_path)
    loaded = TreeSDEScheduler.from_pretrained(tmp_path)
    loaded.set_timesteps(10)
    assert loaded.plan.branch_factors == (1, 1, 9, 3, 1, 1, 1, 1, 1, 1) and loaded.plan.num_leaves == 27
    for algorithm, first in (("mix", 27), ("flat", 27)):  # the peers get the same leaf count
        peer = TreeSDEScheduler.from_scheduler(tree, branch_factor=[9, 3, 1], window_start=2, algorithm=algorithm)
        peer.set_timesteps(10)
        assert peer.plan.num_leaves == 27 and max(peer.plan.branch_factors) == first
    with pytest.raises(ValueError, match="lists 2 children counts"):
        TreeSDEScheduler.from_scheduler(tree, branch_factor=[9, 3], window_width=3)


def test_behaves_like_flow_base():
    base = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256)
    tree = TreeSDEScheduler.from_scheduler(base, window_start=0)
    # stock pipelines read base config keys from the scheduler's config
    assert tree.config.base_image_seq_len == 256 and tree.config.get("use_dynamic_shifting") is True
    base.set_timesteps(num_inference_steps=10, mu=0.8)
    tree.set_timesteps(num_inference_steps=10, mu=0.8)
    assert torch.equal(tree.timesteps, base.timesteps) and torch.equal(tree.sigmas, base.sigmas)
    custom = [1.0, 0.8, 0.5, 0.2]
    base.set_timesteps(sigmas=custom, mu=0.8)
    tree = TreeSDEScheduler.from_scheduler(base, window_start=0, window_width=2)
    tree.set_timesteps(sigmas=custom, mu=0.8)
    assert torch.equal(tree.sigmas, base.sigmas)
    assert tree.order == 1 and tree.init_noise_sigma == 1.0 and len(tree) == 1000


@pytest.mark.parametrize("base_cls", [DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler])
def test_ddpm_family_uses_ddim_grid(base_cls):
    tree = TreeSDEScheduler.from_scheduler(base_cls(**SD_CONFIG), window_start=3)
    tree.set_timesteps(10)
    ddim = DDIMScheduler.from_config(public(base_cls(**SD_CONFIG).config))  # same spacing as the base
    ddim.set_timesteps(10)
    assert torch.equal(tree.timesteps, ddim.timesteps)
    assert tree.config.sde_type == "ddim" and tree.config.eta == 1.0
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(tree.scale_model_input(x, tree.timesteps[0]), x)  # variance-preserving x, unlike Euler


def test_ode_steps_equal_base_steps():
    base = FlowMatchEulerDiscreteScheduler(shift=3.0)
    tree = TreeSDEScheduler.from_scheduler(base, branch_factor=1, window_width=1, window_start=0)
    tree.set_timesteps(10)
    base.set_timesteps(10)
    x, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    out = tree.step(v, tree.timesteps[5], x).prev_sample
    torch.testing.assert_close(out, base.step(v, base.timesteps[5], x).prev_sample)


def test_window_start_drawn_at_each_set_timesteps():
    tree = TreeSDEScheduler.from_scheduler(FlowMatchEulerDiscreteScheduler(), window_start=None).manual_seed(0)
    starts = set()
    for _ in range(40):
        tree.set_timesteps(10)
        starts.add(tree.plan.window_start)
    assert starts <= set(range(7)) and len(starts) >= 3


def test_transition_rescore_tensor_indices():
    tree = TreeSDEScheduler.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), window_start=0)
    tree.set_timesteps(10)
    x, v = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    steps = torch.tensor([0, 1, 2])
    sampled = tree.transition(v, x, steps, stochastic=True, generator=torch.Generator().manual_seed(0))
    rescored = tree.transition(v, x, steps, stochastic=True, prev_sample=sampled.prev_sample)
    assert torch.equal(sampled.log_prob, rescored.log_prob)
    for b, i in enumerate(steps.tolist()):
        # each row used its own (sigma_i, sigma_{i+1}) pair, with sigma_max = sigmas[1] at sigma = 1
        single = flow_step(v[b:b + 1], x[b:b + 1], tree.sigmas[i], tree.sigmas[i + 1], sde_type="flow_sde", eta=0.7,
                           prev_sample=sampled.prev_sample[b:b + 1], sigma_max=float(tree.sigmas[1]))
        torch.testing.assert_close(single.log_prob, sampled.log_prob[b:b + 1])


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="sde_type='flow_sde' does not apply to DDIMScheduler"):
        TreeSDEScheduler.from_scheduler(DDIMScheduler(), sde_type="flow_sde")
    with pytest.raises(ValueError, match="Unknown algorithm 'bush'"):
        TreeSDEScheduler.from_scheduler(FlowMatchEulerDiscreteScheduler(), algorithm="bush")
    tree = TreeSDEScheduler.from_scheduler(FlowMatchEulerDiscreteScheduler(), window_start=0)
    tree.set_timesteps(10)
    with pytest.raises(ValueError, match="num_images_per_prompt=27"):
        tree.step(torch.zeros(4, 4, 2, 2), tree.timesteps[0], torch.zeros(4, 4, 2, 2))


# ---- every family's stock pipeline (each with its own default guidance) ---------------------------------------
FAMILIES = TINY_PIPELINES


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("k,w,s", [(3, 2, 1), (2, 3, 4)])
def test_stock_pipeline_returns_tree_leaves(family, k, w, s):
    build, kwargs = FAMILIES[family]
    pipe = build()
    pipe.scheduler = TreeSDEScheduler.from_scheduler(pipe.scheduler, branch_factor=k, window_width=w,
                                                     window_start=s).manual_seed(0)
    leaves, steps = k**w, 8
    levels = []

    def record(pipeline, i, t, callback_kwargs):
        levels.append(callback_kwargs["latents"].clone())
        return callback_kwargs

    kind = "videos" if "num_videos_per_prompt" in inspect.signature(pipe.__call__).parameters else "images"  # Wan
    images = pipe(prompt=["a red cat", "a blue dog"], **{f"num_{kind}_per_prompt": leaves}, num_inference_steps=steps,
                  height=32, width=32, output_type="pt", generator=torch.Generator().manual_seed(0),
                  callback_on_step_end=record, **stock_call_kwargs(pipe, kwargs))[0]  # `.images` or `.frames`
    assert images.shape[0] == 2 * leaves
    assert torch.isfinite(images).all()
    plan = pipe.scheduler.plan
    assert len(levels) == steps
    for step, latents in enumerate(levels):
        level = step + 1
        trees = latents.reshape(2, leaves, -1)  # [trees, leaves, D]
        node = torch.tensor([plan.ancestor_of_leaf(level, leaf) for leaf in range(leaves)])
        same_node = node[:, None] == node[None, :]
        for tree in trees:
            equal = (tree[:, None] == tree[None, :]).all(-1)
            # leaves in one node are bit-identical; leaves in different nodes differ
            assert torch.equal(equal, same_node), f"{family}: step {step} sharing differs from the plan"
    # the two trees (prompts) have different root noise
    assert not torch.equal(levels[0][0], levels[0][leaves])


@pytest.mark.parametrize("family", ["sd3", "sd"])
def test_tree_scheduler_with_no_branching_equals_base_pipeline(family):
    """k = 1 with eta = 0 everywhere is the base ODE sampler: the wrapper changes nothing else."""
    build, kwargs = FAMILIES[family]
    pipe = build()
    base_out = pipe("a red cat", num_inference_steps=6, height=32, width=32, output_type="pt",
                    generator=torch.Generator().manual_seed(1), **kwargs).images
    sde_type = "ode" if family == "sd3" else "ddim"
    tree = TreeSDEScheduler.from_scheduler(pipe.scheduler, branch_factor=1, window_width=1, window_start=0,
                                           sde_type=sde_type, eta=0.0)
    if family == "sd":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        base_out = pipe("a red cat", num_inference_steps=6, height=32, width=32, output_type="pt",
                        generator=torch.Generator().manual_seed(1), **kwargs).images
    pipe.scheduler = tree
    tree_out = pipe("a red cat", num_inference_steps=6, height=32, width=32, output_type="pt",
                    generator=torch.Generator().manual_seed(1), **kwargs).images
    torch.testing.assert_close(tree_out, base_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "base, sde_type",
    [(FlowMatchEulerDiscreteScheduler(shift=3.0), "cps"), (DDIMScheduler(**SD_CONFIG, set_alpha_to_one=True), "ddim")],
    ids=["cps", "ddim-final-alpha-1"],
)
def test_zero_noise_last_step_is_ode_in_flat_and_refused_in_a_window(base, sde_type):
    """cps into sigma = 0 and DDIM into alpha_cumprod = 1 have std = 0: no log-prob. Flat takes that step as ODE
    (the last step, which DanceGRPO never trains either); a window covering it is refused with the allowed start."""
    flat = TreeSDEScheduler.from_scheduler(base, sde_type=sde_type, algorithm="flat", branch_factor=2, window_width=2)
    flat.set_timesteps(6)
    assert flat.zero_noise_steps() == (5,)
    assert flat.plan.sde_steps == (True,) * 5 + (False,)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    last = flat.transition(out, x, 5)  # the plan's step: deterministic, finite
    assert last.log_prob is None and torch.isfinite(last.prev_sample).all()
    with pytest.raises(ValueError, match="no log-prob|no noise"):
        flat.transition(out, x, 5, stochastic=True)
    tree = TreeSDEScheduler.from_scheduler(base, sde_type=sde_type, window_start=4, branch_factor=2, window_width=2)
    with pytest.raises(ValueError, match=r"covers step\(s\) \[5\].*at most at 3"):
        tree.set_timesteps(6)


def test_flow_sde_has_no_zero_noise_steps():
    scheduler = TreeSDEScheduler.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), algorithm="flat")
    scheduler.set_timesteps(10)
    assert scheduler.zero_noise_steps() == () and all(scheduler.plan.sde_steps)


@pytest.mark.parametrize("base_cls", ["UniPCMultistepScheduler", "DPMSolverMultistepScheduler"])
def test_flow_sigma_multistep_schedulers_are_wrapped_as_flow(base_cls):
    """Wan's and SANA's schedulers (UniPC / DPM-Solver with flow sigmas) were taken for DDPM and failed at the first
    step; they are flow schedules, and their own sigmas and timesteps are kept."""
    import diffusers

    base = getattr(diffusers, base_cls)(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    tree = TreeSDEScheduler.from_scheduler(base, window_start=1)
    assert tree.family == "flow" and tree.config.sde_type == "flow_sde"
    tree.set_timesteps(6)
    reference = getattr(diffusers, base_cls).from_config(base.config)
    reference.set_timesteps(6)
    assert torch.equal(tree.sigmas, reference.sigmas) and torch.equal(tree.timesteps, reference.timesteps)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ode = tree.transition(v, x, 0)
    sigma, sigma_next = float(reference.sigmas[0]), float(reference.sigmas[1])
    torch.testing.assert_close(ode.prev_sample, x + (sigma_next - sigma) * v)  # the flow ODE step on their sigmas
    sde = tree.transition(v, x, 1, noise=torch.zeros_like(x))
    assert sde.log_prob is not None and torch.isfinite(sde.log_prob).all()


def test_rewrapping_keeps_the_configured_tree():
    """A pipe whose scheduler already is a tree keeps that tree in from_pipe (it sampled 27 default leaves before)."""
    from diffusers_tree import TreeRolloutPipeline
    from diffusers_tree.testing import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    pipe.scheduler = TreeSDEScheduler.from_scheduler(pipe.scheduler, branch_factor=2, window_width=2,
                                                     window_start=1, sde_type="dance_sde", eta=0.5, tail_steps=2)
    tree = TreeRolloutPipeline.from_pipe(pipe)
    config = tree.scheduler.config
    assert (config.branch_factor, config.window_width, config.window_start, config.sde_type, config.eta,
            config.tail_steps) == (2, 2, 1, "dance_sde", 0.5, 2)
    assert type(tree.scheduler.base).__name__ == "FlowMatchEulerDiscreteScheduler"
    tree.scheduler.set_timesteps(6)
    assert tree.scheduler.plan.num_leaves == 4
    # given keywords change only themselves; a new sde_type takes its own default eta, a list its own width
    changed = TreeSDEScheduler.from_scheduler(pipe.scheduler, window_start=0, sde_type="flow_sde")
    assert (changed.config.branch_factor, changed.config.window_start, changed.config.eta) == (2, 0, 0.7)
    per_step = TreeSDEScheduler.from_scheduler(pipe.scheduler, branch_factor=[3, 2, 1])
    assert (per_step.config.window_width, per_step.config.window_start) == (3, 1)


@pytest.mark.parametrize("sde_type", ["flow_sde", "ddim"])
def test_transitions_read_cpu_copies_of_the_schedule(sde_type):
    """FlowMatchEuler keeps `sigmas` (and pipelines' `timesteps`) on the accelerator, where every lookup of a
    transition was a device sync. "meta" stands in for the accelerator: a read of it would raise."""
    base = FlowMatchEulerDiscreteScheduler(shift=3.0) if sde_type == "flow_sde" else DDIMScheduler(**SD_CONFIG)
    tree = TreeSDEScheduler.from_scheduler(base, sde_type=sde_type, branch_factor=2, window_width=2, window_start=1)
    tree.set_timesteps(6)
    expected_t = float(tree.timesteps[2])
    tree.timesteps = tree.timesteps.to("meta")
    if tree.sigmas is not None:
        tree.sigmas = tree.sigmas.to("meta")
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = tree.transition(torch.zeros_like(x), x, torch.tensor([1, 1, 2, 2]), stochastic=True)
    assert torch.isfinite(out.log_prob).all()
    stepped = tree.step(torch.zeros_like(x), torch.tensor(expected_t), x, generator=torch.Generator().manual_seed(0))
    assert stepped.prev_sample.shape == x.shape and tree.step_index == 3
