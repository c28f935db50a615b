"""The rollout record: what training needs from a tree rollout, and nothing after the window.

Nodes are stored for levels 0 … L (L = the level after the last SDE step) plus the leaves; nodes of the ODE tail
between level L and the leaves are not stored (each leaf's parent is its ancestor at level L, through an ODE edge
with NaN log-prob, which the advantage backup passes through unchanged, Eq. 10). Latents are stored once per parent
of a trained edge and once per trained child.

Devices: the index and bookkeeping arrays (tree structure, step indices, prompt ids, stored log-probs) are small and
read by CPU-side code (advantage backup, edge selection, micro-batching) and by the scheduler's CPU schedule tables,
so they always live on the CPU. The latents and the timesteps the denoiser saw live on the rollout device (or
`record_device`): they are model inputs. Indexing a device tensor with a CPU index is allowed; the reverse is not.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .plan import BranchPlan


@dataclass
class RolloutRecord:
    """Tree structure, stored log-probs and latents of one rollout (all trees of all prompts).

    Node arrays `[N]` (roots first, then each level in order; within a level tree-major, then node order):
        parent (`torch.LongTensor`): parent node id, -1 for roots.
        level (`torch.LongTensor`): steps from the root; the edge into a node at level l is step l - 1
            (a leaf's edge from its level-L ancestor stands for the whole ODE tail).
        prompt_index (`torch.LongTensor`): the node's prompt.
        tree_index (`torch.LongTensor`): global tree id, `prompt · num_trees + tree`.
        log_prob (`torch.FloatTensor`): stored log-prob of the edge into the node (NaN: root or ODE edge).
    Parents of trained edges `[P]` (one training forward each):
        parent_node, parent_step, parent_timestep, parent_prompt_index (`torch.Tensor`): node id, step index i,
            the scheduler timestep the denoiser saw, and the prompt.
        parent_latents (`torch.Tensor`): `[P, ...]` the latent the denoiser saw.
    Trained edges `[E]` (children of one parent are contiguous):
        edge_child (`torch.LongTensor`): child node id.
        edge_parent (`torch.LongTensor`): index into the parent arrays.
        child_latents (`torch.Tensor`): `[E, ...]` the sampled child latent (re-scored at training time).
    Leaves `[num_prompts · num_trees · num_leaves]`, in image order:
        leaf_node (`torch.LongTensor`), leaf_latents (`torch.Tensor`).
    And: `plan` ([`BranchPlan`]), `num_prompts`, `num_trees`, `rows` (denoiser rows while sampling, CFG halves
    counted).

    Only `DATA_FIELDS` (latents and timesteps) live on the rollout device; every other tensor is on the CPU.
    """

    DATA_FIELDS = ("parent_timestep", "parent_latents", "child_latents", "leaf_latents")

    plan: BranchPlan
    num_prompts: int
    num_trees: int
    parent: torch.Tensor
    level: torch.Tensor
    prompt_index: torch.Tensor
    tree_index: torch.Tensor
    log_prob: torch.Tensor
    parent_node: torch.Tensor
    parent_step: torch.Tensor
    parent_timestep: torch.Tensor
    parent_prompt_index: torch.Tensor
    parent_latents: torch.Tensor
    edge_child: torch.Tensor
    edge_parent: torch.Tensor
    child_latents: torch.Tensor
    leaf_node: torch.Tensor
    leaf_latents: torch.Tensor
    rows: int

    @property
    def num_nodes(self) -> int:
        return self.parent.numel()

    @property
    def edge_step(self) -> torch.Tensor:
        """Step index of every trained edge `[E]`."""
        return self.parent_step[self.edge_parent]

    @property
    def edge_log_prob(self) -> torch.Tensor:
        """Stored (sampling-time) log-prob of every trained edge `[E]`."""
        return self.log_prob[self.edge_child]

    @property
    def depth(self) -> torch.Tensor:
        """Number of SDE edges between the root and each node `[N]` (window depth; leaves have depth w)."""
        sde_before = torch.tensor([0, *torch.tensor(self.plan.sde_steps, dtype=torch.long).cumsum(0).tolist()])
        return sde_before[self.level]

    @property
    def leaf_prompt_index(self) -> torch.Tensor:
        return self.prompt_index[self.leaf_node]

    def node_values(self, leaf_values: torch.Tensor) -> torch.Tensor:
        """Scatter per-leaf values `[num_leaves_total]` onto the node array `[N]` (NaN off the leaves), the input
        layout of `backup_advantages`."""
        values = torch.full((self.num_nodes,), float("nan"), dtype=torch.float32)
        values[self.leaf_node] = leaf_values.to(values)
        return values

    def to(self, device) -> RolloutRecord:
        """A copy with the latents and timesteps (`DATA_FIELDS`) on `device`; index arrays stay on the CPU."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in self.DATA_FIELDS:
            moved[name] = moved[name].to(device)
        return RolloutRecord(**moved)


class RecordBuilder:
    """Accumulates a [`RolloutRecord`] step by step during a rollout (used by `TreeRolloutPipeline`)."""

    def __init__(self, plan: BranchPlan, num_prompts: int, num_trees: int, device=None):
        self.plan, self.num_prompts, self.num_trees, self.device = plan, num_prompts, num_trees, device
        self.last_level = plan.tail_start  # the level after the last SDE step
        self.nodes: dict[str, list[torch.Tensor]] = {k: [] for k in ("parent", "level", "prompt", "tree", "log_prob")}
        self.parents: dict[str, list[torch.Tensor]] = {k: [] for k in ("node", "step", "timestep", "prompt", "x")}
        self.edges: dict[str, list[torch.Tensor]] = {k: [] for k in ("child", "parent", "x")}
        self.num_nodes = self.num_parents = 0

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.device is None else tensor.to(self.device)

    @staticmethod
    def _cat_cpu(parts: list[torch.Tensor]) -> torch.Tensor:
        # one device-to-host copy per array at the end of the rollout, not one per step
        return torch.cat(parts).cpu()

    def _add_nodes(self, parent, level, prompt, tree, log_prob) -> torch.Tensor:
        ids = torch.arange(self.num_nodes, self.num_nodes + parent.numel(), device=parent.device)
        self.num_nodes += parent.numel()
        for key, value in zip(("parent", "level", "prompt", "tree", "log_prob"),
                              (parent, torch.full_like(parent, level), prompt, tree, log_prob), strict=True):
            self.nodes[key].append(value)  # index arrays: moved to the CPU once, in `finish`
        return ids

    def add_roots(self, prompt: torch.Tensor) -> torch.Tensor:
        self.tree = torch.arange(prompt.numel(), device=prompt.device)
        self.prompt = prompt
        nan = torch.full((prompt.numel(),), float("nan"), device=prompt.device)
        return self._add_nodes(torch.full_like(prompt, -1), 0, prompt, self.tree, nan)

    def add_step(self, step: int, node: torch.Tensor, source: torch.Tensor, x: torch.Tensor, result,
                 timestep: torch.Tensor) -> torch.Tensor:
        """Record step `step` (frontier `node` ids and latents `x`; children `source` → result rows).
        Returns the node ids that stand for the new frontier."""
        level, sde = step + 1, self.plan.sde_steps[step]
        prompt, tree = self.prompt[source], self.tree[source]
        if sde:
            slot0 = self.num_parents
            self.num_parents += node.numel()
            for key, value in zip(("node", "step", "timestep", "prompt", "x"),
                                  (node, torch.full_like(node, step), timestep.float().expand(node.numel()),
                                   self.prompt, x), strict=True):
                self.parents[key].append(self._keep(value) if key in ("timestep", "x") else value)
        if level <= self.last_level or level == self.plan.num_steps:
            log_prob = result.log_prob if sde else torch.full((source.numel(),), float("nan"), device=x.device)
            new = self._add_nodes(node[source], level, prompt, tree, log_prob.float())
            if sde:
                edge = (new, slot0 + source, result.prev_sample)
                for key, value in zip(("child", "parent", "x"), edge, strict=True):
                    self.edges[key].append(self._keep(value) if key == "x" else value)
        else:
            new = node[source]  # ODE tail: the last stored ancestor stands in
        self.prompt, self.tree = prompt, tree
        return new

    def add_tail(self, node: torch.Tensor) -> torch.Tensor:
        """Record an ODE tail integrated in one go (a tail solver): the leaves, children of the level-L frontier
        `node` through an edge with NaN log-prob, as the stepwise tail records them. Returns the leaf ids."""
        nan = torch.full((node.numel(),), float("nan"), device=node.device)
        return self._add_nodes(node, self.plan.num_steps, self.prompt, self.tree, nan)

    def finish(self, leaves: torch.Tensor, leaf_node: torch.Tensor, rows: int) -> RolloutRecord:
        cpu, data = self._cat_cpu, torch.cat
        return RolloutRecord(
            plan=self.plan, num_prompts=self.num_prompts, num_trees=self.num_trees,
            parent=cpu(self.nodes["parent"]), level=cpu(self.nodes["level"]), prompt_index=cpu(self.nodes["prompt"]),
            tree_index=cpu(self.nodes["tree"]), log_prob=cpu(self.nodes["log_prob"]),
            parent_node=cpu(self.parents["node"]), parent_step=cpu(self.parents["step"]),
            parent_timestep=data(self.parents["timestep"]), parent_prompt_index=cpu(self.parents["prompt"]),
            parent_latents=data(self.parents["x"]),
            edge_child=cpu(self.edges["child"]), edge_parent=cpu(self.edges["parent"]),
            child_latents=data(self.edges["x"]),
            leaf_node=leaf_node.cpu(), leaf_latents=self._keep(leaves), rows=rows,
        )


def concat_records(records: list[RolloutRecord]) -> RolloutRecord:
    """Records of consecutive groups of prompts (rolled out one group at a time, same plan and trees per prompt) as
    the one record a single rollout of all their prompts gives: the same node, parent and edge order (each level,
    SDE step and step's edges in prompt order), ids and prompt/tree indices renumbered, leaves in image order. So
    advantages, edge selection and micro-batching see exactly what they see without groups."""
    if len(records) == 1:
        return records[0]
    first = records[0]
    if any(r.plan != first.plan or r.num_trees != first.num_trees for r in records):
        raise ValueError("concat_records: every record must have the same plan and num_trees")
    node_offset = _offsets([r.num_nodes for r in records])
    parent_offset = _offsets([r.parent_node.numel() for r in records])
    prompt_offset = _offsets([r.num_prompts for r in records])

    def joined(name: str, shift: list[int] | None = None) -> torch.Tensor:
        parts = [getattr(r, name) for r in records]
        if shift is not None:
            parts = [part + offset for part, offset in zip(parts, shift, strict=True)]
        return torch.cat(parts)

    # one rollout orders nodes by level, parents and edges by step; within each, prompt-major: a stable sort of the
    # group-major concatenation restores exactly that order
    level = joined("level")
    node_order = torch.sort(level, stable=True).indices
    new_node = torch.empty_like(node_order)
    new_node[node_order] = torch.arange(node_order.numel())
    parent = joined("parent", node_offset)
    parent = torch.where(joined("parent") >= 0, new_node[parent.clamp(min=0)], -1)

    parent_order = torch.sort(joined("parent_step"), stable=True).indices
    new_parent = torch.empty_like(parent_order)
    new_parent[parent_order] = torch.arange(parent_order.numel())
    edge_parent = new_parent[joined("edge_parent", parent_offset)]
    edge_order = torch.sort(edge_parent, stable=True).indices  # children of one parent stay contiguous, in order

    trees = [offset * first.num_trees for offset in prompt_offset]
    return RolloutRecord(
        plan=first.plan, num_prompts=sum(r.num_prompts for r in records), num_trees=first.num_trees,
        parent=parent[node_order], level=level[node_order],
        prompt_index=joined("prompt_index", prompt_offset)[node_order],
        tree_index=joined("tree_index", trees)[node_order], log_prob=joined("log_prob")[node_order],
        parent_node=new_node[joined("parent_node", node_offset)][parent_order],
        parent_step=joined("parent_step")[parent_order],
        parent_timestep=joined("parent_timestep")[parent_order.to(first.parent_timestep.device)],
        parent_prompt_index=joined("parent_prompt_index", prompt_offset)[parent_order],
        parent_latents=joined("parent_latents")[parent_order.to(first.parent_latents.device)],
        edge_child=new_node[joined("edge_child", node_offset)][edge_order], edge_parent=edge_parent[edge_order],
        child_latents=joined("child_latents")[edge_order.to(first.child_latents.device)],
        leaf_node=new_node[joined("leaf_node", node_offset)], leaf_latents=joined("leaf_latents"),
        rows=sum(r.rows for r in records),
    )


def _offsets(sizes: list[int]) -> list[int]:
    return [sum(sizes[:i]) for i in range(len(sizes))]
