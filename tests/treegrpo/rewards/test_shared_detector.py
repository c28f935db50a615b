"""geneval rewards on the same detector share it (`share_models`): one copy loaded, and one detection pass over a
batch that several of them score in a row (the shapes recipe's dense credit and verdict)."""

import gc
import json
import random
from pathlib import Path

import torch

from treegrpo.builtin.shapes_world import all_prompts, render, scene_for
from treegrpo.commands.inference import build_rewards
from treegrpo.recipe.loading import load_recipe
from treegrpo.rewards import build_reward
from treegrpo.rewards.registry import share_models
from treegrpo.run.reporting import Reporter
from treegrpo.run.setup import setup

ROOT = Path(__file__).resolve().parents[3]


def batch(count: int, seed: int):
    """Rendered scenes, each with the prompt of the next one: some right, some partly, some not at all."""
    rng, records = random.Random(seed), all_prompts()
    picked = [records[rng.randrange(len(records))] for _ in range(count)]
    images = [render(scene_for(r, rng)) for r in picked]
    picked = picked[1:] + picked[:1]
    return images, [r["prompt"] for r in picked], [{k: v for k, v in r.items() if k != "prompt"} for r in picked]


def count_passes(detector) -> list[int]:
    """Counts `detect_batch` calls (the detection passes) on this detector object."""
    calls, original = [], detector.detect_batch

    def counted(images, classes):
        calls.append(len(images))
        return original(images, classes)

    detector.detect_batch = counted
    return calls


def test_rewards_with_the_same_detector_settings_share_one_detector():
    dense, verdict, judge, judge_verdict, jpeg, owl_a, owl_b = (
        build_reward("geneval"), build_reward("geneval", score="binary", extras="forbid"),
        build_reward("geneval", detector="shapes_judge"), build_reward("geneval", detector="shapes_judge",
                                                                       score="binary"),
        build_reward("jpeg"), build_reward("geneval", detector="owlv2", threshold=0.3),
        build_reward("geneval", detector="owlv2", threshold=0.2))
    own = [r.detector for r in (dense, verdict, judge, judge_verdict)]
    assert share_models([dense, jpeg, verdict, judge, judge_verdict, owl_a, owl_b])[1] is jpeg
    assert verdict.detector is dense.detector is own[0]
    assert judge_verdict.detector is judge.detector is own[2] and judge.detector is not dense.detector
    assert owl_b.detector is not owl_a.detector  # another threshold is another detector


def test_a_shared_detector_runs_once_per_batch_and_scores_as_two_unshared_ones():
    images, prompts, metadata = batch(24, seed=3)
    alone = [build_reward("geneval"), build_reward("geneval", score="binary", extras="forbid")]
    expected = [reward(images, prompts, metadata=metadata) for reward in alone]
    dense, verdict = share_models([build_reward("geneval"), build_reward("geneval", score="binary", extras="forbid")])
    passes = count_passes(dense.detector)
    assert dense(images, prompts, metadata=metadata).tolist() == expected[0].tolist()
    assert verdict(list(images), prompts, metadata=metadata).tolist() == expected[1].tolist()  # same images, new list
    assert verdict.last_subscores["extra_objects"].tolist() == alone[1].last_subscores["extra_objects"].tolist()
    assert passes == [24]
    assert 0 <= expected[1].sum() < expected[0].sum() < 24  # the two scores differ: each judged its own way
    # pixel-equal copies are other images: detected again (only the same objects are remembered)
    verdict([image.copy() for image in images], prompts, metadata=metadata)
    assert passes == [24, 24]
    # other classes asked of the same images: detected again
    shifted = metadata[1:] + metadata[:1]
    copies = [image.copy() for image in images]
    dense(copies, prompts, metadata=metadata)
    dense(copies, prompts, metadata=shifted)
    assert passes == [24, 24, 24, 24]


def test_a_batch_that_is_gone_is_not_mistaken_for_a_new_one_with_the_same_ids():
    reward = build_reward("geneval")
    passes = count_passes(reward.detector)
    images, prompts, metadata = batch(8, seed=5)
    reward(images, prompts, metadata=metadata)
    del images
    gc.collect()
    for seed in range(6, 12):  # new images, some of which CPython may place at the freed addresses
        images, prompts, metadata = batch(8, seed=seed)
        fresh = build_reward("geneval")(images, prompts, metadata=metadata)
        assert reward(images, prompts, metadata=metadata).tolist() == fresh.tolist()
    assert len(passes) == 7


def test_treegrpo_eval_and_a_run_load_one_detector_per_setting(tmp_path):
    shapes, binary, judge = build_rewards(["geneval", "geneval:score=binary", "geneval:detector=shapes_judge"],
                                          "cpu", torch.float32)
    assert binary.detector is shapes.detector and judge.detector is not shapes.detector
    # the shapes recipe: dense + verdict for training, strict + geneval (shapes) and judge for evaluation
    recipe = load_recipe(ROOT / "recipes" / "shapes.toml", [f"output.dir={json.dumps(str(tmp_path / 'run'))}"])
    run = setup(recipe, Reporter(enabled=False))
    detectors = {id(r.detector) for r in [*run.rewards, *run.eval_rewards]}
    assert len(detectors) == 2
    assert all(r.detector is run.rewards[0].detector for r in [*run.rewards, *run.eval_rewards[:2]])

