"""Rewards off the critical path (`sampling.rollout_groups`, `sampling.overlap_scoring`): the leaves of one group are
scored in a background thread while the next group rolls out, and the run trains exactly as without the overlap."""

import json
import os
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from concurrent.futures import Future  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from treegrpo.errors import TrainingError  # noqa: E402
from treegrpo.recipe.loading import load_recipe  # noqa: E402
from treegrpo.run.reporting import Reporter  # noqa: E402
from treegrpo.train.overlap import _collect, prompt_groups  # noqa: E402
from treegrpo.train.trainer import train  # noqa: E402

from .conftest import write_recipe  # noqa: E402

QUIET = Reporter(enabled=False)
THREAD_REWARD = '''
import threading
import numpy as np

THREADS = []

def brightness_noting_thread(images, prompts):
    THREADS.append((threading.current_thread().name, len(images)))
    return [float(np.asarray(image, dtype=np.float32).mean()) / 255.0 for image in images]

def nan_in_second_group(images, prompts):
    THREADS.append((threading.current_thread().name, len(images)))
    return [float("nan") if len(THREADS) == 2 else 0.5] * len(images)
'''


def run_with(workdir, model, name: str, overrides: list[str], *, epochs: int = 2, function="brightness_noting_thread",
             resume: bool = False):
    (workdir / "thread_rewards.py").write_text(THREAD_REWARD)
    import sys

    sys.modules.pop("thread_rewards", None)
    recipe_path = workdir / f"{name}.toml"
    if not resume:
        write_recipe(workdir, model, epochs=epochs, name=f"{name}.toml")
    recipe = load_recipe(recipe_path, [f'reward.0.function="thread_rewards:{function}"', "data.prompts_per_epoch=4",
                                       f"output.dir={json.dumps(str(workdir / name))}", f"train.epochs={epochs}",
                                       *overrides])
    train(recipe, resume=resume, reporter=QUIET)
    import thread_rewards

    return thread_rewards.THREADS


def lora(workdir, name: str) -> dict[str, torch.Tensor]:
    return load_file(workdir / name / "final" / "pytorch_lora_weights.safetensors")


def metrics(workdir, name: str) -> list[dict]:
    return [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]


def test_overlapped_scoring_trains_exactly_as_scoring_after_the_rollout(workdir, tiny_sd3_dir):
    overlapped = run_with(workdir, tiny_sd3_dir, "overlap", ["sampling.rollout_groups=3"])
    sequential = run_with(workdir, tiny_sd3_dir, "sequential", ["sampling.rollout_groups=3",
                                                                 "sampling.overlap_scoring=false"])
    # 4 prompts in 3 groups of 1, 1 and 2 prompts (4 leaves each), every epoch; scored in the background thread or not
    assert [count for _, count in overlapped] == [4, 4, 8] * 2 == [count for _, count in sequential]
    assert {thread for thread, _ in overlapped} == {"treegrpo-scoring_0"}
    assert {thread for thread, _ in sequential} == {threading.current_thread().name}
    a, b = lora(workdir, "overlap"), lora(workdir, "sequential")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for x, y in zip(metrics(workdir, "overlap"), metrics(workdir, "sequential"), strict=True):
        assert {k: v for k, v in x.items() if not k.startswith("time/")} == \
            {k: v for k, v in y.items() if not k.startswith("time/")}
        assert x["time/scoring_work_s"] > 0
    assert not [t for t in threading.enumerate() if t.name.startswith("treegrpo-scoring")]


def test_groups_sample_the_trees_of_one_rollout(workdir, tiny_sd3_dir):
    run_with(workdir, tiny_sd3_dir, "one", [], epochs=1)
    run_with(workdir, tiny_sd3_dir, "four", ["sampling.rollout_groups=4"], epochs=1)
    one, four = metrics(workdir, "one")[0], metrics(workdir, "four")[0]
    # the same trees from the same slot-keyed noise: identical rows, the same rewards up to float rounding
    for key in ("model/rollout_rows", "model/train_rows", "model/trained_edges"):
        assert one[key] == four[key]
    assert four["reward/mean"] == pytest.approx(one["reward/mean"], abs=1e-5)
    assert four["reward/std"] == pytest.approx(one["reward/std"], abs=1e-5)
    assert four["tree/leaf_diversity"] == pytest.approx(one["tree/leaf_diversity"], abs=1e-5)


def test_resume_with_overlapped_scoring_equals_the_uninterrupted_run(workdir, tiny_sd3_dir):
    groups = ["sampling.rollout_groups=2"]
    run_with(workdir, tiny_sd3_dir, "full", groups, epochs=3)
    run_with(workdir, tiny_sd3_dir, "half", groups, epochs=1)
    run_with(workdir, tiny_sd3_dir, "half", groups, epochs=3, resume=True)
    a, b = lora(workdir, "full"), lora(workdir, "half")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["reward/mean"] for m in metrics(workdir, "half")] == [m["reward/mean"] for m in metrics(workdir, "full")]


def test_a_reward_failing_in_the_background_stops_the_run_with_its_message(workdir, tiny_sd3_dir):
    with pytest.raises(TrainingError, match=r"non-finite scores at positions \[0, 1, 2, 3, 4, 5, 6, 7\]\. Stopping"):
        run_with(workdir, tiny_sd3_dir, "nan", ["sampling.rollout_groups=2"], function="nan_in_second_group")
    import thread_rewards

    assert [count for _, count in thread_rewards.THREADS] == [8, 8]  # both groups scored (positions within a group)
    assert not [t for t in threading.enumerate() if t.name.startswith("treegrpo-scoring")]


@pytest.mark.parametrize("prompts,groups,expected", [
    (4, 1, [(0, 4)]), (4, 3, [(0, 1), (1, 2), (2, 4)]), (2, 8, [(0, 1), (1, 2)]), (5, 2, [(0, 2), (2, 5)]),
    (0, 3, [(0, 0)]),
])
def test_prompt_groups_split_evenly_at_most_one_per_prompt(prompts, groups, expected):
    assert prompt_groups(prompts, groups) == expected


def finished(value=None, error=None) -> Future:
    future = Future()
    future.set_exception(error) if error else future.set_result(value)
    return future


def test_collected_extras_are_the_means_over_all_leaves():
    # group 1: 2 leaves, accuracy 1.0; group 2: 6 leaves, accuracy 0.5 and a sub-score only it reported
    one = (torch.tensor([[1.0, 2.0]]), {"r/accuracy": 1.0}, 2, 0.25)
    two = (torch.tensor([[3.0] * 6]), {"r/accuracy": 0.5, "r/ocr": 0.9}, 6, 0.5)
    scores, extras, failure, seconds = _collect([finished(one), finished(two)])
    assert failure is None and seconds == 0.75
    torch.testing.assert_close(scores, torch.tensor([[1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]]))
    assert extras == {"r/accuracy": pytest.approx((2 * 1.0 + 6 * 0.5) / 8), "r/ocr": pytest.approx(0.9)}
    error = TrainingError("reward 'r' failed")
    assert _collect([finished(one), finished(error=error), finished(two)])[2] is error


@pytest.mark.parametrize("groups,overlap,per_process,expected", [
    (1, True, 4, "after the rollout"),
    (3, True, 4, "3 rollout groups of 1 or 2 prompts, each scored while the next group rolls out"),
    (2, False, 4, "2 rollout groups of 2 prompts, each scored after the rollout (overlap_scoring = false)"),
    (8, True, 4, "4 rollout groups of 1 prompt, each scored while the next group rolls out; rollout_groups=8 "
                 "capped at one group per prompt"),
    (2, True, 1, "after the rollout (rollout_groups=2: one prompt per process, one group)"),
])
def test_check_says_when_the_leaves_are_scored(workdir, tiny_sd3_dir, groups, overlap, per_process, expected):
    from treegrpo.recipe.plan import scoring_note

    recipe = load_recipe(write_recipe(workdir, tiny_sd3_dir), [f"sampling.rollout_groups={groups}",
                                                               f"sampling.overlap_scoring={str(overlap).lower()}"])
    assert scoring_note(recipe, per_process) == expected
