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


def test_fsdp_yaml_wraps_transformer_blocks():
    config = yaml.safe_load((ROOT / "recipes" / "accelerate" / "fsdp.yaml").read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    assert "JointTransformerBlock" in config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
    assert config["mixed_precision"] == "bf16"


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
