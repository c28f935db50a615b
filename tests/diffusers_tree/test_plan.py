"""Branching plans: counts against the closed forms of SPEC §2.1."""

import pytest

from diffusers_tree.plan import BranchPlan, tree_counts, unique_rows


@pytest.mark.parametrize(
    "k,w,leaves,parents,edges",
    [(3, 3, 27, 13, 39), (2, 3, 8, 7, 14), (2, 4, 16, 15, 30), (4, 3, 64, 21, 84)],
)
def test_tree_counts_table(k, w, leaves, parents, edges):
    assert tree_counts(k, w) == {"leaves": leaves, "trained_edges": edges, "trained_parents": parents}
    for s in range(0, 10 - w):
        plan = BranchPlan.tree(10, k, w, s)
        assert plan.num_leaves == leaves
        assert plan.trained_parents == parents
        assert plan.trained_edges == edges
        assert plan.rows_per_tree == unique_rows(10, k, w, s) == s + parents + leaves * (10 - s - w)
        assert plan.window_start == s and plan.window_width == w


def test_tree_layout_and_ancestors():
    plan = BranchPlan.tree(10, 3, 3, 2)
    assert plan.frontier_sizes == (1, 1, 1, 3, 9, 27, 27, 27, 27, 27, 27)
    assert plan.sde_steps == (False, False, True, True, True, False, False, False, False, False)
    # leaf 14 = 1·9 + 1·3 + 2: ancestors 0 (root), 1 (after step 2), 4 (after step 3), itself
    assert [plan.ancestor_of_leaf(level, 14) for level in (0, 2, 3, 4, 5, 10)] == [0, 0, 1, 4, 14, 14]
    assert plan.num_nodes == 3 + 3 + 9 + 27 * 6  # levels 0-2 one node each, then 3, 9, and 27 for levels 5-10
    assert "step 3: SDE x3 (3 -> 9 nodes)" in plan.describe()


def test_flat_and_mix_shapes():
    flat = BranchPlan.flat(10, 27)
    assert flat.num_leaves == 27 and all(flat.sde_steps)
    assert flat.rows_per_tree == 1 + 27 * 9  # the shared root is evaluated once
    assert flat.trained_edges == 270 and flat.trained_parents == 1 + 27 * 9
    mix = BranchPlan.mix(10, 27, window_width=3, window_start=4)
    assert mix.branch_factors[4] == 27 and mix.num_leaves == 27
    assert mix.rows_per_tree == 5 + 27 * 5
    assert mix.trained_edges == 27 * 3 and mix.trained_parents == 1 + 27 * 2


def test_invalid_plans_say_what_is_wrong():
    with pytest.raises(ValueError, match="window_start=8 does not fit"):
        BranchPlan.tree(10, 3, 3, 8)
    with pytest.raises(ValueError, match="is ODE"):
        BranchPlan(branch_factors=(2, 1), sde_steps=(False, False))
    with pytest.raises(ValueError, match="equal length"):
        BranchPlan(branch_factors=(2,), sde_steps=(True, False))


@pytest.mark.parametrize("factors", [(9, 3, 1), (4, 2), (2, 3, 2, 2), (5,)])
def test_per_step_children_counts(factors):
    """A tree with k_j children at window step j: counts by walking the levels, independently of the closed forms."""
    w, T = len(factors), 10
    level_sizes = [1]
    for f in factors:
        level_sizes.append(level_sizes[-1] * f)
    leaves, parents, edges = level_sizes[-1], sum(level_sizes[:-1]), sum(level_sizes[1:])
    assert tree_counts(list(factors)) == tree_counts(factors, w) == {
        "leaves": leaves, "trained_edges": edges, "trained_parents": parents}
    for s in range(T - w + 1):
        plan = BranchPlan.tree(T, factors, None, s)
        assert plan.branch_factors[s:s + w] == factors
        assert set(plan.branch_factors[:s] + plan.branch_factors[s + w:]) <= {1}
        assert plan.sde_steps == tuple(s <= i < s + w for i in range(T))
        assert (plan.num_leaves, plan.trained_parents, plan.trained_edges) == (leaves, parents, edges)
        assert plan.rows_per_tree == unique_rows(T, factors, None, s) == s + parents + leaves * (T - s - w)
    # equal counts reduce to the single-k tree
    assert BranchPlan.tree(10, (3, 3, 3), 3, 2) == BranchPlan.tree(10, 3, 3, 2)


def test_per_step_children_counts_errors():
    with pytest.raises(ValueError, match="lists 2 children counts .* window_width is 3"):
        BranchPlan.tree(10, (9, 3), 3, 0)
    with pytest.raises(ValueError, match="counts below 1"):
        BranchPlan.tree(10, (3, 0, 3), None, 0)
    with pytest.raises(ValueError, match="lists no children counts"):
        BranchPlan.tree(10, (), None, 0)
    with pytest.raises(ValueError, match="window_width is needed"):
        tree_counts(3)
