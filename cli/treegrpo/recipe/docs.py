"""Generate `docs/recipes.md` from the recipe schema: `python -m treegrpo.recipe.docs > docs/recipes.md`.

The schema's `Field(description=...)` is the single source; a test checks the committed file is up to date.
"""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel

from treegrpo.recipe.schema import Recipe

HEADER = """# Recipe reference

Generated from `treegrpo/recipe/schema.py` by `python -m treegrpo.recipe.docs > docs/recipes.md`; do not edit by hand.
Every key can be overridden on the command line with `--set table.key=value` (lists by index:
`--set reward.0.weight=0.5`). Unknown keys are errors. The resolved recipe of a run is written to
`<output.dir>/recipe.resolved.toml`. For editors, the same models as a JSON Schema:
[`recipe.schema.json`](recipe.schema.json) (`python -m treegrpo.recipe.docs --schema`); TOML tools such as taplo /
Even Better TOML validate and complete recipes with it (`#:schema ../docs/recipe.schema.json` in `recipes/`).
"""


def _type_name(annotation) -> str:
    if _has_constraints(annotation):  # constraints are in the meaning column, not the type
        if typing.get_origin(annotation) is typing.Annotated:
            return _type_name(typing.get_args(annotation)[0])
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            return " \\| ".join(_type_name(arg) for arg in typing.get_args(annotation))
        return f"{typing.get_origin(annotation).__name__}[{', '.join(map(_type_name, typing.get_args(annotation)))}]"
    text = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("treegrpo.recipe.schema.", "").replace("|", "\\|")  # a pipe would end the table cell


def _has_constraints(annotation) -> bool:
    return typing.get_origin(annotation) is typing.Annotated or any(
        _has_constraints(arg) for arg in typing.get_args(annotation))


def _table_model(annotation) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        for inner in typing.get_args(candidate):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def render_table(name: str, model: type[BaseModel], array: bool = False) -> list[str]:
    lines = [f"## `[[{name}]]`" if array else f"## `[{name}]`", ""]
    if model.__doc__ and "Besides" in model.__doc__:
        lines += [" ".join(model.__doc__.split()), ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for key, field in model.model_fields.items():
        sub = _table_model(field.annotation)
        if sub is not None:
            nested.append((f"{name}.{key}", sub, field))
            continue
        default = "required" if field.is_required() else f"`{field.default!r}`"
        default = default.replace("|", "\\|")
        lines.append(f"| `{key}` | `{_type_name(field.annotation)}` | {default} | {field.description or ''} |")
    lines.append("")
    for sub_name, sub, field in nested:
        if field.description:
            lines += [f"`[{sub_name}]`: {field.description}", ""]
        lines += render_table(sub_name, sub)
    return lines


def render() -> str:
    lines = [HEADER]
    for key, field in Recipe.model_fields.items():
        model = _table_model(field.annotation)
        array = typing.get_origin(field.annotation) is list
        lines += render_table(key, model, array=array)
    return "\n".join(lines).rstrip() + "\n"


def json_schema() -> str:
    """The recipe's JSON Schema (generated from the same pydantic models), for editors: taplo / Even Better TOML and
    other TOML tools validate and complete `recipes/*.toml` with it (`#:schema ./recipe.schema.json` or settings)."""
    import json

    schema = Recipe.model_json_schema()
    schema["title"] = "treegrpo recipe"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    import sys

    print(json_schema() if "--schema" in sys.argv[1:] else render(), end="")
