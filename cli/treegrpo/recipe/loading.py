"""Reading a recipe: TOML text, `--set table.key=value` overrides, paths relative to the recipe's folder, validation
into the frozen `Recipe` with one readable message per mistake, and the resolved TOML a run writes next to its
outputs."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import ValidationError

from treegrpo.recipe.schema import Recipe, RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a TOML recipe, apply `table.key=value` overrides, validate. Raises `RecipeError`."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"Recipe {str(path)!r} is a folder; give a .toml file (see recipes/).")
    if not path.is_file():
        raise RecipeError(f"Recipe file {str(path)!r} does not exist.")
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not a UTF-8 text file (byte {err.start}); a recipe is a TOML text file.") from None
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{path}: not valid TOML: {err}") from None
    for override in overrides or []:
        apply_override(raw, override)
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("prompts", "eval_prompts"):
            if isinstance(data.get(key), str):
                data[key] = _relative_to(path.parent, data[key], f"data.{key}")
    return validate_recipe(raw, source=str(path))


def validate_recipe(raw: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_describe(err, source)) from None


def _relative_to(folder: Path, value: str, key: str) -> str:
    """A file path of the recipe: as given when absolute or found from the current folder, else from the recipe's
    folder (also when it is in neither: `preflight` then names that path and this rule)."""
    candidate = Path(value).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return str(candidate)
    return str(folder / candidate)


def apply_override(raw: dict, override: str) -> None:
    """`table.key=value` (value parsed as a TOML value, else taken as a string); `reward.0.weight=2` indexes lists."""
    if "=" not in override:
        raise RecipeError(f"Override {override!r} must look like table.key=value (e.g. tree.branch_factor=2).")
    dotted, text = (part.strip() for part in override.split("=", 1))
    keys = dotted.split(".")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    node = raw
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[_index(key, node, dotted)]
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, dict | list):
            raise RecipeError(f"Override {override!r}: {key!r} is a value, not a table.")
    if isinstance(node, list):
        node[_index(keys[-1], node, dotted)] = value
    else:
        node[keys[-1]] = value


def _index(key: str, items: list, dotted: str) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise RecipeError(f"Override {dotted!r}: {key!r} must be an index 0 … {len(items) - 1}.")
    return int(key)


# pydantic's names for the alternatives of a union field, as a user would say them
_ALTERNATIVES = {"int": "a whole number", "constrained-int": "a whole number", "float": "a number",
                 "constrained-float": "a number", "str": "a string", "bool": "true or false"}


def _alternative(tag: str) -> str:
    if tag.startswith("list["):
        inner = _ALTERNATIVES.get(tag[5:-1], tag[5:-1])
        return f"a list of {inner.removeprefix('a ').removeprefix('an ')}s, e.g. [9, 3]"
    return _ALTERNATIVES.get(tag, tag)


def _describe(err: ValidationError, source: str) -> str:
    errors = err.errors()
    first = errors[0]
    keys = [part for part in first["loc"] if isinstance(part, int) or not _is_union_tag(part)]
    where = ".".join(str(part) for part in keys)
    tags = [part for e in errors for part in e["loc"] if isinstance(part, str) and _is_union_tag(part)]
    if tags:  # a union field (`tree.branch_factor`: a number or a list): say every alternative, not pydantic's tags
        alternatives = " or ".join(dict.fromkeys(_alternative(tag) for tag in tags))
        return f"{source}: {where} = {first.get('input')!r}: expected {alternatives}."
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key {where!r}. Check the spelling; `docs/recipes.md` lists every key."
    if first["type"] == "missing":
        return f"{source}: missing required key {where!r}."
    value = first.get("input")
    message = first["msg"].removeprefix("Value error, ")
    if where:
        return f"{source}: {where} = {value!r}: {message}"
    return f"{source}: {message}"


def _is_union_tag(part: str) -> bool:
    """pydantic's location part naming a union alternative (`constrained-int`, `list[int]`), not a recipe key."""
    return "-" in part or "[" in part or part in _ALTERNATIVES


def to_toml(recipe: Recipe) -> str:
    """Serialize a recipe to TOML (the resolved copy written next to a run's outputs)."""
    return dict_to_toml(recipe.model_dump(mode="json", exclude_none=True))


def dict_to_toml(data: dict) -> str:
    """TOML text of a recipe-shaped dict: tables, nested tables and arrays of tables ([[reward]])."""
    lines: list[str] = []

    def emit_table(name: str, table: dict) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        lines.append("")
        for key, value in table.items():
            if isinstance(value, dict):
                emit_table(f"{name}.{key}", value)

    for name, table in data.items():
        if isinstance(table, list):
            for item in table:
                lines.append(f"[[{name}]]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
                lines.append("")
        else:
            emit_table(name, table)
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


__all__ = ["Recipe", "RecipeError", "apply_override", "load_recipe", "to_toml", "validate_recipe"]
