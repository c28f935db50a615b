"""Evaluation during training ([[eval_reward]]): metrics against an independent computation on the stock pipeline,
`best/`, exact resume, and the collapse check."""

import itertools
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from treegrpo.recipe.loading import load_recipe  # noqa: E402
from treegrpo.run.reporting import Reporter  # noqa: E402
from treegrpo.run.seeds import Stream, derive_seed  # noqa: E402
from treegrpo.train.evaluation import EvalPoint, collapsing, is_evaluation_epoch, process_prompts  # noqa: E402
from treegrpo.train.trainer import train  # noqa: E402

from .conftest import write_recipe  # noqa: E402

QUIET = Reporter(enabled=False)
PROMPTS = ["a red cat", "a blue dog", "a green tree", "a white house"]


def eval_recipe(workdir, model, *, epochs=2, name="recipe.toml", function="red", overrides=(), **evaluation):
    path = write_recipe(workdir, model, epochs=epochs, name=name,
                        evaluation={"every": 2, "images_per_prompt": 2, **evaluation})
    path.write_text(path.read_text() + f'\n[[eval_reward]]\nkind = "python"\nfunction = "test_rewards:{function}"\n'
                    'name = "judge"\n')
    return load_recipe(path, list(overrides))


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_process_samples_as_many_images_and_every_prompt_once():
    for num_prompts, world in itertools.product(range(1, 8), range(1, 4)):
        shares = [process_prompts(num_prompts, rank, world) for rank in range(world)]
        assert len({len(share) for share in shares}) == 1  # FSDP: the same forwards on every process
        assert sorted(p for share in shares for p in share if p is not None) == list(range(num_prompts))
    assert [is_evaluation_epoch(d, 3, 7) for d in range(8)] == [True, False, False, True, False, False, True, True]


def test_collapse_compares_the_latest_evaluation_with_the_one_patience_before():
    def points(*rows):
        return [EvalPoint(i, score, diversity, train) for i, (score, diversity, train) in enumerate(rows)]

    falling_judge = points((0.5, 0.2, 0.5), (0.45, 0.2, 0.6), (0.4, 0.2, 0.7))
    assert collapsing(falling_judge, 2, 0.05)  # 0.5 -> 0.4 while the training reward rose
    assert not collapsing(falling_judge, 2, 0.25)  # a 20 % fall is within a 25 % tolerance
    assert not collapsing(falling_judge, 3, 0.05)  # not enough evaluations yet
    assert not collapsing(points((0.5, 0.2, None), (0.4, 0.1, 0.9)), 1, 0.05)  # untrained: no train reward
    noisy = points((0.5, 0.2, 0.5), (0.4, 0.2, 0.6), (0.52, 0.2, 0.7))  # one bad evaluation in between: no alarm
    assert not collapsing(noisy, 2, 0.05)
    assert collapsing(points((0.5, 0.2, 0.5), (0.5, 0.18, 0.6)), 1, 0.05)  # diversity -10 % for nothing
    assert not collapsing(points((0.5, 0.2, 0.5), (0.6, 0.18, 0.6)), 1, 0.05)  # ... or to follow the prompt better
    assert not collapsing(points((0.5, 0.2, 0.5), (0.5, 0.195, 0.6)), 1, 0.05)  # diversity -2.5 %: within 5 %
    assert not collapsing(points((0.5, 0.2, 0.6), (0.4, 0.1, 0.5)), 1, 0.05)  # the training reward fell too


def judged_by_hand(workdir, model_dir) -> tuple[list[list[float]], list[float]]:
    """The last evaluation recomputed outside the trainer: the stock pipeline from disk with final/ loaded, the
    evaluation noise (seed, EVALUATION, prompt, image), the `red` reward: each prompt's 2 scores and diversity."""
    from diffusers import StableDiffusion3Pipeline
    from test_rewards import red

    from treegrpo.rewards import to_pil

    stock = StableDiffusion3Pipeline.from_pretrained(model_dir)
    stock.load_lora_weights(workdir / "run" / "final")
    scores, diversities = [], []
    for p, prompt in enumerate(PROMPTS):
        images = torch.cat([stock(prompt=prompt, num_inference_steps=5, height=32, width=32, max_sequence_length=16,
                                  guidance_scale=3.0, output_type="pt",
                                  generator=torch.Generator().manual_seed(derive_seed(0, Stream.EVALUATION, p, j))
                                  ).images for j in range(2)])
        scores.append(red(to_pil(images), [prompt] * 2))
        diversities.append(math.sqrt(float(((images[0] - images[1]) ** 2).mean())))
    return scores, diversities


def test_evaluation_equals_the_stock_pipeline_with_the_exported_lora(workdir, tiny_sd3_dir):
    """eval/judge/mean and eval/diversity of the last evaluation, recomputed outside the trainer: the stock pipeline
    from disk with final/ loaded, the evaluation noise (seed, EVALUATION, prompt, image), the reward function."""
    recipe = eval_recipe(workdir, tiny_sd3_dir, overrides=["train.learning_rate=0.05"])
    train(recipe, reporter=QUIET)
    rows = read_rows(workdir / "run" / "eval.jsonl")
    assert [row["epoch"] for row in rows] == [0, 2]  # the untrained model, then every 2 epochs (= the last)
    metrics = read_rows(workdir / "run" / "metrics.jsonl")
    assert "eval/judge/mean" not in metrics[0] and metrics[1]["eval/judge/mean"] == rows[1]["eval/judge/mean"]

    per_prompt, diversities = judged_by_hand(workdir, tiny_sd3_dir)
    scores = [score for prompt_scores in per_prompt for score in prompt_scores]
    assert rows[1]["eval/judge/mean"] == pytest.approx(sum(scores) / len(scores), abs=1e-5)
    assert rows[1]["eval/diversity"] == pytest.approx(sum(diversities) / len(diversities), rel=1e-4)

    best = json.loads((workdir / "run" / "best" / "best.json").read_text())
    scores_by_epoch = {row["epoch"]: row["eval/judge/mean"] for row in rows}
    assert best["epochs_done"] == max(scores_by_epoch, key=scores_by_epoch.get) and best["reward"] == "judge"
    if best["epochs_done"] == 2:  # the best is the final model: the same LoRA
        final = load_file(workdir / "run" / "final" / "pytorch_lora_weights.safetensors")
        kept = load_file(workdir / "run" / "best" / "pytorch_lora_weights.safetensors")
        assert all(torch.equal(final[k], kept[k]) for k in final)


def test_resume_keeps_the_evaluations_and_best(workdir, tiny_sd3_dir):
    full = eval_recipe(workdir, tiny_sd3_dir, epochs=4, name="full.toml",
                       overrides=[f"output.dir={json.dumps(str(workdir / 'full'))}"])
    train(full, reporter=QUIET)
    half = eval_recipe(workdir, tiny_sd3_dir, epochs=2, name="half.toml",
                       overrides=[f"output.dir={json.dumps(str(workdir / 'half'))}"])
    train(half, reporter=QUIET)
    resumed = load_recipe(workdir / "half.toml", [f"output.dir={json.dumps(str(workdir / 'half'))}", "train.epochs=4"])
    train(resumed, resume=True, reporter=QUIET)
    a, b = read_rows(workdir / "full" / "eval.jsonl"), read_rows(workdir / "half" / "eval.jsonl")
    assert [row["epoch"] for row in a] == [row["epoch"] for row in b] == [0, 2, 4]
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=1e-6)
    assert json.loads((workdir / "full" / "best" / "best.json").read_text()) == pytest.approx(
        json.loads((workdir / "half" / "best" / "best.json").read_text()), abs=1e-6)


def test_collapse_stops_the_run_when_the_recipe_asks(workdir, tiny_sd3_dir, capsys):
    """The rollout reward rises at every epoch while the judge falls: with patience 1 and `collapse = "stop"` the
    first comparable pair of evaluations (after epochs 1 and 2) stops the run, which still checkpoints and exports."""
    recipe = eval_recipe(workdir, tiny_sd3_dir, epochs=6, function="falling", every=1, images_per_prompt=1,
                         collapse="stop", collapse_patience=1,
                         overrides=['reward=[{kind = "python", function = "test_rewards:rising"}]'])
    final = train(recipe, reporter=Reporter())
    assert [m["epoch"] for m in read_rows(workdir / "run" / "metrics.jsonl")] == [0, 1]
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    assert (workdir / "run" / "checkpoints").is_dir()
    assert capsys.readouterr().err.count("possible collapse after 2 epochs") == 1  # once, not again by logging


def test_evaluating_does_not_change_what_is_learned(workdir, tiny_sd3_dir):
    """Evaluation samples with its own noise and the stock scheduler; the training trajectory is the same with and
    without it (same rollouts, same updates, same exported LoRA)."""
    judged = eval_recipe(workdir, tiny_sd3_dir, epochs=3, every=1,
                         overrides=[f"output.dir={json.dumps(str(workdir / 'judged'))}"])
    plain = load_recipe(write_recipe(workdir, tiny_sd3_dir, epochs=3, name="plain.toml"),
                        [f"output.dir={json.dumps(str(workdir / 'plain'))}"])
    for recipe in (judged, plain):
        train(recipe, reporter=QUIET)
    with_eval, without = (read_rows(workdir / name / "metrics.jsonl") for name in ("judged", "plain"))
    assert [m["reward/mean"] for m in with_eval] == [m["reward/mean"] for m in without]
    assert "eval/judge/mean" in with_eval[0] and not (workdir / "plain" / "eval.jsonl").exists()
    a, b = (load_file(workdir / name / "final" / "pytorch_lora_weights.safetensors") for name in ("judged", "plain"))
    assert all(torch.equal(a[k], b[k]) for k in a)



def test_tagged_evaluation_prompts_get_per_category_means_and_genevals_overall(workdir, tiny_sd3_dir):
    """Evaluation prompts with GenEval tags: each reward's mean per tag, and the unweighted mean over tags (GenEval's
    "overall": a category counts once however many prompts it has), against the scores recomputed by hand."""
    tags = ["colors", "colors", "colors", "single_object"]
    lines = [{"prompt": prompt, "tag": tag} for prompt, tag in zip(PROMPTS, tags, strict=True)]
    (workdir / "eval.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    train(eval_recipe(workdir, tiny_sd3_dir, overrides=['data.eval_prompts="eval.jsonl"']), reporter=QUIET)
    row = read_rows(workdir / "run" / "eval.jsonl")[-1]
    per_prompt, _ = judged_by_hand(workdir, tiny_sd3_dir)
    colors = sum(sum(scores) for scores in per_prompt[:3]) / 6
    single_object = sum(per_prompt[3]) / 2
    assert row["eval/judge/tag/colors"] == pytest.approx(colors, abs=1e-5)
    assert row["eval/judge/tag/single_object"] == pytest.approx(single_object, abs=1e-5)
    assert row["eval/judge/tag_mean"] == pytest.approx((colors + single_object) / 2, abs=1e-5)
    assert abs(row["eval/judge/tag_mean"] - row["eval/judge/mean"]) > 1e-4  # not the image mean
