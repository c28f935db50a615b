"""FSDP cannot be set up by accelerate on CPU, so the wrapping policy of recipes/accelerate/fsdp.yaml (one FSDP2
unit per transformer block, LoRA on the attention projections) is checked with torch's own `fully_shard` on gloo:
forward and LoRA gradients equal the unsharded model's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).resolve().parents[2]


def _plugin(names):
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          transformer_cls_names_to_wrap=names)


@pytest.mark.parametrize("family", ["sd3", "flux", "sdxl"])
def test_fsdp_yaml_wraps_each_familys_blocks_through_accelerate(family):
    """The shipped fsdp.yaml, through accelerate's own FSDP2 wrap-policy code and the trainer's alignment, wraps the
    blocks of every family. On the first GPU run the yaml named the blocks of all families and accelerate refused
    SD3 ("Could not find the transformer layer class FluxTransformerBlock")."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from diffusers_tree import testing
    from treegrpo.run.setup import align_fsdp_wrap_classes

    config = yaml.safe_load((ROOT / "recipes" / "accelerate" / "fsdp.yaml").read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    assert config["mixed_precision"] == "bf16"
    assert config["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    names = config["fsdp_config"].get("fsdp_transformer_layer_cls_to_wrap")
    pipe = getattr(testing, f"tiny_{family}_pipeline")()
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    plugin = _plugin(names.split(",") if names else None)
    align_fsdp_wrap_classes(plugin, denoiser)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, denoiser)
    wrapped = {type(module).__name__ for module in denoiser.modules() if policy(module)}
    expected = {"sd3": {"JointTransformerBlock"}, "flux": {"FluxTransformerBlock", "FluxSingleTransformerBlock"},
                "sdxl": {"BasicTransformerBlock"}}[family]
    assert expected <= wrapped


def test_wrap_classes_the_model_lacks_are_dropped_not_fatal():
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from diffusers_tree.testing import tiny_sd3_pipeline
    from treegrpo.run.setup import align_fsdp_wrap_classes

    denoiser = tiny_sd3_pipeline().transformer
    plugin = _plugin(["JointTransformerBlock", "FluxTransformerBlock", "BasicTransformerBlock"])
    with pytest.raises(ValueError, match="FluxTransformerBlock"):  # accelerate alone
        fsdp2_prepare_auto_wrap_policy(plugin, denoiser)
    plugin = _plugin(["JointTransformerBlock", "FluxTransformerBlock", "BasicTransformerBlock"])
    assert align_fsdp_wrap_classes(plugin, denoiser) == ["FluxTransformerBlock", "BasicTransformerBlock"]
    assert plugin.transformer_cls_names_to_wrap == ["JointTransformerBlock"]
    fsdp2_prepare_auto_wrap_policy(plugin, denoiser)
    # none present: accelerate's default, the model's _no_split_modules
    plugin = _plugin(["FluxTransformerBlock"])
    assert align_fsdp_wrap_classes(plugin, denoiser) == ["FluxTransformerBlock"]
    assert plugin.transformer_cls_names_to_wrap is None
    policy = fsdp2_prepare_auto_wrap_policy(plugin, denoiser)
    assert any(policy(module) for module in denoiser.transformer_blocks)


def test_fully_shard_by_block_matches_unsharded(tmp_path):
    out = tmp_path / "fsdp.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).with_name("fsdp_worker.py")), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["blocks"] == 2 and result["sharded_params"] > 0
    assert result["forward_error"] < 1e-5
    assert result["max_grad_error"] < 1e-6
