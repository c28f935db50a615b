"""Run under torchrun (2 processes, gloo): shard a tiny SD3 transformer with LoRA by transformer block with torch's
FSDP2 `fully_shard` (the wrapping policy of recipes/accelerate/fsdp.yaml) and check forward/backward against the
unsharded model."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from diffusers_tree.testing import tiny_sd3_pipeline
from treegrpo.model.loading import add_lora, default_lora_targets


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    targets = default_lora_targets(tiny_sd3_pipeline())
    reference = tiny_sd3_pipeline().transformer
    add_lora(reference, rank=4, alpha=8, target_modules=None, seed=0, denoiser_name="transformer",
             default_targets=targets)
    sharded = tiny_sd3_pipeline().transformer
    add_lora(sharded, rank=4, alpha=8, target_modules=None, seed=0, denoiser_name="transformer",
             default_targets=targets)
    for module in (reference, sharded):  # make LoRA B non-zero so LoRA A gets gradients
        for name, param in module.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    blocks = 0
    for module in sharded.modules():
        if type(module).__name__ == "JointTransformerBlock":  # fsdp.yaml: SD3 declares it in _no_split_modules
            fully_shard(module)
            blocks += 1
    fully_shard(sharded)
    g = torch.Generator().manual_seed(rank)
    inputs = dict(hidden_states=torch.randn(2, 4, 16, 16, generator=g), timestep=torch.tensor([500.0, 200.0]),
                  encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
                  pooled_projections=torch.randn(2, 64, generator=g))
    out_ref = reference(**inputs).sample
    out_ref.square().mean().backward()
    out = sharded(**inputs).sample
    out.square().mean().backward()
    grads_ref = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    errors, sharded_params = [], 0
    for name, param in sharded.named_parameters():
        if not param.requires_grad:
            continue
        full = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        reduced = grads_ref[name].clone()
        dist.all_reduce(reduced)  # FSDP averages gradients over ranks
        errors.append(float((full - reduced / dist.get_world_size()).abs().max()))
        sharded_params += int(hasattr(param, "full_tensor"))
    result = {"rank": rank, "blocks": blocks, "forward_error": float((out - out_ref).abs().max()),
              "max_grad_error": max(errors), "trainable": len(errors), "sharded_params": sharded_params}
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    os._exit(0)
