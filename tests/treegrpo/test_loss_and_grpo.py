"""The loss (Eq. 12), the KL term and the epoch helpers, against hand-computed values."""

import math

import pytest
import torch

from diffusers_tree import BranchPlan
from treegrpo.train.grpo import epoch_prompt_indices, flat_trained_steps, process_share, select_edges, tree_advantages
from treegrpo.train.loss import gaussian_mean_kl, grpo_edge_loss, ppo_clip_loss


def test_ppo_clip_loss_values():
    # ratios e^0.2 ≈ 1.2214 and e^-0.2 ≈ 0.8187 with ε = 0.1:
    #   A = +2, r = 1.2214: max(-2·1.2214, -2·1.1) = -2.2     (clipped: no extra credit above 1 + ε)
    #   A = -1, r = 1.2214: max(1.2214, 1.1) = 1.2214           (unclipped: pessimistic)
    #   A = +1, r = 0.8187: max(-0.8187, -0.9) = -0.8187
    #   A = 9 (clipped to 5), r = 1: -5
    log_prob = torch.tensor([0.2, 0.2, -0.2, 0.0])
    advantage = torch.tensor([2.0, -1.0, 1.0, 9.0])
    loss, ratio = ppo_clip_loss(log_prob, torch.zeros(4), advantage, clip_range=0.1, adv_clip=5.0)
    expected = torch.tensor([-2.2, math.exp(0.2), -math.exp(-0.2), -5.0])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(ratio, torch.exp(log_prob))


def test_grpo_edge_loss_normalizes_by_the_update_and_reports():
    out = grpo_edge_loss(torch.tensor([0.0, 0.5]), torch.zeros(2), torch.tensor([1.0, 1.0]), clip_range=1e-4,
                         adv_clip=5.0, normalizer=4)
    # edge losses -1 and max(-e^0.5, -(1+1e-4)) = -1.0001; summed over 2 edges, divided by the update's 4 edges
    assert abs(float(out.loss) - (-1.0 - 1.0001) / 4) < 1e-6
    assert out.clip_frac == 0.5 and abs(out.ratio_max_error - (math.exp(0.5) - 1)) < 1e-6
    assert abs(out.ratio_drift - (math.exp(0.5) - 1) / 2) < 1e-6  # mean |ratio - 1| over the two edges
    # the gradient of a clipped edge is zero: only edge 0 contributes
    lp = torch.tensor([0.0, 0.5], requires_grad=True)
    grpo_edge_loss(lp, torch.zeros(2), torch.ones(2), clip_range=1e-4, adv_clip=5.0, normalizer=4).loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([-0.25, 0.0]))


def test_gaussian_mean_kl():
    mean, ref = torch.zeros(2, 3), torch.full((2, 3), 0.5)
    # (0.5)² / (2 · 0.25²) = 2 per element
    torch.testing.assert_close(gaussian_mean_kl(mean, ref, torch.tensor(0.25)), torch.tensor([2.0, 2.0]))


def test_epoch_prompts_cover_every_prompt_each_pass_and_shares_split():
    seen = [i for e in range(5) for i in epoch_prompt_indices(10, e, 4, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert epoch_prompt_indices(10, 2, 4, seed=3) == epoch_prompt_indices(10, 2, 4, seed=3)
    assert epoch_prompt_indices(10, 2, 4, seed=3) != epoch_prompt_indices(10, 2, 4, seed=4)
    items = list(range(8))
    assert process_share(items, 1, 2) == [4, 5, 6, 7] and process_share(items, 0, 4) == [0, 1]


class _Record:
    """The fields of a RolloutRecord that select_edges and tree_advantages read, for a hand-built flat tree."""

    def __init__(self):
        # flat plan, 3 steps, 2 trajectories: root 0 -> (1, 2) at step 0; 1 -> 3 -> 5; 2 -> 4 -> 6
        self.plan = BranchPlan.flat(3, 2)
        self.parent = torch.tensor([-1, 0, 0, 1, 2, 3, 4])
        self.level = torch.tensor([0, 1, 1, 2, 2, 3, 3])
        self.log_prob = torch.tensor([float("nan"), 0.0, 0.0, -1.0, -2.0, 0.0, 0.0])
        self.edge_child = torch.tensor([1, 2, 3, 4, 5, 6])
        self.leaf_node = torch.tensor([5, 6])
        self.prompt_index = torch.zeros(7, dtype=torch.long)
        self.num_nodes = 7

    @property
    def leaf_prompt_index(self):
        return self.prompt_index[self.leaf_node]

    def node_values(self, leaf_values):
        values = torch.full((7,), float("nan"))
        values[self.leaf_node] = leaf_values
        return values


class _FlatChains(_Record):
    """A flat tree of `trajectories` chains of `steps` SDE steps, built by hand: the root splits at step 0, then
    one child per node. Node of trajectory j at level l (1..steps) is 1 + (l - 1) * trajectories + j."""

    def __init__(self, steps: int, trajectories: int):
        self.plan = BranchPlan.flat(steps, trajectories)
        parent = [-1] + [0] * trajectories
        for level in range(2, steps + 1):
            parent += [1 + (level - 2) * trajectories + j for j in range(trajectories)]
        self.parent = torch.tensor(parent)
        self.num_nodes = len(parent)
        self.level = torch.tensor([0] + [1 + i // trajectories for i in range(self.num_nodes - 1)])
        self.edge_child = torch.arange(1, self.num_nodes)
        self.leaf_node = torch.arange(self.num_nodes - trajectories, self.num_nodes)
        self.prompt_index = torch.zeros(self.num_nodes, dtype=torch.long)


def test_select_edges_flat_trains_steps_as_dancegrpo_and_flow_grpo_do():
    # DanceGRPO, T = 10, fraction 0.6, 27 trajectories: int(0.6 * 9) = 5 of steps 0..8 each, 135 edges, never step 9
    record = _FlatChains(10, 27)
    step_of_edge = record.level[record.edge_child] - 1
    for seed in range(5):
        mask = select_edges(record, algorithm="flat", timestep_fraction=0.6,
                            generator=torch.Generator().manual_seed(seed))
        assert int(mask.sum()) == 135
        assert not mask[step_of_edge == 9].any()
        per_trajectory = torch.zeros(27, dtype=torch.long)
        per_trajectory.index_add_(0, (record.edge_child[mask] - 1) % 27, torch.ones(int(mask.sum()), dtype=torch.long))
        assert per_trajectory.tolist() == [5] * 27
    # fraction 1 (Flow-GRPO's steps): every step but the last, in every trajectory
    mask = select_edges(record, algorithm="flat", timestep_fraction=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, step_of_edge != 9)
    assert flat_trained_steps(10, 0.6) == (9, 5) and flat_trained_steps(10, 1.0) == (9, 9)
    assert flat_trained_steps(3, 0.2) == (2, 1)  # at least one step
    assert flat_trained_steps(10, 0.3) == (9, 2)  # int() truncates 2.7 like DanceGRPO


def test_select_edges_flat_fraction():
    record = _Record()
    mask = select_edges(record, algorithm="flat", timestep_fraction=1 / 2, generator=torch.Generator().manual_seed(0))
    # one of steps 0, 1 per trajectory (edges 0/2 and 1/3), never the last step (edges 4, 5)
    assert int(mask[[0, 2]].sum()) == 1 and int(mask[[1, 3]].sum()) == 1 and not mask[[4, 5]].any()
    assert select_edges(record, algorithm="tree", timestep_fraction=0.5, generator=None).all()


def test_tree_advantages_per_trajectory_for_flat():
    record = _Record()
    adv = tree_advantages(record, torch.tensor([[1.0, 3.0]]), [1.0], aggregation="advantage", eps=1e-4,
                          weighting="prob", depth_normalize=False)
    a = 1 / (1 + 1e-4)  # rewards 1 and 3: mean 2, std 1
    # single-child SDE chains carry each trajectory's advantage to all its edges
    torch.testing.assert_close(adv.advantage, torch.tensor([-a, a, -a, a, -a, a]))
    torch.testing.assert_close(adv.leaf_advantage, torch.tensor([-a, a]))


def test_grid_labels_keep_the_end_of_the_prompt():
    from treegrpo.run.metrics import short_label

    assert short_label("a handwritten digit seven", 12) == "…digit seven"
    assert short_label("a cat", 12) == "a cat"
    assert short_label("a handwritten digit zero", 16) == "…digit zero"  # not "…itten digit zero"


def _kl_scaled_by_flow_grpo_factor(sde_type: str, eta: float, steps: torch.Tensor, seed: int):
    """Our exact KL × flow_grpo_kl_factor for two random velocities at `steps` of a shift-3 flow schedule; returns
    (scheduler, σ, σ', our step's mean, the reference step's mean, that product)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_tree import TreeSDEScheduler
    from diffusers_tree.dynamics import flow_step
    from treegrpo.train.grpo import flow_grpo_kl_factor
    from treegrpo.train.loss import gaussian_mean_kl

    scheduler = TreeSDEScheduler.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), sde_type=sde_type,
                                                eta=eta)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(seed)
    x, v, v_ref = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    sigma, sigma_next = scheduler.sigma_table[steps], scheduler.sigma_table[steps + 1]
    out = flow_step(v, x, sigma, sigma_next, sde_type=sde_type, eta=eta, noise=torch.zeros_like(x))
    ref = flow_step(v_ref, x, sigma, sigma_next, sde_type=sde_type, eta=eta, noise=torch.zeros_like(x))
    kl = gaussian_mean_kl(out.mean, ref.mean, out.std) * flow_grpo_kl_factor(scheduler, steps)
    return scheduler, sigma, sigma_next, out.mean, ref.mean, kl


def test_flow_grpo_kl_scale_equals_flow_grpo_formula():
    """exact KL × flow_grpo_kl_factor = Flow-GRPO's mean (Δμ)² / (2 s²), s = η·sqrt(σ/(1−σ)) (no √|dt|)."""
    from diffusers import DDIMScheduler

    from diffusers_tree import TreeSDEScheduler
    from treegrpo.train.grpo import flow_grpo_kl_factor

    steps = torch.tensor([1, 4, 8])
    scheduler, sigma, _, mean, ref_mean, ours = _kl_scaled_by_flow_grpo_factor("flow_sde", 0.7, steps, seed=0)
    s = 0.7 * torch.sqrt(sigma / (1 - sigma))
    theirs = ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * s**2)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    # the factors of all 10 steps add up to σ_0 − σ_T = 1: on average 10x smaller than the exact KL
    assert float(flow_grpo_kl_factor(scheduler, torch.arange(10)).sum()) == pytest.approx(1.0, abs=1e-6)

    ddim = TreeSDEScheduler.from_scheduler(DDIMScheduler())
    ddim.set_timesteps(10)
    with pytest.raises(ValueError, match="flow-matching"):
        flow_grpo_kl_factor(ddim, steps)


def test_flow_grpo_kl_scale_with_cps_is_the_exact_kl():
    """Flow-GRPO's cps KL divides by its std_dev_t² with std_dev_t = σ'·sin(ηπ/2), the transition's real std:
    mean (Δμ)² / (2 (σ' sin(ηπ/2))²), written out here independently of flow_step's std."""
    import math

    _, _, sigma_next, mean, ref_mean, ours = _kl_scaled_by_flow_grpo_factor("cps", 0.8, torch.tensor([0, 3, 7]),
                                                                            seed=1)
    std_dev_t = sigma_next * math.sin(0.8 * math.pi / 2)
    theirs = ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * std_dev_t**2)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)


def test_reward_curve_and_grid_labels(tmp_path):
    """The reward curve is drawn by matplotlib with the ± std band and any accuracy on a second axis; grid labels
    keep their spaces (PIL's built-in font drew "…digitseven") and fit their cell."""
    from PIL import Image

    from treegrpo.run.metrics import _label_font, fitted_label, image_grid, reward_curve

    history = [{"epoch": e, "reward/mean": 0.5 + e / 200, "reward/std": 0.1, "reward/digits/accuracy": 0.5 + e / 250}
               for e in range(100)]
    path = reward_curve(history, tmp_path / "curve.png")
    with Image.open(path) as image:
        assert image.size[0] > 600 and image.size[1] > 350
    font = _label_font(10)
    label = fitted_label("a handwritten digit seven", font, 90)
    assert label == "…digit seven" and font.getlength(label) <= 90
    grid = image_grid([Image.new("RGB", (16, 16))] * 3, columns=3, labels=["a cat"] * 3, scale=6)
    assert grid.size == (3 * 96, 96 + 14)
