"""Rolling an epoch's prompts out group by group (so rewards can score one group while the next rolls out) and
joining the records with `concat_records` gives the record one rollout of all the prompts gives."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from diffusers_tree import TreeRolloutPipeline, backup_advantages  # noqa: E402
from diffusers_tree.record import RolloutRecord, concat_records  # noqa: E402
from diffusers_tree.testing import TINY_PIPELINES, rescoring_ratio_error  # noqa: E402

# prompts of different lengths (their padded embeddings differ), five so that groups are uneven
PROMPTS = ["a red cat", "a blue dog on a green lawn under the sky", "two", "a yellow bird", "an old grey boat"]
SIZE = {"height": 32, "width": 32}


def tree_pipe(family: str, **tree_kwargs) -> tuple[TreeRolloutPipeline, dict]:
    build, kwargs = TINY_PIPELINES[family]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    return TreeRolloutPipeline.from_pipe(pipe, **tree_kwargs), kwargs


def generators(first_tree: int, count: int) -> list[torch.Generator]:
    # one generator per tree, keyed on the tree's global slot (as the trainer does), so a tree draws the same noise
    # whichever group it is rolled out in
    return [torch.Generator().manual_seed(1000 + first_tree + i) for i in range(count)]


def grouped(tree, cond, num_trees: int, groups: list[int], steps: int) -> tuple[RolloutRecord, torch.Tensor]:
    records, images, start = [], [], 0
    for size in groups:
        out = tree(PROMPTS[start:start + size], num_trees=num_trees, num_inference_steps=steps,
                   conditioning=cond.select(start, start + size),
                   generator=generators(start * num_trees, size * num_trees), output_type="latent")
        records.append(out.record)
        images.append(out.images)
        start += size
    return concat_records(records), torch.cat(images)


@pytest.mark.parametrize("family,tree_kwargs,num_trees", [
    ("sd3", {"branch_factor": 3, "window_width": 2, "window_start": 0}, 1),
    ("sd3", {"branch_factor": [3, 2], "window_width": 2, "window_start": 3, "tail_steps": 1}, 2),
    ("flux", {"branch_factor": 2, "window_width": 3, "window_start": 2}, 2),
    ("flux", {"algorithm": "flat", "branch_factor": 2, "window_width": 3, "window_start": 1}, 1),
    ("sd3", {"algorithm": "mix", "branch_factor": 3, "window_width": 2, "window_start": 4}, 1),
])
@pytest.mark.parametrize("groups", [[2, 3], [1, 1, 3], [5]])
def test_grouped_rollout_equals_one_rollout(family, tree_kwargs, num_trees, groups):
    tree, kwargs = tree_pipe(family, **tree_kwargs)
    cond = tree.encode(PROMPTS, guidance_scale=3.0, max_sequence_length=kwargs.get("max_sequence_length"), **SIZE)
    steps = 7
    whole = tree(PROMPTS, num_trees=num_trees, num_inference_steps=steps, conditioning=cond,
                 generator=generators(0, len(PROMPTS) * num_trees), output_type="latent")
    joined, images = grouped(tree, cond, num_trees, groups, steps)
    assert (joined.plan, joined.num_prompts, joined.num_trees, joined.rows) == \
        (whole.record.plan, whole.record.num_prompts, whole.record.num_trees, whole.record.rows)
    for name in RolloutRecord.DATA_FIELDS:  # latents: other batch-mates in each forward, so equal up to rounding
        torch.testing.assert_close(getattr(joined, name), getattr(whole.record, name), rtol=1e-5, atol=1e-5)
    # stored log-probs differ only by the latents' rounding; the tree structure is identical
    torch.testing.assert_close(joined.log_prob, whole.record.log_prob, rtol=1e-4, atol=1e-4, equal_nan=True)
    for name in ("parent", "level", "prompt_index", "tree_index", "parent_node", "parent_step", "parent_prompt_index",
                 "edge_child", "edge_parent", "leaf_node"):
        assert torch.equal(getattr(joined, name), getattr(whole.record, name)), name
    torch.testing.assert_close(images, whole.images, rtol=1e-5, atol=1e-5)
    # what training reads from it: the same advantages, and the joined record re-scores to ratio 1
    leaf_values = torch.randn(joined.leaf_node.numel(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(backup_advantages(joined.parent, joined.node_values(leaf_values), joined.log_prob),
                               backup_advantages(whole.record.parent, whole.record.node_values(leaf_values),
                                                 whole.record.log_prob), equal_nan=True)
    assert rescoring_ratio_error(tree, joined, cond) < 1e-4


def test_concat_records_refuses_different_plans():
    tree, kwargs = tree_pipe("sd3", branch_factor=2, window_width=2, window_start=0)
    cond = tree.encode(PROMPTS[:2], max_sequence_length=kwargs.get("max_sequence_length"), **SIZE)
    a = tree(PROMPTS[:1], num_inference_steps=5, conditioning=cond.select(0, 1), output_type="latent").record
    b = tree(PROMPTS[1:2], num_inference_steps=5, window_start=2, conditioning=cond.select(1, 2),
             output_type="latent").record
    with pytest.raises(ValueError, match="same plan"):
        concat_records([a, b])


def test_conditioning_select_inverts_concat():
    tree, kwargs = tree_pipe("flux", branch_factor=2, window_width=1)
    cond = tree.encode(PROMPTS, max_sequence_length=kwargs.get("max_sequence_length"), **SIZE)
    parts = [cond.select(0, 2), cond.select(2, 5)]
    assert [p.num_prompts for p in parts] == [2, 3]
    back = type(cond).concat(parts)
    assert all(torch.equal(back.cond[k], cond.cond[k]) for k in cond.cond)
