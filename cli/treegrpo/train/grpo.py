"""One TreeGRPO epoch in small functions with typed inputs: which prompts, which noise, the advantages on the tree
(Eqs. 9–11), which edges train, and the PPO-clip update over parent nodes (Eq. 12).

All randomness is a pure function of (seed, epoch, global prompt index, tree), so every process agrees on the tree
shape, a prompt's trees are the same whichever process samples them, and a resumed run repeats exactly.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

from diffusers_tree import RolloutRecord, aggregate_rewards, backup_advantages, effective_sample_size
from diffusers_tree.adapters import Conditioning, guided_model_output
from treegrpo.errors import TrainingError
from treegrpo.run.seeds import prompt_order_generator
from treegrpo.train.loss import LossOutput, gaussian_mean_kl, grpo_edge_loss


def stop_together(accelerator, failure: TrainingError | None, what: str) -> None:
    """Stop every process when `what` failed on any of them: one all-reduce of a failure flag, which every process
    must reach. The failing process raises its own message, the others a line saying where to look; otherwise the
    healthy processes die in their next collective (a gloo traceback that hides the cause) or wait for the NCCL
    timeout."""
    flag = torch.tensor([0.0 if failure is None else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    if failure is not None:
        raise failure
    if float(flag) > 0:
        raise TrainingError(f"{what} failed on another process (its message is in that process's log)")


def epoch_prompt_indices(num_prompts: int, epoch: int, per_epoch: int, seed: int) -> list[int]:
    """Global prompt indices of `epoch`: consecutive slices of seeded permutations (a fresh one per pass)."""
    indices = []
    for position in epoch_positions(epoch, per_epoch):
        permutation = torch.randperm(num_prompts, generator=prompt_order_generator(seed, position // num_prompts))
        indices.append(int(permutation[position % num_prompts]))
    return indices


def epoch_positions(epoch: int, per_epoch: int) -> list[int]:
    """Run-wide positions of the epoch's prompt slots, `epoch · per_epoch …`: what a group's randomness is keyed on,
    so that a prompt drawn twice in one epoch gets two different trees."""
    return list(range(epoch * per_epoch, (epoch + 1) * per_epoch))


def process_share(items: list, rank: int, world_size: int) -> list:
    """This process's contiguous share (a prompt's trees stay on one process, so Eq. 9 is local)."""
    per_rank = len(items) // world_size
    return items[rank * per_rank:(rank + 1) * per_rank]


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
    leaf_adv = aggregate_rewards(rewards.cpu(), weights, record.leaf_prompt_index, mode=aggregation, eps=eps)
    parent, log_prob = record.parent, record.log_prob  # CPU, like every index array of the record
    node_adv = backup_advantages(parent, record.node_values(leaf_adv), log_prob, weighting,
                                 depth_normalize=depth_normalize, group_ids=record.prompt_index, eps=eps)
    edge_adv = node_adv[record.edge_child]
    ess = effective_sample_size(parent, log_prob)
    return EdgeAdvantages(edge_adv, leaf_adv, float(ess.mean()) if ess.numel() else float("nan"))


def flat_trained_steps(num_steps: int, timestep_fraction: float) -> tuple[int, int]:
    """(steps a flat trajectory may train, steps it trains), as DanceGRPO and Flow-GRPO do it: the last transition
    is never trained, and `int(timestep_fraction · (T − 1))` of the other T − 1 are drawn per trajectory (int()
    truncates as theirs does: T = 10 and 0.6 train 5 of steps 0..8; fraction 1 trains steps 0..T−2, Flow-GRPO's)."""
    eligible = max(num_steps - 1, 1)
    return eligible, max(1, int(timestep_fraction * eligible))


def flow_grpo_kl_factor(scheduler, steps: torch.Tensor) -> torch.Tensor:
    """Per edge, the factor that turns the exact KL `mean_d (μθ − μref)² / (2·std²)` into Flow-GRPO's, so a β tuned
    for Flow-GRPO means the same here. Flow-GRPO divides by its `std_dev_t`²:
    - `flow_sde` / `dance_sde`: `std_dev_t` is the diffusion coefficient s, without the √|dt| of the transition's
      std = s·√|dt|, so the factor is |σ' − σ|;
    - `cps`: `std_dev_t` = σ'·sin(ηπ/2) is the transition's real std, so its KL is the exact one: factor 1.
    Flow-matching schedules only (a DDPM step has no |dt| in its noise)."""
    if scheduler.family != "flow":
        raise ValueError("train.kl_scale = 'flow_grpo' needs a flow-matching model (SD3, FLUX, ...); this model's "
                         f"scheduler is {scheduler.family!r}. Use kl_scale = 'exact'.")
    if scheduler.config.sde_type == "cps":
        return torch.ones(steps.shape, dtype=torch.float32)
    sigmas = scheduler.sigma_table
    return (sigmas[steps + 1] - sigmas[steps]).abs()


def select_edges(record: RolloutRecord, *, algorithm: str, timestep_fraction: float,
                 generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Boolean mask `[E]` of the edges to train. tree/mix: all. flat: per trajectory (leaf), the steps
    `flat_trained_steps` picks (never the last); an edge shared by several trajectories (the root's) trains if any
    picks it.
    `generator` may be one generator per tree (`record.num_prompts · num_trees`, prompt-major): then a tree's choice
    does not depend on which process trains it. The counts can differ between processes either way;
    `train_on_record` keeps the processes' collectives in step."""
    num_edges = record.edge_child.numel()
    if algorithm != "flat":
        return torch.ones(num_edges, dtype=torch.bool)
    eligible, keep_steps = flat_trained_steps(record.plan.num_steps, timestep_fraction)
    node_of_edge = torch.full((record.num_nodes,), -1, dtype=torch.long)
    node_of_edge[record.edge_child] = torch.arange(num_edges)
    parent, level = record.parent, record.level
    mask = torch.zeros(num_edges, dtype=torch.bool)
    for position, leaf in enumerate(record.leaf_node.tolist()):
        tree_generator = generator[position // record.plan.num_leaves] if isinstance(generator, list) else generator
        chosen = set(torch.randperm(eligible, generator=tree_generator)[:keep_steps].tolist())
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
    ratio_drift: float  # mean |ratio - 1|
    first_ratio_error: float  # max |ratio - 1| of the epoch's first micro-batch (must be ~0)
    clip_frac: float
    approx_kl: float
    kl: float
    grad_norm: float
    train_rows: int
    trained_edges: int
    trained_parents: int


def update_plan(parents: torch.Tensor, updates_per_epoch: int, micro_batch_size: int) -> list[list[torch.Tensor]]:
    """This process's parents split into exactly `updates_per_epoch` optimizer updates (sizes differ by at most one;
    an update may be empty when there are fewer parents than updates), each split into micro-batches."""
    return [list(update.split(micro_batch_size)) if update.numel() else []
            for update in parents.tensor_split(updates_per_epoch)]


def agreed_micro_batches(accelerator, plan: list[list[torch.Tensor]]) -> list[int]:
    """Micro-batches per update that every process runs: the most any process has (one all-gather).

    A forward under FSDP and the synchronising backward under DDP are collectives: if one process ran fewer, the
    others would wait for it forever. Processes whose own share is shorter run zero-weight padding micro-batches,
    so the counts match whatever each process's data (flat's random edge selection, uneven parent counts)."""
    counts = torch.tensor([len(update) for update in plan], dtype=torch.long, device=accelerator.device)
    if accelerator.num_processes == 1:
        return counts.tolist()
    gathered = accelerator.gather(counts).reshape(accelerator.num_processes, -1)
    return gathered.max(dim=0).values.tolist()


@dataclass
class _Sums:
    """Running sums over an epoch's micro-batches and updates (named, not `totals["akl"]`)."""

    loss: float = 0.0  # micro-batch losses of an update sum to its mean
    ratio: float = 0.0
    ratio_drift: float = 0.0
    clip_frac: float = 0.0
    approx_kl: float = 0.0
    kl: float = 0.0
    grad_norm: float = 0.0
    micro_batches: int = 0
    updates: int = 0
    rows: int = 0
    first_ratio_error: float | None = None

    def add(self, out: LossOutput) -> None:
        if self.first_ratio_error is None:
            self.first_ratio_error = out.ratio_max_error
        self.loss += float(out.loss.detach())
        self.ratio += out.ratio_mean
        self.ratio_drift += out.ratio_drift
        self.clip_frac += out.clip_frac
        self.approx_kl += out.approx_kl
        self.kl += out.kl
        self.micro_batches += 1


def train_on_record(*, accelerator, adapter, scheduler, record: RolloutRecord, conditioning: Conditioning,
                    edge_advantage: torch.Tensor, edge_mask: torch.Tensor, optimizer, params, train, adv_clip: float,
                    generator: torch.Generator, reference=None, ema=None) -> TrainStats:
    """PPO-clip updates over the epoch's parents: one forward with grad per parent node (CFG exactly as sampled)
    gives the new log-prob of all its children; `updates_per_epoch` optimizer steps, each accumulating over
    micro-batches of `micro_batch_size` parents. `reference()` is a context manager disabling the adapter (KL).

    Distributed: every process runs the same number of micro-batches per update (`agreed_micro_batches`), and all
    but the last micro-batch of an update run forward AND backward inside `no_sync` (DDP only skips its gradient
    all-reduce when the forward ran inside it), so there is one gradient all-reduce per optimizer update."""
    trained = torch.zeros(record.parent_node.numel(), dtype=torch.bool)
    trained[record.edge_parent[edge_mask]] = True
    parents = trained.nonzero().squeeze(1)
    parents = parents[torch.randperm(parents.numel(), generator=generator)]
    plan = update_plan(parents, train.updates_per_epoch, train.micro_batch_size)
    # a padding micro-batch re-runs one real parent at zero weight (any parent of the record will do)
    padding_batch = parents[:1] if parents.numel() else torch.zeros(1, dtype=torch.long)
    sums = _Sums()

    def micro_batch_loss(batch, normalizer):
        return _micro_batch_loss(accelerator, adapter, scheduler, record, conditioning, batch, edge_mask,
                                 edge_advantage, train, adv_clip, normalizer, reference)

    for batches, planned in zip(plan, agreed_micro_batches(accelerator, plan), strict=True):
        if planned == 0:  # no process has parents for this update
            continue
        normalizer = max(int((torch.isin(record.edge_parent, torch.cat(batches)) & edge_mask).sum()), 1) \
            if batches else 1
        real = len(batches)
        _accumulate_update(accelerator, adapter.model, [*batches, *[padding_batch] * (planned - real)], real,
                           micro_batch_loss, normalizer, sums, rows_per_parent=2 if conditioning.do_cfg else 1)
        sums.grad_norm += _to_float(accelerator.clip_grad_norm_(params, train.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sums.updates += 1
        if ema is not None:
            ema.update()
    n, updates = max(sums.micro_batches, 1), max(sums.updates, 1)
    return TrainStats(loss=sums.loss / updates, ratio_mean=sums.ratio / n, ratio_drift=sums.ratio_drift / n,
                      first_ratio_error=sums.first_ratio_error or 0.0, clip_frac=sums.clip_frac / n,
                      approx_kl=sums.approx_kl / n, kl=sums.kl / n, grad_norm=sums.grad_norm / updates,
                      train_rows=sums.rows, trained_edges=int(edge_mask.sum()), trained_parents=int(parents.numel()))


def _accumulate_update(accelerator, model, batches: list[torch.Tensor], real: int, micro_batch_loss, normalizer: int,
                       sums: _Sums, rows_per_parent: int) -> None:
    """One optimizer update's micro-batches, forward and backward each, all but the last inside `no_sync`; the
    first `real` hold this process's parents, the rest are zero-weight padding so that every process runs the same
    collectives. A non-finite micro-batch is noted, not raised: this process still runs the update's remaining
    forwards and backward (collectives under DDP/FSDP), and every process learns of it at the same point."""
    failure = None
    for b, batch in enumerate(batches):
        padding = b >= real
        with nullcontext() if b == len(batches) - 1 else accelerator.no_sync(model):
            out = micro_batch_loss(batch, normalizer)
            accelerator.backward(out.loss * 0.0 if padding else out.loss)
        sums.rows += batch.numel() * rows_per_parent
        if padding or failure is not None:
            continue
        failure = _non_finite(out)
        if failure is None:
            sums.add(out)
    stop_together(accelerator, failure, "training (a non-finite log-prob, ratio or loss)")


def _non_finite(out: LossOutput) -> TrainingError | None:
    """The error to stop with when a micro-batch's re-scored log-probs, ratio or loss are NaN/Inf, else `None`."""
    if not out.log_prob_finite:
        return TrainingError("non-finite log-prob while re-scoring children (NaN/Inf in the model output: try a "
                             "lower learning rate, or fp32/bf16 instead of fp16); stopping")
    values = {"loss": float(out.loss.detach()), "ratio": out.ratio_mean, "approx_kl": out.approx_kl}
    if all(torch.isfinite(torch.tensor(value)) for value in values.values()):
        return None
    described = ", ".join(f"{name}={value}" for name, value in values.items())
    return TrainingError(f"non-finite loss or ratio in training ({described}); stopping")


def _to_float(value) -> float:
    """A gradient norm as a float; under FSDP2 it is a DTensor (replicated) that must be materialised first."""
    if value is None:
        return float("nan")
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


def _micro_batch_loss(accelerator, adapter, scheduler, record: RolloutRecord, conditioning, batch, edge_mask,
                      edge_advantage, train, adv_clip, normalizer, reference):
    """Loss of the trained edges below the parents `batch` (a CPU index into the record's parent arrays).

    Index arrays stay on the CPU (the record's and the scheduler's); latents, timesteps and advantages go to the
    accelerator's device, which is where the model runs whatever device the record's latents were kept on."""
    device = accelerator.device
    edges = (torch.isin(record.edge_parent, batch) & edge_mask).nonzero().squeeze(1)
    latents = record.parent_latents[batch].to(device)
    timesteps = record.parent_timestep[batch].to(device)
    prompt_index = record.parent_prompt_index[batch].to(device)
    with accelerator.autocast():
        model_output = guided_model_output(adapter, latents, timesteps, prompt_index, conditioning)
    slot = torch.full((record.parent_node.numel(),), -1, dtype=torch.long)
    slot[batch] = torch.arange(batch.numel())
    local_parent = slot[record.edge_parent[edges]]
    steps = record.edge_step[edges]
    children = record.child_latents[edges].to(device)
    result = scheduler.transition(model_output[local_parent], latents[local_parent], steps, stochastic=True,
                                  prev_sample=children)
    old = record.edge_log_prob[edges].to(device)
    kl = None
    if train.kl_beta > 0 and reference is not None:
        with torch.no_grad(), reference(), accelerator.autocast():
            ref_output = guided_model_output(adapter, latents, timesteps, prompt_index, conditioning)
        ref = scheduler.transition(ref_output[local_parent], latents[local_parent], steps, stochastic=True,
                                   prev_sample=children)
        kl = gaussian_mean_kl(result.mean, ref.mean, result.std)
        if train.kl_scale == "flow_grpo":
            kl = kl * flow_grpo_kl_factor(scheduler, steps).to(kl.device)
    out = grpo_edge_loss(result.log_prob, old, edge_advantage[edges].to(device), clip_range=train.clip_range,
                         adv_clip=adv_clip, normalizer=normalizer, kl=kl, kl_beta=train.kl_beta)
    return replace(out, log_prob_finite=bool(torch.isfinite(result.log_prob).all()))
