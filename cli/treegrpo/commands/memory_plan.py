"""`treegrpo check --gpu-memory`: the memory plan of `treegrpo.recipe.memory` as a table and a verdict."""

from __future__ import annotations

from rich.table import Table

from treegrpo.recipe.memory import gpu_gib, recipe_memory_plan


def print_memory_plan(loaded, gpu_memory: str, console) -> None:
    """Print the plan for `loaded` on a GPU of `gpu_memory` (GiB or a card name). ValueError for a bad size."""
    size = gpu_gib(gpu_memory)
    plan = recipe_memory_plan(loaded, size)
    if isinstance(plan, str):
        console.print(f"memory plan: none ({plan}).", soft_wrap=True, highlight=False)
        return
    table = Table(title=f"memory per process on a {size:g} GiB GPU (estimate; docs/training.md)", show_header=False)
    for name, gib in plan.rows:
        table.add_row(name, f"{gib:.1f} GiB" if gib == gib else "not estimated")  # NaN: no model for it
    table.add_row("peak: rollout / training", f"{plan.rollout_gib:.1f} / {plan.training_gib:.1f} GiB of "
                  f"{plan.usable_gib:.1f} usable")
    console.print(table)
    verdict = "fits" if plan.fits else "does NOT fit"
    advice = f"; to fit, try: {'; '.join(plan.suggestions)}" if plan.suggestions and not plan.fits else ""
    console.print(f"memory plan: {verdict}{advice}.", soft_wrap=True, highlight=False)
