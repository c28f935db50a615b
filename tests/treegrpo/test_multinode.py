"""Two "nodes" on this machine: two launches (`accelerate launch --num_machines 2` or torchrun `--nnodes 2`, ranks 0
and 1, one process each) meeting over loopback with gloo, writing to one run folder as nodes on a shared filesystem
do. The run must equal the same recipe as 2 processes on one node, and a kill of one node must leave a run that
resumes to the same result."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import write_recipe
from .test_distributed import _env

pytestmark = pytest.mark.multiprocess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_command(rank: int, port: int, args: list[str], launcher: str = "torchrun") -> list[str]:
    """One node's launch: `torchrun` (`--nnodes 2 --node_rank`) or `accelerate launch` (`--num_machines 2
    --machine_rank`, the flags the multi-node configs in recipes/accelerate/ document; with no GPU accelerate's
    multi-GPU launcher runs the processes on the CPU over gloo)."""
    if launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                "treegrpo", "run", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
            "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "treegrpo",
            "run", *args]


def run_two_nodes(args: list[str], timeout: float = 600, env=None, launcher: str = "torchrun"
                  ) -> list[subprocess.CompletedProcess]:
    port = free_port()
    nodes = [subprocess.Popen(node_command(rank, port, args, launcher), env=env or _env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    done = []
    for node in nodes:
        out, err = node.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    return done


def kill_node(agent: int) -> None:
    """SIGKILL a torchrun agent and its workers (which torchrun starts in sessions of their own)."""
    workers = [int(pid) for task in Path(f"/proc/{agent}/task").iterdir()
               for pid in (task / "children").read_text().split()]
    for pid in [agent, *workers]:
        os.kill(pid, signal.SIGKILL)


def metrics_of(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


SLOW_REWARD = ("import time\nimport numpy as np\n"  # slow enough that a kill or a signal lands mid-run
               "def slow_brightness(images, prompts):\n    time.sleep(0.3)\n"
               "    return [float(np.asarray(i, dtype=np.float32).mean()) / 255 for i in images]\n")


def test_two_nodes_equal_one_node_survive_a_lost_node_and_stop_together(workdir, tiny_sd3_dir):
    (workdir / "slow_rewards.py").write_text(SLOW_REWARD)
    recipe = write_recipe(workdir, tiny_sd3_dir, epochs=4, name="nodes.toml")
    env = dict(_env(), PYTHONPATH=os.pathsep.join([str(workdir), os.environ.get("PYTHONPATH", "")]))
    common = [str(recipe), "--set", 'reward.0.function="slow_rewards:slow_brightness"']
    every_epoch = [*common, "--set", "output.checkpoint_every=1"]

    # 1. two nodes (one process each) = two processes on one node, bit for bit, one writer on the shared folder
    one_node = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "treegrpo", "run", *every_epoch, "--set",
                               f"output.dir={json.dumps(str(workdir / 'one_node'))}"],
                              env=env, capture_output=True, text=True, timeout=600)
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    nodes = run_two_nodes([*every_epoch, "--set", f"output.dir={json.dumps(str(workdir / 'two_nodes'))}"], env=env,
                          launcher="accelerate")
    assert [n.returncode for n in nodes] == [0, 0], nodes[0].stderr[-2000:] + nodes[1].stderr[-2000:]
    for a, b in zip(metrics_of(workdir / "one_node"), metrics_of(workdir / "two_nodes"), strict=True):
        for key in ("tree/window_start", "model/rollout_rows", "model/train_rows", "reward/mean", "train/grad_norm"):
            assert a[key] == b[key], key  # the same ranks doing the same work: identical, not merely close
    reference = load_file(workdir / "two_nodes" / "final" / "pytorch_lora_weights.safetensors")
    first = load_file(workdir / "one_node" / "final" / "pytorch_lora_weights.safetensors")
    assert first.keys() == reference.keys() and all(torch.equal(first[k], reference[k]) for k in first)
    checkpoints = sorted(p.name for p in (workdir / "two_nodes" / "checkpoints").iterdir())
    assert checkpoints == sorted(p.name for p in (workdir / "one_node" / "checkpoints").iterdir())
    assert [m["epoch"] for m in metrics_of(workdir / "two_nodes")] == [0, 1, 2, 3]

    # 2. a node lost (SIGKILL to its torchrun and worker): the other stops in one line; --resume on both nodes ends
    # with the uninterrupted run's weights (launched with torchrun: both launchers run the same run)
    killed = [*every_epoch, "--set", f"output.dir={json.dumps(str(workdir / 'killed'))}"]
    nodes = start_after(killed, env, workdir / "killed" / "checkpoints" / "epoch-000001")
    kill_node(nodes[1].pid)
    nodes[1].communicate(timeout=60)
    _, err = nodes[0].communicate(timeout=120)
    assert nodes[0].returncode != 0  # node 0 cannot go on without it, and says so in one line, not a traceback
    assert "another process of this run is gone (crashed, killed, or its node lost)" in err, err[-3000:]
    assert "start every node again with --resume" in err
    # no worker traceback (torchrun's own ChildFailedError report of the exit codes remains)
    assert not [line for line in err.splitlines() if line.startswith("[rank") and "Traceback" in line]
    assert len(metrics_of(workdir / "killed")) < 4
    resumed = run_two_nodes([*killed, "--resume"], env=env)
    assert [n.returncode for n in resumed] == [0, 0], resumed[0].stderr[-2000:] + resumed[1].stderr[-2000:]
    assert [m["epoch"] for m in metrics_of(workdir / "killed")] == [0, 1, 2, 3]
    weights = load_file(workdir / "killed" / "final" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(reference[k], weights[k]) for k in reference)  # exact resume across nodes

    # 3. preempted (SIGTERM to every node's torchrun, as SLURM's --signal does): every rank stops at the same safe
    # point and one checkpoint is written (checkpoint_every is larger than the run: only the signal's)
    preempted = [*common, "--set", "output.checkpoint_every=100", "--set",
                 f"output.dir={json.dumps(str(workdir / 'preempted'))}"]
    nodes = start_after(preempted, env, workdir / "preempted" / "metrics.jsonl")
    for node in nodes:
        node.send_signal(signal.SIGTERM)
    errors = [node.communicate(timeout=120)[1] for node in nodes]
    said = [re.search(r"interrupted: SIGTERM: checkpoint of (\d+) completed epochs", err) for err in errors]
    assert all(said), errors[0][-2000:]
    assert said[0].group(1) == said[1].group(1)
    written = [p.name for p in (workdir / "preempted" / "checkpoints").iterdir()]
    assert written == [f"epoch-{int(said[0].group(1)):06d}"]


def start_after(args: list[str], env: dict, appears: Path) -> list[subprocess.Popen]:
    """Two nodes running `args`, returned once `appears` exists (the first checkpoint, the first metrics row)."""
    port = free_port()
    nodes = [subprocess.Popen(node_command(rank, port, args), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    deadline = time.monotonic() + 300
    while not appears.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return nodes
