"""Collectives of the training loop on 2 CPU processes (gloo, torchrun): one gradient all-reduce per optimizer
update under DDP, no deadlock when processes have unequal work, and under FSDP2 a true gradient norm and a moving
EMA. The checks run in `train_worker.py`; see its docstring."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("collectives") / "result"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).with_name("train_worker.py")), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]


def test_one_allreduce_per_optimizer_update(worker_results):
    for result in worker_results:
        tree = result["ddp"]["tree"]
        # 2 prompts × 3 parents (k=2, w=2) = 6 parents, micro-batches of 1, 2 updates: 3 micro-batches each.
        # The tiny LoRA fits one DDP bucket, so one all-reduce per synchronising backward.
        assert tree["trained_parents"] == 6
        assert tree["allreduce_calls"] == 2, tree


def test_unequal_work_finishes_with_matching_collectives(worker_results):
    rank0, rank1 = (result["ddp"]["flat"] for result in worker_results)
    assert rank0["trained_parents"] > rank1["trained_parents"] == 1
    # both ranks synchronised exactly once per update; rank 1 padded its updates with zero-weight micro-batches
    assert rank0["allreduce_calls"] == rank1["allreduce_calls"] == 2
    assert rank1["train_rows"] == rank0["train_rows"]  # padding rows ran through the denoiser too


def test_fsdp2_clips_the_true_norm_and_ema_moves(worker_results):
    fsdp = worker_results[0]["fsdp"]
    reference, sharded = fsdp["reference"], fsdp["sharded"]
    assert sharded["sharded_params"] > 0 and reference["sharded_params"] == 0
    assert reference["grad_norm"] > 0
    assert sharded["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)
    assert sharded["ema_moved"] > 0
    assert sharded["ema_moved"] == pytest.approx(reference["ema_moved"], rel=1e-3)


def test_non_finite_on_one_process_stops_both_with_one_line_each(worker_results):
    rank0, rank1 = (result["ddp"]["non_finite"]["message"] for result in worker_results)
    assert rank1 is not None and rank1.startswith("non-finite log-prob while re-scoring children")
    assert rank0 == "training (a non-finite log-prob, ratio or loss) failed on another process (its message is in " \
                    "that process's log)"
