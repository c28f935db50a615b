"""Every prompt slot of an epoch gets its own tree, even when the same prompt is drawn twice, and flat runs with
zero-noise last steps train to the end."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from treegrpo.recipe.loading import load_recipe  # noqa: E402
from treegrpo.run.reporting import Reporter  # noqa: E402
from treegrpo.run.seeds import tree_generators  # noqa: E402
from treegrpo.run.setup import setup  # noqa: E402
from treegrpo.train.grpo import epoch_positions, epoch_prompt_indices, process_share  # noqa: E402
from treegrpo.train.trainer import train  # noqa: E402

from .conftest import write_recipe  # noqa: E402

RECORDING_REWARD = '''
import numpy as np

SEEN = []

def record_images(images, prompts):
    SEEN.append([np.asarray(image, dtype=np.float32) for image in images])
    return [float(np.asarray(image, dtype=np.float32).mean()) / 255.0 for image in images]
'''


def test_a_prompt_drawn_twice_in_an_epoch_gets_two_different_trees(workdir, tiny_sd3_dir):
    (workdir / "prompts.txt").write_text("a red cat\n")
    (workdir / "recording_rewards.py").write_text(RECORDING_REWARD)
    recipe = load_recipe(write_recipe(workdir, tiny_sd3_dir, epochs=1), [
        'reward.0.function="recording_rewards:record_images"', "data.prompts_per_epoch=2"])
    train(recipe, reporter=Reporter(enabled=False))
    import recording_rewards

    (images,) = recording_rewards.SEEN  # one epoch: 2 slots × 4 leaves, both slots "a red cat"
    first, second = images[:4], images[4:]
    assert len(images) == 8
    assert not any(np.array_equal(a, b) for a in first for b in second)


def test_tree_noise_is_keyed_on_the_slot_not_the_prompt():
    # 10 prompts, 16 slots per epoch: six prompts appear twice, yet every slot's generator draws differently
    positions = epoch_positions(epoch=0, per_epoch=16)
    indices = epoch_prompt_indices(10, 0, 16, seed=0)
    assert len(set(indices)) < len(indices)
    draws = [float(torch.randn(1, generator=g)) for g in tree_generators(0, 0, positions, num_trees=1)]
    assert len(set(draws)) == 16
    # a slot's noise does not depend on which process samples it
    share = process_share(positions, rank=1, world_size=2)
    assert [float(torch.randn(1, generator=g)) for g in tree_generators(0, 0, share, 1)] == draws[8:]


def test_flat_with_cps_trains_every_epoch(workdir, tiny_sd3_dir):
    recipe = load_recipe(write_recipe(workdir, tiny_sd3_dir, epochs=2), [
        'tree.algorithm="flat"', 'sampling.sde_type="cps"', "tree.timestep_fraction=0.6"])
    train(recipe, reporter=Reporter(enabled=False))
    metrics = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1]
    for m in metrics:
        assert m["model/trained_edges"] > 0 and abs(m["policy/ratio_mean"] - 1) < 0.1
    run = setup(recipe, Reporter(enabled=False))
    run.rollout.adapter.set_timesteps(run.rollout.scheduler, 5, torch.zeros(1, 4, 4, 4))
    assert run.rollout.scheduler.plan.sde_steps == (True, True, True, True, False)

