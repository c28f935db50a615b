"""The compressed ODE tail after the SDE window: diffusers' own DPM-Solver++ integrates it on the levels the plan
picks (`BranchPlan.tail_levels`), with the tree scheduler's sigmas (flow) or its DDIM grid's ᾱ (DDPM family)."""

from __future__ import annotations

import torch


def tail_solver(scheduler, levels: tuple[int, ...] | list[int], order: int):
    """A diffusers `DPMSolverMultistepScheduler` (DPM-Solver++, data prediction) set up to integrate the
    probability-flow ODE from level `levels[0]` to level `levels[-1]` of `scheduler`'s current schedule (a
    [`TreeSDEScheduler`] after `set_timesteps`), one solver step per consecutive pair of `levels`. Step it with the
    denoiser's output at `scheduler.timesteps[levels[j]]`, as any diffusers scheduler:
    `solver.step(model_output, t, x).prev_sample`.

    Why diffusers' solver with its grid replaced: its `set_timesteps` builds a grid from pure noise (DPM-Solver
    takes no custom sigmas; UniPC reshapes them), while the tail starts mid-schedule on the sigmas the model was
    sampled with. Only `sigmas` and `timesteps` are replaced, after `set_timesteps` has reset the solver state.
    Order 1 is the DDIM step, which for flow matching equals the Euler ODE step, so over every level it reproduces
    the exact tail."""
    from diffusers import DPMSolverMultistepScheduler

    if scheduler.timesteps is None:
        raise RuntimeError("Call `set_timesteps` before `tail_solver`.")
    steps = scheduler.num_inference_steps
    levels = [int(level) for level in levels]
    if len(levels) < 2 or levels != sorted(set(levels)) or levels[0] < 0 or levels[-1] > steps:
        raise ValueError(f"levels must increase within 0 … {steps}, got {levels}.")
    common = {"algorithm_type": "dpmsolver++", "solver_order": order, "lower_order_final": True,
              "final_sigmas_type": "zero", "use_karras_sigmas": False, "thresholding": False}
    index = torch.tensor(levels)
    if scheduler.family == "flow":
        solver = DPMSolverMultistepScheduler(num_train_timesteps=scheduler.base.config.num_train_timesteps,
                                             use_flow_sigmas=True, prediction_type="flow_prediction", **common)
        sigmas = scheduler.sigma_table[index]
    else:
        # DPM-Solver's sigma of a variance-preserving schedule: sqrt((1 - ᾱ) / ᾱ), at DDIM's grid and after it
        solver = DPMSolverMultistepScheduler.from_config(
            {k: v for k, v in scheduler.base.config.items() if not k.startswith("_")},
            prediction_type=scheduler.config.prediction_type, **common)
        grid = torch.cat([scheduler.alpha_pair(torch.arange(steps))[0],
                          scheduler.alpha_pair(torch.tensor([steps - 1]))[1]])
        alpha = grid[index].double()
        sigmas = ((1 - alpha) / alpha).sqrt().float()
    solver.set_timesteps(len(levels) - 1)
    solver.sigmas = sigmas
    solver.timesteps = scheduler.timesteps[index[:-1].to(scheduler.timesteps.device)].clone()
    solver.num_inference_steps = len(levels) - 1
    solver.set_begin_index(0)
    return solver
