"""The per-epoch collapse diagnostics against computations written out by hand."""

import itertools
import math

import torch

from treegrpo.train.diagnostics import leaf_diversity, no_signal_groups


def test_no_signal_counts_groups_whose_rewards_do_not_spread():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.2, 0.9, 0.5, 3.0, 3.0 + 1e-5])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    assert no_signal_groups(rewards, groups, eps=1e-4) == (2, 3)  # group 0 identical, group 2 within eps
    assert no_signal_groups(rewards, groups, eps=1e-6) == (1, 3)  # std 5e-6


def test_leaf_diversity_is_the_mean_pairwise_rms_distance_per_group():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 4, 4, generator=generator)
    groups = torch.tensor([0, 0, 0, 1, 1])
    expected = []
    for g in (0, 1):
        members = [images[i] for i in range(5) if groups[i] == g]
        pairs = list(itertools.combinations(members, 2))
        expected.append(sum(math.sqrt(float(((a - b) ** 2).mean())) for a, b in pairs) / len(pairs))
    total, counted = leaf_diversity(images, groups)
    assert counted == 2 and math.isclose(total, sum(expected), rel_tol=1e-5)
    same = images[:1].repeat(4, 1, 1, 1)
    assert leaf_diversity(same, torch.tensor([0, 0, 1, 2])) == (0.0, 1)  # singletons are not counted


def test_reward_by_window_start_groups_the_later_epochs():
    from treegrpo.run.metrics import reward_by_window_start

    history = [{"epoch": e, "tree/window_start": s, "reward/mean": r}
               for e, (s, r) in enumerate([(0, 0.1), (1, 0.2), (0, 0.5), (1, 0.3), (0, 0.7), (2, 0.9)])]
    assert reward_by_window_start(history, since_epoch=2) == {0: ((0.5 + 0.7) / 2, 2), 1: (0.3, 1), 2: (0.9, 1)}
    mean, count = reward_by_window_start(history)[0]
    assert count == 3 and abs(mean - (0.1 + 0.5 + 0.7) / 3) < 1e-12
