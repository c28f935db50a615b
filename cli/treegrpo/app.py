"""The `treegrpo` command line. Thin on purpose: parse arguments, call a function, print the result."""

from __future__ import annotations

from typing import Annotated

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


def main() -> None:
    """Entry point of the `treegrpo` console script and of `python -m treegrpo`."""
    app(prog_name="treegrpo")
