"""Where tensors live on an accelerator run, checked on a CPU-only machine.

PyTorch on CPU cannot show a CPU/CUDA mix-up (FakeTensorMode lets `cpu_tensor[cuda_index]` through), so the one rule
that broke the first training step on a GPU is emulated here: a tensor marked `OnAccelerator` stands for a CUDA
tensor, and indexing a plain (CPU) tensor with it raises CUDA's error. `.cpu()` and `.to("cpu")` remove the mark,
as they would move the tensor. The record's index arrays are checked to stay on the CPU with `record_device="meta"`
(a real non-CPU device whose tensors hold no data).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from diffusers_tree import RolloutRecord, TreeRolloutPipeline, TreeSDEScheduler  # noqa: E402
from diffusers_tree.testing import tiny_sd3_pipeline  # noqa: E402

CUDA_INDEX_ERROR = "indices should be either on cpu or on the same device as the indexed tensor"


class OnAccelerator(torch.Tensor):
    """CPU data standing for a tensor on an accelerator (results of ops on it keep the mark)."""


def _marked(value) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_marked(v) for v in value)
    return isinstance(value, OnAccelerator)


class AcceleratorIndexRule(TorchFunctionMode):
    """Raises CUDA's error when a plain (CPU) tensor is indexed with an `OnAccelerator` index tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.__getitem__, torch.Tensor.index_select, torch.index_select):
            indexed, index = args[0], (args[1] if func is torch.Tensor.__getitem__ else args[2])
            if not isinstance(indexed, OnAccelerator) and _marked(index):
                raise RuntimeError(CUDA_INDEX_ERROR)
        result = func(*args, **kwargs)
        moves_to_cpu = func is torch.Tensor.cpu or (
            func is torch.Tensor.to and any(str(a) == "cpu" for a in (*args[1:], *kwargs.values())))
        if moves_to_cpu and isinstance(result, OnAccelerator):
            return result.as_subclass(torch.Tensor)
        return result


def test_the_emulated_rule_is_cudas():
    table, index = torch.arange(5.0), torch.tensor([1, 3]).as_subclass(OnAccelerator)
    with AcceleratorIndexRule():
        with pytest.raises(RuntimeError, match="indices should be"):
            table[index]
        assert torch.equal(table[index.cpu()], torch.tensor([1.0, 3.0]))  # a CPU index is fine
        assert torch.equal(index.as_subclass(OnAccelerator)[torch.tensor([0])], torch.tensor([1]))


@pytest.mark.parametrize("family", ["flow", "ddim"])
def test_transition_takes_step_indices_from_the_accelerator(family):
    """The training re-score passes a `[E]` step-index tensor; the schedule tables are CPU tensors."""
    if family == "flow":
        base = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        base = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler = TreeSDEScheduler.from_scheduler(base, window_start=2)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, out, child = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    steps = torch.tensor([2, 3, 4])
    expected = scheduler.transition(out, x, steps, stochastic=True, prev_sample=child).log_prob
    with AcceleratorIndexRule():
        on_device = [t.as_subclass(OnAccelerator) for t in (out, x, steps, child)]
        got = scheduler.transition(on_device[0], on_device[1], on_device[2], stochastic=True,
                                   prev_sample=on_device[3]).log_prob
        alpha_t = scheduler.alpha_pair(steps.as_subclass(OnAccelerator))[0] if family == "ddim" else None
    torch.testing.assert_close(got.as_subclass(torch.Tensor), expected, rtol=0, atol=0)
    if alpha_t is not None:
        assert alpha_t.device.type == "cpu" and alpha_t.shape == (3,)


def test_record_index_arrays_stay_on_cpu_whatever_the_record_device():
    pipe = tiny_sd3_pipeline()
    tree = TreeRolloutPipeline.from_pipe(pipe, window_start=1, branch_factor=2, window_width=2)
    out = tree(["a red cat", "a blue dog"], num_inference_steps=4, height=32, width=32, max_sequence_length=16,
               generator=torch.Generator().manual_seed(0), output_type="latent", record_device="meta")
    record = out.record
    for name in ("parent", "level", "prompt_index", "tree_index", "log_prob", "parent_node", "parent_step",
                 "parent_prompt_index", "edge_child", "edge_parent", "leaf_node"):
        assert getattr(record, name).device.type == "cpu", name
    for name in RolloutRecord.DATA_FIELDS:
        assert getattr(record, name).device.type == "meta", name
    assert record.edge_step.device.type == "cpu" and record.depth.device.type == "cpu"
    moved = record.to("meta")  # moves the data only
    assert moved.edge_child is record.edge_child and moved.child_latents.device.type == "meta"
