"""How far the tree's Euler steps are from the stock solvers of SANA (DPM-Solver++ 2M) and Wan (UniPC) on their
own flow sigmas.

The tree steps every family with the flow SDE/ODE's Euler rule (the rule its log-probs are written for), keeping the
family's sigmas and timesteps. SANA and Wan users sample with multistep solvers, so rewards score a slightly
different sampler than users' inference. Two measurements:

1. The closed-form case: data x0 ~ N(0, a²) has the exact velocity v(x, σ) = (σ − (1−σ)a²)/((1−σ)²a² + σ²)·x and
   the probability-flow ODE maps noise z to a·z exactly, so each solver's error is known. Reported: relative RMS
   error of Euler and of the stock solver against the exact endpoint, and the Euler-vs-stock gap.
2. The tiny random-weight pipelines: the stock pipeline with its own solver vs the same pipeline with the tree
   scheduler's ODE everywhere (`sde_type="ode"`), same noise, latents out. Random weights, so only indicative.

    python benchmarks/solver_gap.py
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from diffusers_tree import TreeSDEScheduler  # noqa: E402
from diffusers_tree.adapters import stock_call_kwargs  # noqa: E402
from diffusers_tree.testing import TINY_PIPELINES  # noqa: E402

DATA_STD = 0.5
FAMILIES = ("sana", "wan")


def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    a2 = DATA_STD**2
    return (sigma - (1 - sigma) * a2) / ((1 - sigma) ** 2 * a2 + sigma**2) * x


def rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


def closed_form_row(family: str, steps: int) -> str:
    base = TINY_PIPELINES[family][0]().scheduler
    z = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = DATA_STD * z
    stock = type(base).from_config(base.config)
    stock.set_timesteps(steps)
    x = z.clone().float()
    for i, t in enumerate(stock.timesteps):
        x = stock.step(velocity(x, float(stock.sigmas[i])), t, x).prev_sample
    tree = TreeSDEScheduler.from_scheduler(base, sde_type="ode", algorithm="flat", window_start=0)
    tree.set_timesteps(steps)
    y = z.clone().float()
    for i in range(steps):
        y = tree.transition(velocity(y, float(tree.sigma_table[i])), y, i, stochastic=False).prev_sample
    return (f"| {family} ({type(base).__name__}) | {steps} | {rms(y - exact) / rms(exact):.2e} | "
            f"{rms(x - exact) / rms(exact):.2e} | {rms(y - x) / rms(exact):.2e} |")


def tiny_pipeline_row(family: str, steps: int) -> str:
    build, kwargs = TINY_PIPELINES[family]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    frames = {"num_frames": kwargs["num_frames"]} if "num_frames" in kwargs else {}
    call = dict(num_inference_steps=steps, guidance_scale=4.0, height=32, width=32, output_type="latent", **kwargs)
    count = "num_videos_per_prompt" if frames else "num_images_per_prompt"
    from diffusers_tree import TreeRolloutPipeline

    roots = TreeRolloutPipeline.from_pipe(pipe).prepare_roots(2, 32, 32, torch.Generator().manual_seed(0),
                                                             torch.float32, **frames)
    stock = pipe(prompt=["a red cat", "a blue dog"], latents=roots, **{count: 1}, **stock_call_kwargs(pipe, call))[0]
    original = pipe.scheduler
    pipe.scheduler = TreeSDEScheduler.from_scheduler(original, sde_type="ode", algorithm="flat", branch_factor=1,
                                                     window_width=1, window_start=0)
    euler = pipe(prompt=["a red cat", "a blue dog"], latents=roots, **{count: 1}, **stock_call_kwargs(pipe, call))[0]
    pipe.scheduler = original
    return f"| {family} tiny pipeline (random weights) | {steps} | | | {rms(euler - stock) / rms(stock):.2e} |"


def main() -> None:
    print("| schedule | steps | Euler (tree) vs exact | stock solver vs exact | Euler vs stock |")
    print("|---|---|---|---|---|")
    for family in FAMILIES:
        for steps in (10, 20, 30):
            print(closed_form_row(family, steps))
    for family in FAMILIES:
        for steps in (10, 20):
            print(tiny_pipeline_row(family, steps))


if __name__ == "__main__":
    main()
