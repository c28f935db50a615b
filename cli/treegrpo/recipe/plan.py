"""Derived values of a recipe (what `treegrpo check` prints); never written back into the recipe."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers_tree import BranchPlan, window_probs
from diffusers_tree.plan import build_plan
from treegrpo.recipe.schema import Recipe


@dataclass(frozen=True)
class RunPlan:
    """Per-epoch sizes of a run, per CFG half (double the rows when CFG is on: guidance > 1, not FLUX)."""

    algorithm: str
    num_processes: int
    prompts_per_process: int
    leaves_per_prompt: int
    children_per_sde_step: tuple[int, ...]  # of one tree: (3, 3, 3) for TreeGRPO, (27, 1, 1) for mix
    rows_by_window_start: dict[int, int]  # rollout rows per epoch for each possible window start
    expected_rollout_rows: float  # averaged over the window policy (Eq. 7 for geometric)
    trained_edges: int  # per epoch, all processes (flat: before timestep_fraction)
    trained_parents: int  # per epoch = training forwards per CFG half
    independent_rows: int  # rows if every leaf were an independent trajectory (leaves · T per tree)


def make_plan(recipe: Recipe, num_processes: int = 1) -> RunPlan:
    s, t = recipe.sampling, recipe.tree
    steps, trees = s.num_inference_steps, recipe.data.prompts_per_epoch * t.num_trees
    starts = [0] if t.algorithm == "flat" else list(range(steps - t.window_width))
    # cps has no noise into sigma = 0: flat takes its last step as ODE (DDIM's case depends on the model's config)
    zero_noise = (steps - 1,) if s.sde_type == "cps" else ()
    plans: dict[int, BranchPlan] = {
        start: build_plan(t.algorithm, steps, t.branch_factor, t.window_width, start, zero_noise_steps=zero_noise,
                          tail_steps=s.tail_steps)
        for start in starts}
    rows = {start: plan.rows_per_tree * trees for start, plan in plans.items()}
    if t.algorithm == "flat":
        expected = float(rows[0])
    elif t.window_policy == "geometric":
        probs = window_probs(steps, t.window_width, t.window_ratio)
        expected = float(sum(float(p) * rows[i] for i, p in enumerate(probs)))
    else:
        expected = float(rows[t.window_start])
    any_plan = plans[starts[0]]
    return RunPlan(
        algorithm=t.algorithm, num_processes=num_processes,
        prompts_per_process=recipe.data.prompts_per_epoch // num_processes,
        leaves_per_prompt=any_plan.num_leaves * t.num_trees,
        children_per_sde_step=tuple(f for f, sde in zip(any_plan.branch_factors, any_plan.sde_steps, strict=True)
                                    if sde),
        rows_by_window_start=rows,
        expected_rollout_rows=expected, trained_edges=any_plan.trained_edges * trees,
        trained_parents=any_plan.trained_parents * trees, independent_rows=any_plan.num_leaves * steps * trees,
    )


def reward_server_notes(loaded: Recipe) -> list[tuple[str, str]]:
    """Whether each http / vlm reward's server accepts connections now (a note, not a failure: it may start later)."""
    from treegrpo.rewards.remote import connection_problem

    rows = []
    for spec in [*loaded.reward, *loaded.eval_reward]:
        url = (spec.model_extra or {}).get("url") or (spec.model_extra or {}).get("base_url")
        if spec.kind not in ("http", "vlm") or not url:
            continue
        for one in (url.split(",") if isinstance(url, str) else url):  # one URL, several, or a list
            problem = connection_problem(str(one).strip())
            rows.append((f"{spec.name or spec.kind} server", f"{str(one).strip()}: " + (
                "accepts connections" if problem is None else f"NOT reachable now ({problem}); start it before "
                "`treegrpo run`")))
    return rows


def evaluation_note(loaded: Recipe) -> str:
    """What `check` says about evaluation during training."""
    e = loaded.evaluation
    if not e.enabled:
        return "off (evaluation.enabled = false: no eval.jsonl, no best/)"
    judges = loaded.eval_reward or loaded.reward
    names = ", ".join(r.name or r.kind for r in judges) + ("" if loaded.eval_reward else " (the training rewards)")
    first = judges[0]
    best = e.best_by or first.name or first.kind
    return (f"{names} every {e.every or loaded.output.eval_every} epochs, {e.images_per_prompt} images per prompt; "
            f"best/ by {best}; collapse: {e.collapse}")


def cfg_rows_per_node(loaded: Recipe) -> tuple[int | None, str]:
    """(rows per node, why): 2 with CFG, 1 without, None when the model is not on this machine yet. Read from the
    model's family (its adapter's `uses_cfg`) and guidance, for a local, built-in or cached model."""
    from diffusers_tree.adapters import adapter_class
    from treegrpo.recipe.preflight import pipeline_config

    config = pipeline_config(loaded.model.pretrained) or {}
    pipeline = str(config.get("_class_name", ""))
    adapter = adapter_class(pipeline) if pipeline else None
    guidance = loaded.sampling.guidance_scale
    if guidance is None:  # a shipped model's stored call defaults
        from treegrpo.builtin import builtin_metadata

        guidance = builtin_metadata(loaded.model.pretrained).get("pipeline_kwargs", {}).get("guidance_scale")
    if adapter is None:
        return None, (f"per CFG half: x2 if the model guides with CFG at guidance "
                      f"{guidance if guidance is not None else 'its default'} (it is not on this machine yet)")
    guidance = adapter.default_guidance_scale if guidance is None else guidance
    if adapter.uses_cfg(guidance, config):
        return 2, f"CFG halves included: {pipeline} guides with CFG at guidance {guidance}"
    return 1, f"1 row per node: no CFG for {pipeline} at guidance {guidance}"


def scoring_note(loaded: Recipe, prompts_per_process: int) -> str:
    """When the leaves are scored: after the rollout, or group by group beside it (`sampling.rollout_groups`)."""
    s = loaded.sampling
    groups = max(1, min(s.rollout_groups, prompts_per_process))
    if groups == 1:
        return "after the rollout" + (f" (rollout_groups={s.rollout_groups}: one prompt per process, one group)"
                                      if s.rollout_groups > 1 else "")
    sizes = sorted({prompts_per_process // groups, -(-prompts_per_process // groups)})
    how = "while the next group rolls out" if s.overlap_scoring else "after the rollout (overlap_scoring = false)"
    capped = f"; rollout_groups={s.rollout_groups} capped at one group per prompt" if groups < s.rollout_groups else ""
    noun = "prompt" if sizes == [1] else "prompts"
    return f"{groups} rollout groups of {' or '.join(map(str, sizes))} {noun}, each scored {how}{capped}"


def plan_rows(loaded: Recipe, plan: RunPlan) -> list[tuple[str, str]]:
    """The (name, value) rows `treegrpo check` prints for a valid recipe."""
    cfg, cfg_why = cfg_rows_per_node(loaded)
    factor = cfg or 1
    s = loaded.sampling
    return [
        ("algorithm", plan.algorithm),
        ("model", loaded.model.pretrained),
        ("leaves per prompt", str(plan.leaves_per_prompt)),
        ("children per SDE step", " x ".join(map(str, plan.children_per_sde_step))),
        ("ODE tail after the window", "exact (one step per timestep)" if s.tail_steps is None else
         f"at most {s.tail_steps} DPM-Solver++ steps (order {s.tail_solver_order})"),
        ("prompts per epoch / per process", f"{loaded.data.prompts_per_epoch} / {plan.prompts_per_process}"),
        ("rollout rows per epoch (expected)", f"{plan.expected_rollout_rows * factor:.0f}  ({cfg_why})"),
        ("rollout rows by window start", ", ".join(f"{start}: {rows * factor}"
                                                   for start, rows in plan.rows_by_window_start.items())),
        ("independent-trajectory rows",
         f"{plan.independent_rows * factor}  ({plan.independent_rows / plan.expected_rollout_rows:.2f}x)"),
        ("trained edges / parents per epoch", f"{plan.trained_edges} / {plan.trained_parents}"),
        ("rewards", ", ".join(f"{r.name or r.kind} x{r.weight}" for r in loaded.reward)),
        ("scoring", scoring_note(loaded, plan.prompts_per_process)),
        ("evaluation", evaluation_note(loaded)),
        *reward_server_notes(loaded),
        ("output", loaded.output.dir),
    ]
