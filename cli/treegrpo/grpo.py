"""One TreeGRPO epoch in small functions with typed inputs: which prompts, which noise, the advantages on the tree
(Eqs. 9–11), which edges train, and the PPO-clip update over parent nodes (Eq. 12).

All randomness is a pure function of (seed, epoch, global prompt index, tree), so every process agrees on the tree
shape, a prompt's trees are the same whichever process samples them, and a resumed run repeats exactly.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from diffusers_tree import RolloutRecord, aggregate_rewards, backup_advantages, effective_sample_size
from diffusers_tree.adapters import Conditioning, guided_model_output

from .loss import gaussian_mean_kl, grpo_edge_loss


class TrainingError(RuntimeError):
    """Training cannot continue (NaN/Inf in rewards, log-probs or loss); the last checkpoint is intact."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    value = 0x5EED
    for part in parts:
        value = (value * 6364136223846793005 + int(part) + 1442695040888963407) % (2**63 - 1)
    return value


def epoch_prompt_indices(num_prompts: int, epoch: int, per_epoch: int, seed: int) -> list[int]:
    """Global prompt indices of `epoch`: consecutive slices of seeded permutations (a fresh one per pass)."""
    indices = []
    for position in range(epoch * per_epoch, (epoch + 1) * per_epoch):
        permutation = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(
            derive_seed(seed, position // num_prompts)))
        indices.append(int(permutation[position % num_prompts]))
    return indices


def process_share(items: list, rank: int, world_size: int) -> list:
    """This process's contiguous share (a prompt's trees stay on one process, so Eq. 9 is local)."""
    per_rank = len(items) // world_size
    return items[rank * per_rank:(rank + 1) * per_rank]


def tree_generators(seed: int, epoch: int, prompt_indices: list[int], num_trees: int) -> list[torch.Generator]:
    """One generator per tree, prompt-major, seeded by (seed, epoch, global prompt, tree)."""
    return [torch.Generator().manual_seed(derive_seed(seed, epoch, p, t)) for p in prompt_indices
            for t in range(num_trees)]


@dataclass
class EdgeAdvantages:
    """Advantages of the trained edges `[E]` and diagnostics."""

    advantage: torch.Tensor  # [E] float32, Eqs. 10–11 (not yet clipped)
    leaf_advantage: torch.Tensor  # [num_leaves] Eq. 9 (aggregated over rewards)
    ess_mean: float  # mean effective sample size 1/Σw² over parents


def tree_advantages(record: RolloutRecord, rewards: torch.Tensor, weights: list[float], *, aggregation: str,
                    eps: float, weighting: str, depth_normalize: bool) -> EdgeAdvantages:
    """Eq. 9 per prompt over all its trees' leaves (one row of `rewards` `[R, num_leaves]` per reward), then the
    backup to every trained edge (Eqs. 10–11)."""
    leaf_prompt = record.leaf_prompt_index.cpu()
    leaf_adv = aggregate_rewards(rewards.cpu(), weights, leaf_prompt, mode=aggregation, eps=eps)
    parent, log_prob = record.parent.cpu(), record.log_prob.cpu()
    node_adv = backup_advantages(parent, record.node_values(leaf_adv).cpu(), log_prob, weighting,
                                 depth_normalize=depth_normalize, group_ids=record.prompt_index.cpu(), eps=eps)
    edge_adv = node_adv[record.edge_child.cpu()]
    ess = effective_sample_size(parent, log_prob)
    return EdgeAdvantages(edge_adv, leaf_adv, float(ess.mean()) if ess.numel() else float("nan"))


def select_edges(record: RolloutRecord, *, algorithm: str, timestep_fraction: float, generator: torch.Generator
                 ) -> torch.Tensor:
    """Boolean mask `[E]` of the edges to train. tree/mix: all. flat (DanceGRPO): per trajectory (leaf), a random
    `timestep_fraction` of its steps; an edge shared by several trajectories (the root's) trains if any picks it."""
    num_edges = record.edge_child.numel()
    if algorithm != "flat" or timestep_fraction >= 1:
        return torch.ones(num_edges, dtype=torch.bool)
    steps = record.plan.num_steps
    keep_steps = max(1, round(timestep_fraction * steps))
    node_of_edge = torch.full((record.num_nodes,), -1, dtype=torch.long)
    node_of_edge[record.edge_child.cpu()] = torch.arange(num_edges)
    parent, level = record.parent.cpu(), record.level.cpu()
    mask = torch.zeros(num_edges, dtype=torch.bool)
    for leaf in record.leaf_node.cpu().tolist():
        chosen = set(torch.randperm(steps, generator=generator)[:keep_steps].tolist())
        node = leaf
        while parent[node] >= 0:
            if int(level[node]) - 1 in chosen and node_of_edge[node] >= 0:
                mask[node_of_edge[node]] = True
            node = int(parent[node])
    return mask


@dataclass
class TrainStats:
    """Per-epoch training diagnostics (means over micro-batches)."""

    loss: float
    ratio_mean: float
    first_ratio_error: float  # max |ratio - 1| of the epoch's first micro-batch (must be ~0)
    clip_frac: float
    approx_kl: float
    kl: float
    grad_norm: float
    train_rows: int
    trained_edges: int
    trained_parents: int


def train_on_record(*, accelerator, adapter, scheduler, record: RolloutRecord, conditioning: Conditioning,
                    edge_advantage: torch.Tensor, edge_mask: torch.Tensor, optimizer, params, train, adv_clip: float,
                    generator: torch.Generator, reference=None, ema=None) -> TrainStats:
    """PPO-clip updates over the epoch's parents: one forward with grad per parent node (CFG exactly as sampled)
    gives the new log-prob of all its children; `updates_per_epoch` optimizer steps, each accumulating over
    micro-batches of `micro_batch_size` parents. `reference()` is a context manager disabling the adapter (KL)."""
    parent_of_edge = record.edge_parent.cpu()
    trained = torch.zeros(record.parent_node.numel(), dtype=torch.bool)
    trained[parent_of_edge[edge_mask]] = True
    parents = trained.nonzero().squeeze(1)
    parents = parents[torch.randperm(parents.numel(), generator=generator)]
    cfg = 2 if conditioning.do_cfg else 1
    updates = [chunk for chunk in parents.chunk(train.updates_per_epoch) if chunk.numel()]
    totals = {"loss": 0.0, "ratio": 0.0, "clip": 0.0, "akl": 0.0, "kl": 0.0, "grad": 0.0}
    first_error, micro_batches, rows = None, 0, 0
    for update in updates:
        in_update = torch.isin(parent_of_edge, update) & edge_mask
        normalizer = int(in_update.sum())
        batches = update.split(train.micro_batch_size)
        for b, batch in enumerate(batches):
            edges = (torch.isin(parent_of_edge, batch) & edge_mask).nonzero().squeeze(1)
            out = _micro_batch_loss(accelerator, adapter, scheduler, record, conditioning, batch, edges,
                                    edge_advantage, train, adv_clip, normalizer, reference)
            sync = b == len(batches) - 1
            with (nullcontext() if sync else accelerator.no_sync(adapter.model)):
                accelerator.backward(out.loss)
            for value in (out.ratio_mean, out.approx_kl, float(out.loss.detach())):
                if not torch.isfinite(torch.tensor(value)):
                    raise TrainingError(f"Non-finite loss or ratio in training (loss={float(out.loss)}, "
                                        f"ratio={out.ratio_mean}); stopping. The last checkpoint is intact.")
            if first_error is None:
                first_error = out.ratio_max_error
            totals["loss"] += float(out.loss.detach())  # micro-batch losses of an update sum to its mean
            totals["ratio"] += out.ratio_mean
            totals["clip"] += out.clip_frac
            totals["akl"] += out.approx_kl
            totals["kl"] += out.kl
            micro_batches += 1
            rows += batch.numel() * cfg
        grad_norm = accelerator.clip_grad_norm_(params, train.max_grad_norm)
        totals["grad"] += float(grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
    n = max(micro_batches, 1)
    return TrainStats(loss=totals["loss"] / max(len(updates), 1), ratio_mean=totals["ratio"] / n,
                      first_ratio_error=first_error or 0.0, clip_frac=totals["clip"] / n,
                      approx_kl=totals["akl"] / n, kl=totals["kl"] / n,
                      grad_norm=totals["grad"] / max(len(updates), 1), train_rows=rows,
                      trained_edges=int(edge_mask.sum()), trained_parents=int(parents.numel()))


def _micro_batch_loss(accelerator, adapter, scheduler, record, conditioning, batch, edges, edge_advantage, train,
                      adv_clip, normalizer, reference):
    device = record.parent_latents.device
    batch_d = batch.to(device)
    latents = record.parent_latents[batch_d]
    with accelerator.autocast():
        model_output = guided_model_output(adapter, latents, record.parent_timestep[batch_d],
                                           record.parent_prompt_index[batch_d], conditioning)
    slot = torch.full((record.parent_node.numel(),), -1, dtype=torch.long)
    slot[batch] = torch.arange(batch.numel())
    local_parent = slot[record.edge_parent.cpu()[edges]].to(device)
    edges_d = edges.to(device)
    steps = record.edge_step[edges_d]
    result = scheduler.transition(model_output[local_parent], latents[local_parent], steps, stochastic=True,
                                  prev_sample=record.child_latents[edges_d])
    old = record.edge_log_prob[edges_d]
    if not torch.isfinite(result.log_prob).all():
        raise TrainingError("Non-finite log-prob while re-scoring children; stopping. The last checkpoint is intact.")
    kl = None
    if train.kl_beta > 0 and reference is not None:
        with torch.no_grad(), reference(), accelerator.autocast():
            ref_output = guided_model_output(adapter, latents, record.parent_timestep[batch_d],
                                             record.parent_prompt_index[batch_d], conditioning)
        ref = scheduler.transition(ref_output[local_parent], latents[local_parent], steps, stochastic=True,
                                   prev_sample=record.child_latents[edges_d])
        kl = gaussian_mean_kl(result.mean, ref.mean, result.std)
    return grpo_edge_loss(result.log_prob, old, edge_advantage.to(device)[edges_d], clip_range=train.clip_range,
                          adv_clip=adv_clip, normalizer=normalizer, kl=kl, kl_beta=train.kl_beta)

