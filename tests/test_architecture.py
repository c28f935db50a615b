"""The library stays a pure diffusers add-on (STYLE.md, "Architecture"): it never imports the trainer's stack."""

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "src" / "diffusers_tree"
FORBIDDEN = {"accelerate", "peft", "pydantic", "typer", "rich", "treegrpo"}


def imported_top_level_modules(path: Path) -> set[str]:
    """Top-level names of every absolute import in `path`, wherever it sits (module level, function, try block)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_trainer_packages():
    files = sorted(LIBRARY.rglob("*.py"))
    assert files, f"no Python files found under {LIBRARY}"
    offenders = {
        str(path.relative_to(LIBRARY)): sorted(imported_top_level_modules(path) & FORBIDDEN) for path in files
    }
    offenders = {path: names for path, names in offenders.items() if names}
    assert not offenders, f"diffusers_tree must not import {sorted(FORBIDDEN)}; found: {offenders}"


def test_checker_sees_nested_imports(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("import os.path\nfrom . import sibling\ndef f():\n    from accelerate.utils import x\n")
    assert imported_top_level_modules(source) == {"os", "accelerate"}


ROOT = LIBRARY.parents[1]
HOOKS = {"lora_target_modules", "pixels_per_patch", "combine_guidance", "stock_call_kwargs", "default_size",
         "pipeline_latents", "latent_output", "default_num_frames", "postprocess", "uses_cfg", "denoiser_name",
         # the rewards' hooks, declared on treegrpo.rewards.base.RewardBase
         "last_subscores", "takes_metadata", "score_and_accuracy", "frame_reduction"}


def test_adapter_hooks_are_declared_not_discovered():
    """Every optional adapter hook is declared on `adapters/base.PipelineAdapter` with its default; nothing asks an
    adapter whether it has one (`getattr(adapter, "hook", None)`, `hasattr`), and the families import only the base,
    never the package above them."""
    from diffusers_tree.adapters.base import PipelineAdapter
    from treegrpo.rewards.base import RewardBase

    assert HOOKS <= set(dir(PipelineAdapter)) | set(dir(RewardBase))
    offenders = []
    for path in sorted([*LIBRARY.rglob("*.py"), *(ROOT / "cli").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr",
                                                                                                   "hasattr"):
                name = node.args[1] if len(node.args) > 1 else None
                if isinstance(name, ast.Constant) and name.value in HOOKS:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.id}(..., {name.value!r})")
    assert not offenders, offenders
    for path in sorted((LIBRARY / "adapters").glob("*.py")):
        if path.name in ("__init__.py", "base.py"):
            continue
        relative = [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)
                    and node.level == 1]
        # the base, or a sibling family it extends (FLUX.1 Kontext is FLUX.1 plus a source image); never the package
        siblings = {"base"} | {p.stem for p in (LIBRARY / "adapters").glob("*.py")} - {"__init__", path.stem}
        assert all(node.module in siblings for node in relative), f"{path.name} imports from the package above it"


def test_trainer_packages_import_one_way():
    """`cli/treegrpo` in packages named after what they hold (docs/architecture.md), with no import circle between
    them: every package-level import arrow (module level or inside a function) points one way."""
    trainer = ROOT / "cli" / "treegrpo"
    arrows: dict[str, set[str]] = {}
    for path in trainer.rglob("*.py"):
        parts = path.relative_to(trainer).with_suffix("").parts
        package = parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("treegrpo."):
                target = node.module.split(".")[1]
                if target != package:
                    arrows.setdefault(package, set()).add(target)
    expected_packages = {"recipe", "run", "train", "model", "hub", "commands", "rewards", "builtin"}
    assert expected_packages <= {p.name for p in trainer.iterdir() if (p / "__init__.py").is_file()}

    def reaches(start: str, goal: str, seen: frozenset = frozenset()) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt}))
                   for nxt in arrows.get(start, ()))

    circles = sorted(p for p in arrows if reaches(p, p))
    assert not circles, f"import circles through {circles}: {arrows}"


def test_every_reported_error_is_one_of_three():
    """`treegrpo.errors`: a usage error (exit 2), a training error (exit 1) or an interruption (128 + signal); the
    finer classes only say where it happened, so `app.py` catches three classes. Control-flow exceptions that never
    reach the user are listed here with why."""
    import importlib
    import inspect

    from treegrpo.errors import Interrupted, TrainingError, UsageError

    internal = {"StopNow": "the signal handler's stop-at-once, turned into Interrupted by the trainer",
                "_StopAtSafePoint": "the loop's own stop at a safe point, turned into Interrupted",
                "RemoteRewardError": "a remote reward's failure, reported as a TrainingError by the scoring",
                "RequestTooLarge": "a request the reward server refuses, answered 413 to its client"}
    trainer = ROOT / "cli" / "treegrpo"
    found = {}
    for path in trainer.rglob("*.py"):
        name = ".".join(path.relative_to(trainer.parent).with_suffix("").parts).removesuffix(".__init__")
        for cls_name, cls in inspect.getmembers(importlib.import_module(name), inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == name:
                found[cls_name] = cls
    assert {"RecipeError", "SetupError", "CheckpointError", "PushError"} <= set(found)
    strays = [n for n, c in found.items() if n not in internal and not issubclass(c, (UsageError, TrainingError,
                                                                                     Interrupted))]
    assert not strays, strays


def test_no_module_imports_its_own_package_or_circles_back():
    """Module by module (not only package by package): no module imports the package it sits in (`rewards/multi.py`
    importing `treegrpo.rewards` ran back up into the `__init__` that imports it), and the explicit import arrows
    between modules of `cli/treegrpo` and of `src/diffusers_tree` form no circle, lazy imports included."""
    arrows: dict[str, set[str]] = {}
    for top, base in ((ROOT / "cli" / "treegrpo", "treegrpo"), (LIBRARY, "diffusers_tree")):
        for path in top.rglob("*.py"):
            parts = (base, *path.relative_to(top).with_suffix("").parts)
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            package = ".".join(parts[:-1])
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    anchor = parts[:len(parts) - node.level]
                    target = ".".join(anchor + ((node.module,) if node.module else ()))
                elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == base:
                    target = node.module
                else:
                    continue
                assert not (parts[-1] != "__init__" and target == package), f"{name} imports its own package"
                if target != name:
                    arrows.setdefault(name, set()).add(target)

    def reaches(start: str, goal: str, seen: set) -> bool:
        for nxt in arrows.get(start, ()):
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                if reaches(nxt, goal, seen):
                    return True
        return False

    circles = sorted(m for m in arrows if reaches(m, m, set()))
    assert not circles, circles


def test_files_and_functions_stay_small():
    """No source file over 400 lines and no function over 60 (signature and docstring included), so each reads on
    one screen or two."""
    long_files, long_functions = [], []
    for path in sorted([*LIBRARY.rglob("*.py"), *(ROOT / "cli").rglob("*.py")]):
        text = path.read_text()
        if text.count("\n") > 400:
            long_files.append(str(path.relative_to(ROOT)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long_files and not long_functions, (long_files, long_functions)
