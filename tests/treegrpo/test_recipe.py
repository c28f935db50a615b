"""Recipe schema: loading, overrides, the resolved copy, the generated reference, shipped recipes."""

from pathlib import Path

import pytest

from treegrpo.recipe.docs import render
from treegrpo.recipe.loading import apply_override, load_recipe, to_toml, validate_recipe
from treegrpo.recipe.schema import RecipeError

ROOT = Path(__file__).resolve().parents[2]
BASE = {"model": {"pretrained": "org/model"}, "reward": [{"kind": "jpeg"}], "data": {"prompts": "/prompts/p.txt"},
        "output": {"dir": "runs/x"}}


def test_defaults_match_spec_table():
    recipe = validate_recipe(BASE)
    assert recipe.sampling.num_inference_steps == 10
    assert (recipe.tree.branch_factor, recipe.tree.window_width, recipe.tree.window_ratio) == (3, 3, 0.5)
    assert recipe.tree.num_trees == 1
    assert (recipe.train.learning_rate, recipe.train.weight_decay) == (1e-5, 0.01)
    assert (recipe.train.clip_range, recipe.advantage.clip, recipe.train.max_grad_norm) == (1e-4, 5.0, 1.0)
    assert recipe.advantage.eps == 1e-4


def test_recipe_is_frozen():
    recipe = validate_recipe(BASE)
    with pytest.raises(Exception, match="frozen"):
        recipe.tree.branch_factor = 2


def test_overrides_parse_values_and_index_lists():
    raw = {"tree": {}, "reward": [{"kind": "jpeg", "weight": 1.0}]}
    apply_override(raw, "tree.branch_factor=2")
    apply_override(raw, "reward.0.weight=0.25")
    apply_override(raw, "output.dir=runs/plain string")
    assert raw["tree"]["branch_factor"] == 2 and raw["reward"][0]["weight"] == 0.25
    assert raw["output"]["dir"] == "runs/plain string"
    with pytest.raises(RecipeError, match="table.key=value"):
        apply_override(raw, "tree.branch_factor")
    with pytest.raises(RecipeError, match="index 0 … 0"):
        apply_override(raw, "reward.3.weight=1")


def test_per_step_children_counts(tmp_path):
    """`branch_factor = [9, 3, 1]`: the window width follows the list, `check`'s plan counts the unique nodes, and
    the resolved copy keeps the list."""
    from treegrpo.recipe.plan import make_plan

    recipe = validate_recipe({**BASE, "tree": {"branch_factor": [9, 3, 1]}, "data": {"prompts": "/prompts/p.txt",
                                                                                  "prompts_per_epoch": 2}})
    assert recipe.tree.window_width == 3 and recipe.tree.window_factors == (9, 3, 1)
    assert recipe.tree.leaves_per_tree == 27
    plan = make_plan(recipe)
    assert plan.children_per_sde_step == (9, 3, 1) and plan.leaves_per_prompt == 27
    assert plan.rows_by_window_start[2] == 2 * (2 + (1 + 9 + 27) + 27 * 5)
    assert plan.trained_parents == 2 * 37 and plan.trained_edges == 2 * (9 + 27 + 27)
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(recipe))
    assert load_recipe(path) == recipe
    mix = validate_recipe({**BASE, "tree": {"branch_factor": [9, 3, 1], "algorithm": "mix"}})
    assert make_plan(mix).children_per_sde_step == (27, 1, 1)


def test_resolved_toml_round_trips(tmp_path):
    recipe = validate_recipe({**BASE, "model": {"pretrained": "org/model", "lora": {"rank": 8}},
                              "reward": [{"kind": "jpeg", "quality": 80}, {"kind": "python", "function": "m:f",
                                                                             "weight": 0.2}]})
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(recipe))
    assert load_recipe(path) == recipe


@pytest.mark.parametrize(
    "change,message",
    [
        ({"tree": {"window_width": 10}}, "must be smaller than sampling.num_inference_steps=10"),
        ({"tree": {"branch_factor": 1}}, "at least 2 children"),
        ({"tree": {"branch_factor": [9, 3], "window_width": 3}}, "lists 2 children counts"),
        ({"tree": {"branch_factor": [1, 3, 3]}}, "first window step needs at least 2 children"),
        ({"tree": {"branch_factor": [64, 64, 2]}}, "8192 leaves per tree"),
        ({"sampling": {"height": -8}}, "sampling.height = -8"),
        ({"reward": [{"kind": "jpeg"}, {"kind": "jpeg"}]}, "names must be unique"),
        ({"reward": []}, "reward = []"),
        ({"surprise": {}}, "unknown key 'surprise'"),
    ],
)
def test_validation_messages(change, message):
    with pytest.raises(RecipeError) as err:
        validate_recipe({**BASE, **change})
    assert message in str(err.value)


def test_recipes_reference_is_generated_from_schema():
    expected = render()
    assert (ROOT / "docs" / "recipes.md").read_text() == expected, "python -m treegrpo.recipe.docs > docs/recipes.md"


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), "recipes start with a comment header"
    assert recipe.output.dir


def test_recipe_json_schema_is_generated_from_the_models():
    import json

    from treegrpo.recipe.docs import json_schema

    text = json_schema()
    path = ROOT / "docs" / "recipe.schema.json"
    assert path.read_text() == text, "python -m treegrpo.recipe.docs --schema > docs/recipe.schema.json"
    schema = json.loads(text)
    assert {"model", "reward", "data", "output"} <= set(schema["required"])
    single, per_step = schema["$defs"]["TreeRecipe"]["properties"]["branch_factor"]["anyOf"]
    assert single["maximum"] == 64 and per_step["items"]["minimum"] == 1
