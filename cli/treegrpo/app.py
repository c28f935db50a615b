"""The `treegrpo` command line. Thin on purpose: parse arguments, call a function, print the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

import treegrpo
from treegrpo.envinfo import collect_env, package_version

app = typer.Typer(
    name="treegrpo",
    help="TreeGRPO: RL fine-tuning of diffusers text-to-image models with tree-shaped rollouts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()


def _print_version(value: bool) -> None:
    if value:
        console.print(f"treegrpo {treegrpo.__version__} (diffusers_tree {package_version('diffusers-tree')})")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """TreeGRPO: RL fine-tuning of diffusers text-to-image models with tree-shaped rollouts."""


@app.command()
def info() -> None:
    """Print the versions of the packages treegrpo uses and the device torch sees."""
    table = Table(title="treegrpo environment")
    table.add_column("item")
    table.add_column("value")
    for row in collect_env():
        table.add_row(row.name, row.value)
    console.print(table)


RecipeArg = Annotated[Path, typer.Argument(help="A TOML recipe (see recipes/ and docs/recipes.md).")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, e.g. --set tree.branch_factor=2 (repeatable)."),
]


def _fail(message: str, code: int = 2) -> NoReturn:
    console_err = Console(stderr=True, soft_wrap=True)  # one line, whatever the terminal width
    console_err.print("[bold red]error[/]: ", end="")
    console_err.print(message, markup=False, highlight=False)
    raise typer.Exit(code)


def _quiet_libraries() -> None:
    """Our own progress and messages replace the libraries' loading bars and import chatter."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load(recipe: Path, overrides: list[str] | None):
    from treegrpo.recipe import RecipeError, load_recipe

    try:
        return load_recipe(recipe, overrides or [])
    except RecipeError as err:
        _fail(str(err))


@app.command()
def check(
    recipe: RecipeArg,
    overrides: SetOption = None,
    num_processes: Annotated[int, typer.Option(help="Processes the run will use (for the per-process share).")] = 1,
) -> None:
    """Validate a recipe and print the plan: leaves, rows and trained edges per epoch, prompts per process."""
    from treegrpo.planning import make_plan

    loaded = _load(recipe, overrides)
    if loaded.data.prompts_per_epoch % num_processes:
        _fail(f"data.prompts_per_epoch={loaded.data.prompts_per_epoch} is not divisible by {num_processes} "
              "processes.")
    plan = make_plan(loaded, num_processes)
    table = Table(title=f"{recipe}: valid", show_header=False)
    rows = [
        ("algorithm", plan.algorithm),
        ("model", loaded.model.pretrained),
        ("leaves per prompt", str(plan.leaves_per_prompt)),
        ("prompts per epoch / per process", f"{loaded.data.prompts_per_epoch} / {plan.prompts_per_process}"),
        ("rollout rows per epoch (expected)", f"{plan.expected_rollout_rows:.0f}  (x2 with CFG)"),
        ("rollout rows by window start", ", ".join(f"{s}: {r}" for s, r in plan.rows_by_window_start.items())),
        ("independent-trajectory rows",
         f"{plan.independent_rows}  ({plan.independent_rows / plan.expected_rollout_rows:.2f}x)"),
        ("trained edges / parents per epoch", f"{plan.trained_edges} / {plan.trained_parents}"),
        ("rewards", ", ".join(f"{r.name or r.kind} x{r.weight}" for r in loaded.reward)),
        ("output", loaded.output.dir),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


@app.command()
def run(
    recipe: RecipeArg,
    overrides: SetOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in output.dir.")
    ] = False,
) -> None:
    """Train with TreeGRPO (or the flat/mix baselines). Under `accelerate launch -m treegrpo run ...` every
    process runs this."""
    from treegrpo.grpo import TrainingError
    from treegrpo.models import ModelLoadError
    from treegrpo.trainer import Interrupted, SetupError, train

    _quiet_libraries()
    loaded = _load(recipe, overrides)
    try:
        final = train(loaded, resume=resume)
    except (SetupError, ModelLoadError) as err:
        _fail(str(err))
    except TrainingError as err:
        _fail(str(err), code=1)
    except Interrupted as stop:
        Console(stderr=True).print(f"interrupted: checkpoint written after {stop.args[0]} epochs; "
                                   "continue with --resume")
        raise typer.Exit(130) from None
    console.print(f"done: LoRA/weights in {final}")


def main() -> None:
    """Entry point of the `treegrpo` console script and of `python -m treegrpo`."""
    app(prog_name="treegrpo")
