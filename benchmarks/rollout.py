"""Rows through the denoiser and wall-clock: tree rollout vs independent trajectories at the same leaf count.

For each family's tiny model and a larger CPU-sized SD3 transformer, with (k, w) = (3, 3), T = 10 and the SDE window
at steps 2-4, one prompt, 27 leaves, it times three ways of producing 27 final latents:

(a) `TreeRolloutPipeline`: every unique tree node goes through the denoiser once (SPEC §2.1).
(b) independent trajectories: the stock pipeline with its own scheduler and `num_images_per_prompt=27`.
(c) fixed-batch: the stock pipeline with `TreeSDEScheduler` swapped in (the same tree as (a), every leaf computed).

Rows are counted at the denoiser with `diffusers_tree.search.count_rows` (CFG halves included). Times are medians
of `--repeats` runs (tiny models, default 7) or `--large-repeats` runs (sd3-large, default 3) after warm-up, the
three modes interleaved round-robin so that background load hits them alike; wall-clock and the process's CPU time
are both reported. `output_type="latent"` (no VAE decode); prompt encoding is included in every mode.

    python benchmarks/rollout.py             # about 5 minutes on 2 idle CPU cores
    python benchmarks/rollout.py --families sd3 sd3-large --large-repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline  # noqa: E402

from diffusers_tree import TreeRolloutPipeline, TreeSDEScheduler, unique_rows, window_probs  # noqa: E402
from diffusers_tree.adapters import adapter_for  # noqa: E402
from diffusers_tree.search import count_rows  # noqa: E402
from diffusers_tree.testing import (  # noqa: E402
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)

K, W, T, S = 3, 3, 10, 2  # branch_factor, window_width, num_inference_steps, window_start
WINDOW_RATIO = 0.5
PROMPT = "a photo of a red cat"


def large_sd3_pipeline(*, seed: int = 0) -> StableDiffusion3Pipeline:
    """The tiny SD3 pipeline's encoders and VAE with a CPU-sized MMDiT: 4 layers, hidden 256, 32×32 latents."""
    pipe = tiny_sd3_pipeline(seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=64,
            num_attention_heads=4, caption_projection_dim=256, joint_attention_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=16,
        ).eval()  # fmt: skip
    large = StableDiffusion3Pipeline(**{**pipe.components, "transformer": transformer})
    large.set_progress_bar_config(disable=True)
    return large


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable
    call_kwargs: dict  # for both the stock and the tree pipeline
    cfg: int  # denoiser rows per node (2 with CFG)
    full_warmup: bool  # warm up with full runs (tiny models) or one short stock call (large model)


FAMILIES = {
    "sd": Family("SD1.5 tiny", tiny_sd_pipeline, {"guidance_scale": 7.5, "height": 32, "width": 32}, 2, True),
    "sdxl": Family("SDXL tiny", tiny_sdxl_pipeline, {"guidance_scale": 5.0, "height": 32, "width": 32}, 2, True),
    "sd3": Family("SD3 tiny", tiny_sd3_pipeline,
                  {"guidance_scale": 7.0, "height": 32, "width": 32, "max_sequence_length": 16}, 2, True),
    "flux": Family("FLUX tiny (no CFG)", tiny_flux_pipeline,
                   {"height": 32, "width": 32, "max_sequence_length": 16}, 1, True),
    "sd3-large": Family("SD3 4×256, 32×32 latents", large_sd3_pipeline,
                        {"guidance_scale": 7.0, "height": 64, "width": 64, "max_sequence_length": 16}, 2, False),
}


def expected_tree_rows() -> float:
    """Rows per tree (per CFG half) averaged over the window start drawn from Eq. 7."""
    probs = window_probs(T, W, WINDOW_RATIO)
    return float(sum(p * unique_rows(T, K, W, s) for s, p in enumerate(probs.tolist())))


@dataclass
class Timing:
    rows: int
    wall_s: float  # median wall-clock seconds
    cpu_s: float  # median CPU seconds of this process (all threads): less sensitive to other load on the machine


def time_modes(modes: dict[str, Callable[[], object]], denoiser: torch.nn.Module, repeats: int) -> dict[str, Timing]:
    """Run the modes round-robin `repeats` times (so background load hits all of them alike); medians per mode."""
    walls, cpus, rows = ({name: [] for name in modes} for _ in range(3))
    for _ in range(repeats):
        for name, fn in modes.items():
            with count_rows(denoiser) as counter:
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                walls[name].append(time.perf_counter() - wall)
                cpus[name].append(time.process_time() - cpu)
            rows[name].append(counter.rows)
    if any(len(set(r)) != 1 for r in rows.values()):
        raise RuntimeError(f"row counts changed between repeats: {rows}")
    return {name: Timing(rows[name][0], statistics.median(walls[name]), statistics.median(cpus[name]))
            for name in modes}


def bench_family(family: Family, repeats: int) -> dict[str, Timing]:
    pipe = family.build()
    pipe.set_progress_bar_config(disable=True)
    base_scheduler = pipe.scheduler
    leaves = K**W
    tree_scheduler = TreeSDEScheduler.from_scheduler(base_scheduler, branch_factor=K, window_width=W, window_start=S)
    tree = TreeRolloutPipeline.from_pipe(pipe, scheduler=tree_scheduler)
    denoiser = adapter_for(pipe).denoiser
    kwargs = {**family.call_kwargs, "num_inference_steps": T, "output_type": "latent"}

    def run_tree():
        return tree([PROMPT], generator=torch.Generator().manual_seed(0), max_batch_size=64, **kwargs)

    def run_stock():
        pipe.scheduler = base_scheduler
        return pipe(PROMPT, num_images_per_prompt=leaves, generator=torch.Generator().manual_seed(0), **kwargs)

    def run_fixed_batch():
        pipe.scheduler = TreeSDEScheduler.from_scheduler(base_scheduler, branch_factor=K, window_width=W,
                                                         window_start=S).manual_seed(0)
        return pipe(PROMPT, num_images_per_prompt=leaves, generator=torch.Generator().manual_seed(0), **kwargs)

    modes = {"tree": run_tree, "stock": run_stock, "fixed": run_fixed_batch}
    with torch.no_grad():
        if family.full_warmup:
            for fn in modes.values():
                fn()
        else:  # one short call at the largest batch warms the kernels without a full 10-step run
            pipe.scheduler = base_scheduler
            pipe(PROMPT, num_images_per_prompt=leaves, generator=torch.Generator().manual_seed(0),
                 **{**kwargs, "num_inference_steps": 1})
        results = time_modes(modes, denoiser, repeats)
    pipe.scheduler = base_scheduler

    expected = unique_rows(T, K, W, S) * family.cfg
    if results["tree"].rows != expected:
        raise RuntimeError(f"{family.name}: tree rollout spent {results['tree'].rows} rows, formula says {expected}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per mode for the tiny models (median)")
    parser.add_argument("--large-repeats", type=int, default=3, help="timed runs per mode for sd3-large (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    mean_rows = expected_tree_rows()
    machine = platform.processor() or platform.machine()
    print(f"(k, w) = ({K}, {W}), T = {T}, window_start = {S}, {K**W} leaves, 1 prompt; median of {args.repeats} "
          f"runs (sd3-large: {args.large_repeats}); torch {torch.__version__}, {args.threads} threads, {machine}")
    print(f"rows per tree (per CFG half): tree at s = {S}: {unique_rows(T, K, W, S)}; averaged over Eq. 7 "
          f"(r = {WINDOW_RATIO}): {mean_rows:.1f}; independent: {K**W * T}; "
          f"1-min load average at start: {os.getloadavg()[0]:.1f}\n")
    header = ("| model | rows (a) tree | E_s[rows (a)], Eq. 7 | rows (b) independent | rows (c) fixed-batch "
              "| rows b/a | wall s (a / b / c) | wall speedup b/a, c/a | CPU s (a / b / c) | CPU speedup b/a, c/a |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for key in args.families:
        family = FAMILIES[key]
        r = bench_family(family, args.repeats if family.full_warmup else args.large_repeats)
        a, b, c = r["tree"], r["stock"], r["fixed"]
        print(f"| {family.name} | {a.rows} | {mean_rows * family.cfg:.1f} | {b.rows} | {c.rows} "
              f"| {b.rows / a.rows:.2f}× | {a.wall_s:.2f} / {b.wall_s:.2f} / {c.wall_s:.2f} "
              f"| {b.wall_s / a.wall_s:.2f}×, {c.wall_s / a.wall_s:.2f}× "
              f"| {a.cpu_s:.2f} / {b.cpu_s:.2f} / {c.cpu_s:.2f} "
              f"| {b.cpu_s / a.cpu_s:.2f}×, {c.cpu_s / a.cpu_s:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
