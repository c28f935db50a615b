"""Run under torchrun (2 processes, gloo) by test_train_collectives.py: the real `prepare_training` and
`train_on_record` on a tiny SD3 pipeline with LoRA, checked for what only several processes show.

1. DDP (accelerate, MULTI_CPU): a comm hook counts the gradient all-reduces; with several micro-batches per update
   there must be one synchronising backward per optimizer update.
2. DDP with unequal work: rank 0 trains every edge, rank 1 the edges of one parent (flat's random edge selection
   gives such splits); both must finish (no rank left waiting in a collective) with the same all-reduce count.
3. FSDP2 (torch's `fully_shard`, the policy of recipes/accelerate/fsdp.yaml; accelerate does not set up FSDP on CPU):
   the parameters that clipping and EMA act on are the sharded ones, so `grad_norm` equals the unsharded model's and
   the EMA moves.
"""

import json
import os
import sys
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from diffusers_tree import TreeRolloutPipeline, TreeSDEScheduler
from diffusers_tree.adapters import adapter_for
from diffusers_tree.testing import tiny_sd3_pipeline
from treegrpo.model.loading import add_lora, default_lora_targets
from treegrpo.recipe.schema import TrainRecipe
from treegrpo.run.setup import prepare_training
from treegrpo.train.grpo import train_on_record, tree_advantages

PROMPTS = ["a red cat", "a blue dog"]
SIZE = dict(height=32, width=32, max_sequence_length=16)


def lora_pipeline():
    pipe = tiny_sd3_pipeline()
    add_lora(pipe.transformer, rank=4, alpha=8, target_modules=None, seed=0, denoiser_name="transformer",
             default_targets=default_lora_targets(pipe))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rollout(pipe, algorithm: str, seed: int):
    scheduler = TreeSDEScheduler.from_scheduler(pipe.scheduler, branch_factor=2, window_width=2, window_start=1,
                                                algorithm=algorithm)
    tree = TreeRolloutPipeline(pipe, scheduler)
    conditioning = tree.encode(PROMPTS, guidance_scale=3.0, **SIZE)
    generators = [torch.Generator().manual_seed(seed * 100 + i) for i in range(len(PROMPTS))]
    out = tree(PROMPTS, num_inference_steps=4, conditioning=conditioning, generator=generators, output_type="latent")
    record = out.record
    rewards = torch.randn(1, record.leaf_node.numel(), generator=torch.Generator().manual_seed(seed))
    adv = tree_advantages(record, rewards, [1.0], aggregation="advantage", eps=1e-4, weighting="prob",
                          depth_normalize=False)
    return tree, record, conditioning, adv.advantage


def train(accelerator, tree, record, conditioning, advantage, mask, optimizer, params, recipe, ema=None):
    return train_on_record(accelerator=accelerator, adapter=tree.adapter, scheduler=tree.scheduler, record=record,
                           conditioning=conditioning, edge_advantage=advantage, edge_mask=mask, optimizer=optimizer,
                           params=params, train=recipe, adv_clip=5.0, generator=torch.Generator().manual_seed(1),
                           ema=ema)


def ddp_checks(rank: int) -> dict:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    recipe = TrainRecipe(micro_batch_size=1, updates_per_epoch=2, learning_rate=1e-3)
    pipe = lora_pipeline()
    model, optimizer, params, _ = prepare_training(accelerator, pipe.transformer, recipe)
    calls = [0]

    def counting_hook(state, bucket):
        calls[0] += 1
        return allreduce_hook(None, bucket)

    model.register_comm_hook(None, counting_hook)
    result = {}
    for algorithm in ("tree", "flat"):
        tree, record, conditioning, advantage = rollout(pipe, algorithm, seed=rank)
        tree.adapter.model = model
        mask = torch.ones(record.edge_child.numel(), dtype=torch.bool)
        if algorithm == "flat" and rank == 1:  # far fewer parents than rank 0: unequal micro-batch counts
            mask = record.edge_parent == record.edge_parent[-1]
        calls[0] = 0
        stats = train(accelerator, tree, record, conditioning, advantage, mask, optimizer, params, recipe)
        result[algorithm] = {"allreduce_calls": calls[0], "trained_parents": stats.trained_parents,
                             "train_rows": stats.train_rows, "grad_norm": stats.grad_norm}
    result["non_finite"] = non_finite_on_rank_1(accelerator, pipe, model, optimizer, params, recipe, rank)
    return result


def non_finite_on_rank_1(accelerator, pipe, model, optimizer, params, recipe, rank: int) -> dict:
    """4. A NaN child latent on rank 1 only (its re-scored log-prob is NaN): both ranks must stop with a
    TrainingError at the same point, rank 1 with the cause, rank 0 pointing to it; before, rank 1 raised alone and
    rank 0 died in its next collective (or waited for the NCCL timeout)."""
    from treegrpo.errors import TrainingError

    tree, record, conditioning, advantage = rollout(pipe, "tree", seed=rank)
    tree.adapter.model = model
    if rank == 1:
        record.child_latents[0] = float("nan")
    mask = torch.ones(record.edge_child.numel(), dtype=torch.bool)
    try:
        train(accelerator, tree, record, conditioning, advantage, mask, optimizer, params, recipe)
    except TrainingError as err:
        message = str(err)
    else:
        message = None
    dist.barrier()  # both ranks are still in step after the failure
    return {"message": message}


class ShardingAccelerator:
    """What the trainer uses of accelerate, with `prepare` doing what accelerate's FSDP2 path does: `fully_shard`
    per transformer block and at the root, then point the optimizer at the new (sharded) parameters."""

    device = torch.device("cpu")

    def __init__(self, shard: bool):
        self.shard = shard
        self.num_processes = dist.get_world_size() if shard else 1

    def prepare(self, model, optimizer):
        if self.shard:
            from torch.distributed.fsdp import fully_shard

            for module in model.modules():
                if type(module).__name__ == "JointTransformerBlock":
                    fully_shard(module)
            fully_shard(model)
            optimizer.param_groups[0]["params"] = [p for p in model.parameters() if p.requires_grad]
        return model, optimizer

    @contextmanager
    def no_sync(self, model):
        if self.shard:
            model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            if self.shard:
                model.set_requires_gradient_sync(True)

    def autocast(self):
        return nullcontext()

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)

    def gather(self, tensor):
        parts = [torch.empty_like(tensor) for _ in range(self.num_processes)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    def register_for_checkpointing(self, obj):
        pass


def fsdp_checks() -> dict:
    recipe = TrainRecipe(micro_batch_size=2, updates_per_epoch=1, learning_rate=1e-2, max_grad_norm=1e6,
                         ema_decay=0.5)
    result = {}
    record_source = lora_pipeline()
    tree, record, conditioning, advantage = rollout(record_source, "tree", seed=0)  # the same on both ranks
    mask = torch.ones(record.edge_child.numel(), dtype=torch.bool)
    for name, shard in (("reference", False), ("sharded", True)):
        pipe = lora_pipeline()
        accelerator = ShardingAccelerator(shard)
        model, optimizer, params, ema = prepare_training(accelerator, pipe.transformer, recipe)
        adapter = adapter_for(pipe)
        adapter.model = model
        tree.adapter = adapter
        before = [s.full_tensor() if hasattr(s, "full_tensor") else s.clone() for s in ema.shadow]
        stats = train(accelerator, tree, record, conditioning, advantage, mask, optimizer, params, recipe, ema=ema)
        after = [s.full_tensor() if hasattr(s, "full_tensor") else s for s in ema.shadow]
        result[name] = {"grad_norm": stats.grad_norm,
                        "ema_moved": max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True)),
                        "sharded_params": sum(int(hasattr(p, "full_tensor")) for p in params)}
    return result


def main(out_path: str) -> None:
    torch.manual_seed(0)
    rank = int(os.environ["RANK"])
    result = {"rank": rank, "ddp": ddp_checks(rank), "fsdp": fsdp_checks()}
    with open(f"{out_path}.{rank}", "w") as handle:
        json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    os._exit(0)
