"""The tail solver: fewer denoiser rows after the SDE window, with diffusers' DPM-Solver++ over the model's own
schedule. Rows against the unique-node formula in every family; the solver against the exact stepwise tail and
against the analytic solution of a linear ODE."""

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

from diffusers_tree import TreeRolloutPipeline, TreeSDEScheduler, backup_advantages, unique_rows  # noqa: E402
from diffusers_tree.plan import BranchPlan, tail_levels  # noqa: E402
from diffusers_tree.search import count_rows  # noqa: E402
from diffusers_tree.testing import SD_BETAS, TINY_PIPELINES  # noqa: E402

FAMILIES = TINY_PIPELINES
PROMPTS = ["a red cat", "a blue dog"]
SIZE = {"height": 32, "width": 32}


def test_tail_levels():
    assert tail_levels(5, 10, None) == tail_levels(5, 10, 5) == tail_levels(5, 10, 9) == (5, 6, 7, 8, 9, 10)
    assert tail_levels(5, 10, 2) == (5, 8, 10)  # 2.5 rounds half up
    assert tail_levels(2, 10, 3) == (2, 5, 7, 10)
    assert tail_levels(0, 10, 1) == (0, 10)
    for start in range(10):
        for n in range(1, 12):
            levels = tail_levels(start, 10, n)
            assert levels[0] == start and levels[-1] == 10 and len(levels) == min(n, 10 - start) + 1
            assert all(a < b for a, b in zip(levels, levels[1:], strict=False))
    with pytest.raises(ValueError, match="tail_steps must be >= 1"):
        tail_levels(2, 10, 0)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_rows_formula(n):
    """Rows per tree = s + (k^w - 1)/(k - 1) + k^w·min(n, T - s - w), counted here level by level."""
    T, k, w = 10, 3, 3
    for s in range(T - w):
        plan = BranchPlan.tree(T, k, w, s)
        tailed = dataclasses.replace(plan, tail_steps=n)
        by_level = s * 1 + (1 + 3 + 9) + 27 * min(n, T - s - w)
        assert tailed.rows_per_tree == unique_rows(T, k, w, s, tail_steps=n) == by_level
        assert tailed.trained_parents == plan.trained_parents and tailed.num_leaves == 27
        assert tailed.tail_compressed == (n < T - s - w)
    mix = dataclasses.replace(BranchPlan.mix(T, 25, 2, 1), tail_steps=n)
    assert mix.rows_per_tree == 1 + 1 + 25 + 25 * min(n, T - 3)
    flat = dataclasses.replace(BranchPlan.flat(T, 27), tail_steps=n)
    assert flat.rows_per_tree == BranchPlan.flat(T, 27).rows_per_tree  # no tail: every step is SDE


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_compressed_tail_rows_equal_unique_node_formula(family, guidance):
    build, kwargs = FAMILIES[family]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    k, w, s, T, n = 3, 2, 1, 8, 2
    tree = TreeRolloutPipeline.from_pipe(pipe, branch_factor=k, window_width=w, window_start=s, tail_steps=n)
    with count_rows(tree.denoiser) as counter:  # counted at the model
        out = tree(PROMPTS, num_inference_steps=T, guidance_scale=guidance, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **SIZE, **kwargs)
    cfg = 2 if tree.encode(PROMPTS[:1], guidance_scale=guidance, **kwargs).do_cfg else 1  # FLUX: guidance-distilled
    per_tree = s + (1 + k) + k**w * n
    assert counter.rows == out.rows == len(PROMPTS) * per_tree * cfg == len(PROMPTS) * cfg * unique_rows(
        T, k, w, s, tail_steps=n)
    # the record is the same shape as with the exact tail: leaves hang off their level-L ancestor
    record = out.record
    assert record.leaf_node.numel() == len(PROMPTS) * k**w
    assert torch.equal(record.level[record.leaf_node], torch.full((len(PROMPTS) * k**w,), T))
    assert torch.equal(record.level[record.parent[record.leaf_node]], torch.full((len(PROMPTS) * k**w,), s + w))
    leaf_adv = record.node_values(torch.linspace(-1, 1, record.leaf_node.numel()))
    adv = backup_advantages(record.parent, leaf_adv, record.log_prob)
    assert int(torch.isfinite(adv).sum()) == len(PROMPTS) * (k + k * k)


def _exact_tail(scheduler, model, x, levels):
    for i in range(levels[0], levels[-1]):
        x = scheduler.transition(model(x, scheduler.timesteps[i]), x, i, stochastic=False).prev_sample
    return x


def _solver_tail(scheduler, model, x, levels, order):
    solver = scheduler.tail_solver(levels, order=order)
    for level in levels[:-1]:
        t = scheduler.timesteps[level]
        x = solver.step(model(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("base", [FlowMatchEulerDiscreteScheduler(shift=3.0),
                                  DDIMScheduler(**SD_BETAS, set_alpha_to_one=False),
                                  DDIMScheduler(**SD_BETAS, set_alpha_to_one=True, prediction_type="v_prediction")],
                         ids=["flow", "ddim", "ddim-v"])
def test_first_order_solver_over_every_level_is_the_exact_tail(base):
    """DPM-Solver++ order 1 is the DDIM step (= Euler for flow matching): over all levels it is the exact tail."""
    scheduler = TreeSDEScheduler.from_scheduler(base, window_start=1)
    scheduler.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, generator=gen) * 0.3

    def model(x, t):  # a smooth nonlinear stand-in for the denoiser, depending on the timestep
        return torch.tanh(torch.einsum("ij,bjhw->bihw", weight, x)) + 1e-3 * float(t)

    x = torch.randn(3, 4, 4, 4, generator=gen)
    levels = tuple(range(4, 11))
    exact = _exact_tail(scheduler, model, x, levels)
    torch.testing.assert_close(_solver_tail(scheduler, model, x, levels, order=1), exact, rtol=1e-5, atol=1e-5)


BASES = {"flow": FlowMatchEulerDiscreteScheduler(shift=3.0),
         "ddim-eps": DDIMScheduler(**SD_BETAS, set_alpha_to_one=False),
         "ddim-v": DDIMScheduler(**SD_BETAS, set_alpha_to_one=True, prediction_type="v_prediction")}


@pytest.mark.parametrize("name", list(BASES))
def test_solver_converges_to_the_analytic_tail(name):
    """Data N(0, s²) has an exact denoiser and an exact probability-flow ODE: with a = signal scale and b = noise
    scale at a level (flow: 1 - σ and σ; VP: sqrt(ᾱ) and sqrt(1 - ᾱ)), the marginal variance is V = a²s² + b², and
    the ODE carries x to x·sqrt(V' / V). With the same 3 steps DPM-Solver++(2M) lands closer than DDIM/Euler, and
    both converge as steps are added."""
    s2 = 0.25
    scheduler = TreeSDEScheduler.from_scheduler(BASES[name], window_start=0)
    scheduler.set_timesteps(30)
    flow = scheduler.family == "flow"

    def scales(level):  # (a, b) at a level of the tree scheduler's grid (level 30 = after the last step)
        if flow:
            sigma = float(scheduler.sigmas[level])
            return 1 - sigma, sigma
        alpha_prod = float(scheduler.alpha_pair(torch.tensor(min(level, 29)))[0 if level < 30 else 1])
        return alpha_prod**0.5, (1 - alpha_prod) ** 0.5

    def model(x, t):  # the exact denoiser of N(0, s²) data in the base's parameterisation
        if flow:
            a, b = 1 - float(t) / 1000, float(t) / 1000
            return x * (b - a * s2) / (a * a * s2 + b * b)  # E[noise - x0 | x]
        alpha_prod = float(scheduler.base.alphas_cumprod[int(t)])
        a, b = alpha_prod**0.5, (1 - alpha_prod) ** 0.5
        if scheduler.config.prediction_type == "epsilon":
            return x * b / (a * a * s2 + b * b)  # E[noise | x]
        return x * a * b * (1 - s2) / (a * a * s2 + b * b)  # E[a·noise - b·x0 | x]

    start = 6
    (a0, b0), (a1, b1) = scales(start), scales(30)
    analytic = ((a1 * a1 * s2 + b1 * b1) / (a0 * a0 * s2 + b0 * b0)) ** 0.5
    x = torch.ones(1, 1, 1, 1)
    errors = {(order, n): abs(float(_solver_tail(scheduler, model, x, tail_levels(start, 30, n), order)) - analytic)
              for order in (1, 2) for n in (3, 6, 24)}
    assert errors[2, 6] < errors[1, 6], errors
    assert errors[1, 24] < errors[1, 6] < errors[1, 3] and errors[2, 24] < errors[2, 3], errors
    exact = abs(float(_exact_tail(scheduler, model, x, tuple(range(start, 31)))) - analytic)
    assert errors[1, 24] == pytest.approx(exact, abs=1e-6)  # 24 steps = every level, order 1 = the exact tail


@pytest.mark.parametrize("family", ["sd3", "sd"])
def test_compressed_leaves_stay_close_to_the_exact_tail(family):
    """Same noise, same window: the 2-step tail lands near the exact 5-step tail (relative error ≪ 1), and the
    window's children are untouched (same stored log-probs)."""
    build, kwargs = FAMILIES[family]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    outs = {}
    for n in (None, 2):
        tree = TreeRolloutPipeline.from_pipe(pipe, window_start=2, tail_steps=n)
        roots = tree.prepare_roots(len(PROMPTS), 32, 32, torch.Generator().manual_seed(5), torch.float32)
        outs[n] = tree(PROMPTS, num_inference_steps=10, latents=roots, generator=torch.Generator().manual_seed(1),
                       output_type="latent", **SIZE, **kwargs)
    exact, fast = outs[None], outs[2]
    assert torch.equal(exact.record.log_prob.isnan(), fast.record.log_prob.isnan())
    torch.testing.assert_close(fast.record.edge_log_prob, exact.record.edge_log_prob)
    error = float((fast.images - exact.images).abs().max() / exact.images.abs().max())
    assert 0 < error < 0.1
    assert fast.rows < exact.rows
