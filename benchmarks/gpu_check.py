"""The GPU check: the real trainer on a real-size model, in one command, with nothing downloaded.

    python benchmarks/gpu_check.py                 # on a GPU: SD3.5-Medium size, bf16, 512 px, 27 leaves, LoRA r 32
    python benchmarks/gpu_check.py --size tiny     # the smallest setting (what CPU CI runs, ~1 min on 2 cores)

What it does (random weights, built from config; the numbers are about speed, memory and plumbing, not quality):
1. Builds an SD3.5-Medium-size pipeline (MMDiT 24 layers × 1536, 16-channel VAE of SD3; small text encoders of the
   real widths) and saves it in the diffusers layout, as users' models come.
2. Trains it with `treegrpo.train.trainer` (setup → run_epoch → finish, the code `treegrpo run` runs) for TreeGRPO
   (k=3, w=3: 27 leaves) and for the flat baseline at equal leaves (27 SDE trajectories from one noise,
   dance_sde η 0.3, timestep_fraction 0.6), rollout and training at different batch shapes (rollout
   `max_batch_size` 64 rows, training `micro_batch_size` 2 parents), so `policy/first_ratio_error` shows
   whether bf16 re-scoring agrees with sampling.
3. Loads the exported LoRA into a stock `StableDiffusion3Pipeline` and compares its denoiser with the trained one.
4. Runs one tree epoch through `accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 1`
   (CUDA only: accelerate does not set up FSDP on a CPU).
Prints a markdown table (paste it into docs/benchmarks.md) and writes `<out>/gpu_check.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_setup import PROMPTS, REWARD_MODULE, SIZES, build_model, write_recipe  # noqa: E402
from gpu_check_table import table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
class PeakMemory:
    """Wraps the rollout pipeline: peak GPU memory while sampling, then resets the counter for the training phase."""

    def __init__(self, rollout):
        self._rollout, self.rollout_peak = rollout, 0

    def __getattr__(self, name):
        return getattr(self._rollout, name)

    def __call__(self, *args, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        out = self._rollout(*args, **kwargs)
        if torch.cuda.is_available():
            self.rollout_peak = max(self.rollout_peak, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        return out


def train_one(recipe_path: Path, *, micro_batch_sweep: tuple[int, ...] = (), throughput: bool = False) -> dict:
    """The trainer's own code path: setup, epochs, final export. Returns the last epoch's metrics and memory; with
    `micro_batch_sweep`, one more epoch per training micro-batch size (peak memory and train time of each); with
    `throughput`, the rollout's denoiser rows per second against the stock pipeline's."""
    from treegrpo.recipe.loading import load_recipe
    from treegrpo.run.metrics import MetricsLog
    from treegrpo.run.reporting import Reporter
    from treegrpo.run.setup import setup
    from treegrpo.train.trainer import finish, run_epoch

    recipe = load_recipe(recipe_path)
    reporter = Reporter(enabled=False)
    t0 = time.perf_counter()
    run = setup(recipe, reporter)
    setup_s = time.perf_counter() - t0
    peak = PeakMemory(run.rollout)
    run.rollout = peak
    run.out_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run.out_dir / "metrics.jsonl")
    train_peak = 0
    for epoch in range(recipe.train.epochs):
        metrics = run_epoch(run, epoch)
        log.write(metrics)
        if torch.cuda.is_available():
            train_peak = max(train_peak, torch.cuda.max_memory_allocated())
    result = {key: metrics[key] for key in ("time/rollout_s", "time/score_s", "time/train_s", "time/epoch_s",
                                            "model/rollout_rows", "model/train_rows", "model/trained_parents",
                                            "policy/first_ratio_error", "train/grad_norm", "tree/window_start")}
    result.update(setup_s=setup_s, rollout_peak_gib=peak.rollout_peak / 2**30, train_peak_gib=train_peak / 2**30)
    if micro_batch_sweep:
        result["micro_batch_sweep"] = sweep_micro_batches(run, recipe.train.epochs, micro_batch_sweep)
    run.rollout = peak._rollout
    finish(run, log, PROMPTS[:1])
    result.update(lora_reload_check(run, recipe, throughput=throughput))
    del run
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def sweep_micro_batches(run, first_epoch: int, sizes: tuple[int, ...]) -> list[dict]:
    """One epoch per `train.micro_batch_size` in `sizes` (parents per training forward/backward): peak GPU memory of
    scoring + training (the rollout's peak is reset when it ends) and train seconds. Stops at the first size that
    runs out of memory, so the last row that fits is the largest that does."""
    from treegrpo.train.trainer import run_epoch

    rows, base = [], run.recipe
    for offset, size in enumerate(sizes):
        run.recipe = base.model_copy(update={"train": base.train.model_copy(update={"micro_batch_size": size})})
        try:
            metrics = run_epoch(run, first_epoch + offset)
        except torch.cuda.OutOfMemoryError:
            run.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            rows.append({"micro_batch_size": size, "oom": True})
            print(f"micro_batch_size {size}: out of memory", flush=True)
            break
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        rows.append({"micro_batch_size": size, "oom": False, "train_peak_gib": peak,
                     "train_s": metrics["time/train_s"], "train_rows": metrics["model/train_rows"],
                     "first_ratio_error": metrics["policy/first_ratio_error"]})
        print(f"micro_batch_size {size}: {json.dumps(rows[-1])}", flush=True)
    run.recipe = base
    return rows


def _timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def denoiser_throughput(run, recipe, stock) -> dict:
    """Denoiser rows per second: our rollout (this run's plan, one prompt, latents out, rollout chunks of as many
    rows as the stock pipeline's batch) against the stock pipeline generating the same number of leaves with the
    same steps and CFG (every forward `2 · leaves` rows). Both carry the same LoRA, both after a warm-up call."""
    leaves = run.rollout.scheduler.plan.num_leaves
    kwargs = run.sampling.as_kwargs()
    steps = recipe.sampling.num_inference_steps
    batch_rows = 2 * leaves

    def ours():
        conditioning = run.rollout.encode(PROMPTS[:1], guidance_scale=kwargs["guidance_scale"],
                                          negative_prompt=kwargs["negative_prompt"], height=kwargs["height"],
                                          width=kwargs["width"], max_sequence_length=kwargs["max_sequence_length"])
        with torch.no_grad():
            out = run.rollout(PROMPTS[:1], num_inference_steps=steps, window_start=0, conditioning=conditioning,
                              height=kwargs["height"], width=kwargs["width"],
                              generator=[torch.Generator().manual_seed(0)], max_batch_size=batch_rows,
                              output_type="latent")
        ours.rows = out.rows

    def stock_loop(pipe):
        with torch.no_grad():
            pipe(prompt=PROMPTS[0], num_images_per_prompt=leaves, num_inference_steps=steps,
                 guidance_scale=kwargs["guidance_scale"], height=kwargs["height"], width=kwargs["width"],
                 max_sequence_length=kwargs["max_sequence_length"], output_type="latent",
                 generator=torch.Generator().manual_seed(0))

    ours()
    ours_s = _timed(ours)
    stock_loop(stock)
    theirs_s = _timed(lambda: stock_loop(stock))
    # the same stock loop around the module our rollout calls (accelerate's autocast-wrapped forward, fp32 LoRA):
    # what is left between this and ours is our loop's own overhead
    shared = type(stock)(**{**stock.components, run.denoiser_name: run.rollout.adapter.model,
                            "scheduler": type(stock.scheduler).from_config(stock.scheduler.config)})
    shared.set_progress_bar_config(disable=True)
    stock_loop(shared)
    shared_s = _timed(lambda: stock_loop(shared))
    stock_rows = 2 * leaves * steps
    return {"throughput_batch_rows": batch_rows, "ours_rows": ours.rows, "ours_s": ours_s,
            "ours_rows_per_s": ours.rows / ours_s, "stock_rows": stock_rows, "stock_s": theirs_s,
            "stock_rows_per_s": stock_rows / theirs_s, "stock_shared_s": shared_s,
            "stock_shared_rows_per_s": stock_rows / shared_s}


def lora_reload_check(run, recipe, *, throughput: bool = False) -> dict:
    """The exported LoRA in a stock pipeline against the trained denoiser: max relative difference of their outputs,
    whether the adapter was loaded at all, and how much the LoRA changes the output (if it barely does, a matching
    output proves nothing: the learning rate here is 1e-3 so that two updates move it visibly)."""
    from diffusers import StableDiffusion3Pipeline

    from treegrpo.model.loading import DTYPES

    dtype = DTYPES[recipe.model.dtype]
    device = run.accelerator.device
    stock = StableDiffusion3Pipeline.from_pretrained(recipe.model.pretrained, dtype=dtype).to(device)
    stock.load_lora_weights(run.out_dir / "final", weight_name="pytorch_lora_weights.safetensors")
    trained = run.accelerator.unwrap_model(run.model)
    config = stock.transformer.config
    g = torch.Generator().manual_seed(0)
    side = recipe.sampling.height // stock.vae_scale_factor
    inputs = dict(
        hidden_states=torch.randn(1, config.in_channels, side, side, generator=g).to(device, dtype),
        timestep=torch.tensor([500.0], device=device),
        encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=g).to(device, dtype),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g).to(device, dtype))
    with torch.no_grad():
        expected = trained(**inputs).sample.float()
        got = stock.transformer(**inputs).sample.float()
        trained.disable_adapters()
        base = trained(**inputs).sample.float()
        trained.enable_adapters()
    scale = expected.abs().max().clamp(min=1e-12)
    result = {"lora_adapter_loaded": bool(getattr(stock.transformer, "peft_config", None)),
              "lora_effect": float((expected - base).abs().max() / scale),
              "lora_reload_max_rel_error": float((got - expected).abs().max() / scale)}
    if throughput:
        stock.set_progress_bar_config(disable=True)
        result["throughput"] = denoiser_throughput(run, recipe, stock)
    del stock
    return result


def fsdp_epoch(recipe_path: Path, out: Path) -> dict:
    """One tree epoch through accelerate launch with recipes/accelerate/fsdp.yaml on one process."""
    run_dir = out / "run_fsdp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "accelerate" / "fsdp.yaml"), "--num_processes", "1", "-m", "treegrpo", "run",
               str(recipe_path), "--set", "train.epochs=1", "--set", f"output.dir={json.dumps(str(run_dir))}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(out), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    result = {"exit_code": proc.returncode, "wall_s": time.perf_counter() - t0, "command": " ".join(command)}
    metrics_file = run_dir / "metrics.jsonl"
    if proc.returncode == 0 and metrics_file.is_file():
        last = json.loads(metrics_file.read_text().splitlines()[-1])
        result.update({k: last[k] for k in ("time/epoch_s", "policy/first_ratio_error", "train/grad_norm")})
        result["lora_exported"] = (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file()
    else:
        result["stderr_tail"] = proc.stderr[-3000:]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="sd35m" if torch.cuda.is_available() else "tiny",
                        help="sd35m (default on a GPU) or tiny (default on a CPU)")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="work folder (model, runs, json)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per method; the last one is reported")
    parser.add_argument("--skip-fsdp", action="store_true", help="do not run the accelerate-launch FSDP epoch")
    parser.add_argument("--parts", default="tree,flat,fsdp", help="comma-separated subset of tree,flat,fsdp,tail,"
                        "offload (tail: the tree with a compressed ODE tail; offload: the tree with its text encoders "
                        "kept in CPU memory, for the memory it frees)")
    parser.add_argument("--tail-steps", type=int, default=2, help="solver steps of the tail part's ODE tail")
    parser.add_argument("--micro-batch-size", type=int, default=2,
                        help="train.micro_batch_size (parents) of both methods' reported epochs")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the micro-batch sweeps and the rows/s comparison with the stock pipeline")
    args = parser.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # keep the printed table readable
    transformers_logging.disable_progress_bar()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (out / "gpu_check_rewards.py").write_text(REWARD_MODULE)
    sys.path.insert(0, str(out))
    epochs = args.epochs or SIZES[args.size]["epochs"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"device: {device}; torch {torch.__version__}; size {args.size}; {epochs} epoch(s) per method", flush=True)
    t0 = time.perf_counter()
    model = build_model(args.size, out / f"model_{args.size}")
    print(f"model built and saved in {time.perf_counter() - t0:.1f} s: {model}", flush=True)
    results: dict = {"device": device, "size": args.size, "torch": torch.__version__}
    failed = False

    def phase(name: str, fn) -> None:
        """Runs one part; a failure is recorded and printed, and the parts after it still run (GPU time is scarce:
        one run must say as much as it can). The JSON is rewritten after every part."""
        nonlocal failed
        try:
            results[name] = fn()
            print(f"{name}: {json.dumps(results[name])}", flush=True)
        except Exception:  # noqa: BLE001 - reported, and the exit code says so
            failed = True
            results[name] = {"error": traceback.format_exc()[-4000:]}
            print(f"{name} FAILED:\n{results[name]['error']}", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2))

    cfg = SIZES[args.size]
    parts = args.parts.split(",")
    extras = not args.no_extras
    mb = args.micro_batch_size
    results["micro_batch_size"] = mb
    if "tree" in parts:
        phase("tree", lambda: train_one(write_recipe(out, model, args.size, "tree", epochs, mb),
                                        micro_batch_sweep=cfg["micro_batch_sweep"] if extras else ()))
    if "flat" in parts:
        phase("flat", lambda: train_one(write_recipe(out, model, args.size, "flat", epochs, mb), throughput=extras,
                                        micro_batch_sweep=cfg["flat_micro_batch_sweep"] if extras else ()))
    if "tail" in parts:
        results["tail_steps"] = args.tail_steps
        phase("tail", lambda: train_one(write_recipe(out, model, args.size, "tree", epochs, mb, variant="tail",
                                                     tail_steps=args.tail_steps)))
    if "offload" in parts:
        phase("offload", lambda: train_one(write_recipe(out, model, args.size, "tree", epochs, mb, variant="offload")))
    if torch.cuda.is_available() and not args.skip_fsdp and "fsdp" in parts:
        write_recipe(out, model, args.size, "tree", epochs)
        phase("fsdp", lambda: fsdp_epoch(out / "tree.toml", out))
    print(table(results))
    print(f"total {time.perf_counter() - t0:.1f} s; results in {out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
