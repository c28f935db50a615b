"""Advantage math against Eqs. 7, 9, 10, 11 on hand-built examples."""

import math

import pytest
import torch

from diffusers_tree.advantages import (
    aggregate_rewards,
    backup_advantages,
    effective_sample_size,
    group_normalize,
    node_depths,
    sibling_weights,
)
from diffusers_tree.window import WindowPolicy, sample_window_start, window_probs

NAN = float("nan")


def test_window_probs_eq7_values():
    # T=10, w=3, r=0.5: Pr[s=i] = 0.5·0.5^i / (1 - 0.5^7), i = 0..6
    probs = window_probs(10, 3, 0.5)
    expected = torch.tensor([0.5 * 0.5**i / (1 - 0.5**7) for i in range(7)], dtype=torch.float64)
    torch.testing.assert_close(probs, expected)
    assert probs.sum().item() == pytest.approx(1.0)
    assert probs[0].item() == pytest.approx(64 / 127)


def test_window_probs_uniform_limit_and_errors():
    torch.testing.assert_close(window_probs(6, 2, 1.0), torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="window_width < num_steps"):
        window_probs(3, 3, 0.5)
    with pytest.raises(ValueError, match="window_ratio"):
        window_probs(10, 3, 1.5)


def test_window_histogram_matches_eq7():
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = torch.tensor([sample_window_start(10, 3, 0.6, g) for _ in range(n)])
    freq = torch.bincount(draws, minlength=7).double() / n
    probs = window_probs(10, 3, 0.6)
    # 4 binomial standard errors per bin
    assert torch.all((freq - probs).abs() <= 4 * torch.sqrt(probs * (1 - probs) / n))
    assert int(draws.max()) <= 6  # the window never covers the last step (s + w - 1 <= T - 2)


def test_window_policies():
    geo = WindowPolicy(10, 3, kind="geometric", ratio=0.5)
    assert [geo.start_for_epoch(e, seed=1) for e in range(20)] == [geo.start_for_epoch(e, seed=1) for e in range(20)]
    assert len({geo.start_for_epoch(e, seed=1) for e in range(50)}) > 2
    assert WindowPolicy(10, 3, kind="fixed", start=4).start_for_epoch(17, seed=0) == 4
    shifting = WindowPolicy(10, 3, kind="shifting", start=5, shift_step=1, shift_every=3)
    assert [shifting.start_for_epoch(e, seed=0) for e in (0, 2, 3, 6, 9)] == [5, 5, 6, 0, 1]  # wraps at T-w = 7
    with pytest.raises(ValueError, match="Unknown window policy 'random'"):
        WindowPolicy(10, 3, kind="random")


def test_group_normalize_eq9():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 4.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 7])
    out = group_normalize(rewards, groups, eps=1e-4)
    std0 = math.sqrt(2 / 3)  # ddof = 0 std of (1, 2, 3)
    expected = torch.tensor([-1 / (std0 + 1e-4), 0.0, 1 / (std0 + 1e-4), 0.0, 0.0, 0.0])
    torch.testing.assert_close(out, expected)


def test_aggregate_rewards_modes():
    groups = torch.tensor([0, 0, 0, 0])
    hps = torch.tensor([0.1, 0.2, 0.3, 0.4])
    clip = torch.tensor([40.0, 10.0, 30.0, 20.0])
    rewards = torch.stack([hps, clip])
    adv = aggregate_rewards(rewards, [0.8, 0.2], groups, mode="advantage")
    expected = 0.8 * group_normalize(hps, groups) + 0.2 * group_normalize(clip, groups)
    torch.testing.assert_close(adv, expected)
    # "reward": the raw CLIP scale dominates the weighted sum before normalizing
    rew = aggregate_rewards(rewards, [0.8, 0.2], groups, mode="reward")
    torch.testing.assert_close(rew, group_normalize(0.8 * hps + 0.2 * clip, groups))
    with pytest.raises(ValueError, match="aggregation 'sum'"):
        aggregate_rewards(rewards, [0.8, 0.2], groups, mode="sum")


def binary_tree():
    """root 0 -(ODE)-> 1; 1 -(SDE)-> 2, 3; 2 -(SDE)-> 4, 5; 3 -(SDE)-> 6, 7; then an ODE tail 4..7 -> 8..11."""
    parent = torch.tensor([-1, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7])
    log_prob = torch.tensor([NAN, NAN, -1.0, -2.0, 0.0, math.log(3.0), -5.0, -5.0, NAN, NAN, NAN, NAN])
    leaf_adv = torch.full((12,), NAN)
    leaf_adv[8:] = torch.tensor([1.0, -1.0, 2.0, 4.0])
    return parent, leaf_adv, log_prob


def test_backup_eq10_eq11_on_hand_built_tree():
    parent, leaf_adv, log_prob = binary_tree()
    adv = backup_advantages(parent, leaf_adv, log_prob)
    # Eq. 10: window-depth edges take their leaf's advantage through the ODE tail
    torch.testing.assert_close(adv[4:8], torch.tensor([1.0, -1.0, 2.0, 4.0]))
    # Eq. 11: node 2's children have probs 1:3 -> 0.25·1 + 0.75·(-1) = -0.5; node 3 equal -> 3.0
    a2, a3 = -0.5, 3.0
    torch.testing.assert_close(adv[2:4], torch.tensor([a2, a3]))
    # ODE edges and the root are untrained
    assert torch.isnan(adv[[0, 1, 8, 9, 10, 11]]).all()
    mean_adv = backup_advantages(parent, leaf_adv, log_prob, weighting="mean")
    torch.testing.assert_close(mean_adv[2:4], torch.tensor([0.0, 3.0]))


def test_backup_one_hot_and_uniform_weights():
    parent = torch.tensor([-1, 0, 0, 0])
    leaf = torch.tensor([NAN, 3.0, -1.0, 7.0])
    one_hot = torch.tensor([NAN, 0.0, -1e4, -1e4])
    deeper = torch.tensor([-1, 0, 1, 1, 1])  # root -(SDE)-> 1 -(SDE x3)-> 2,3,4
    lp = torch.tensor([NAN, -0.3, 0.0, -1e4, -1e4])
    adv = backup_advantages(deeper, torch.tensor([NAN, NAN, 3.0, -1.0, 7.0]), lp)
    assert adv[1].item() == pytest.approx(3.0)  # one-hot weight on child 2
    uniform = backup_advantages(deeper, torch.tensor([NAN, NAN, 3.0, -1.0, 7.0]), torch.tensor([NAN, 0, 1, 1, 1.0]))
    assert uniform[1].item() == pytest.approx(3.0)  # (3 - 1 + 7) / 3
    assert backup_advantages(parent, leaf, one_hot)[1:].tolist() == [3.0, -1.0, 7.0]


def test_ode_chain_passes_through_unchanged():
    # root -(SDE)-> 1 -(ODE)-> 2 -(ODE)-> 3 (leaf)
    parent = torch.tensor([-1, 0, 1, 2])
    adv = backup_advantages(parent, torch.tensor([NAN, NAN, NAN, 0.42]), torch.tensor([NAN, -0.1, NAN, NAN]))
    assert adv[1].item() == pytest.approx(0.42)
    assert torch.isnan(adv[[0, 2, 3]]).all()


def test_depth_normalize():
    parent, leaf_adv, log_prob = binary_tree()
    adv = backup_advantages(parent, leaf_adv, log_prob, depth_normalize=True)
    depth2 = torch.tensor([-0.5, 3.0])
    depth3 = torch.tensor([1.0, -1.0, 2.0, 4.0])
    torch.testing.assert_close(adv[2:4], ((depth2 - depth2.mean()) / (depth2.std(unbiased=False) + 1e-4)))
    torch.testing.assert_close(adv[4:8], ((depth3 - depth3.mean()) / (depth3.std(unbiased=False) + 1e-4)))


def test_sibling_weights_and_ess():
    parent, _, log_prob = binary_tree()
    w = sibling_weights(parent, log_prob)
    torch.testing.assert_close(w[4:6], torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert w[8].item() == 1.0  # single ODE child
    ess = effective_sample_size(parent, log_prob)
    # parents 1 (softmax(-1,-2)), 2 (0.25/0.75), 3 (uniform): 1/Σw²
    p = 1 / (1 + math.exp(-1))
    torch.testing.assert_close(ess, torch.tensor([1 / (p**2 + (1 - p) ** 2), 1 / (0.25**2 + 0.75**2), 2.0]))


def test_node_depths_and_cycle():
    parent, _, _ = binary_tree()
    assert node_depths(parent).tolist() == [0, 1, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4]
    with pytest.raises(ValueError, match="cycle"):
        node_depths(torch.tensor([1, 0]))
