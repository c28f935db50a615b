"""The GPU check's report: the markdown table and notes for docs/benchmarks.md, from the results `gpu_check.py`
writes to `gpu_check.json` (also usable on a fetched JSON: `python -c "import json, gpu_check_table as g;
print(g.table(json.load(open('gpu_check.json'))))"` from this folder)."""

from __future__ import annotations


def table(results: dict) -> str:
    """The markdown table and notes for docs/benchmarks.md; a part that failed is named with its error's last line."""
    lines = []
    tree, flat = results.get("tree", {}), results.get("flat", {})
    variants = [(name, results[name]) for name in ("tail", "offload") if name in results]
    for name, part in (("tree", tree), ("flat", flat), *variants):
        if "error" in part:
            lines.append(f"{name}: FAILED ({part['error'].strip().splitlines()[-1]})")

    def cell(part, key, fmt):
        return fmt.format(part[key]) if key in part else "-"

    titles = {"tail": f"tree, tail in {results.get('tail_steps')} solver steps",
              "offload": "tree, text encoders offloaded"}
    rows = [("", "tree (k=3, w=3)", "flat (27 traj., DanceGRPO steps)", *(titles[name] for name, _ in variants))]
    for label, key, fmt in (
            ("s / iteration", "time/epoch_s", "{:.2f}"),
            ("  rollout s (sampling + VAE decode)", "time/rollout_s", "{:.2f}"),
            ("  score s", "time/score_s", "{:.2f}"),
            ("  train s", "time/train_s", "{:.2f}"),
            ("denoiser rows, rollout (CFG halves counted)", "model/rollout_rows", "{}"),
            ("denoiser rows, training", "model/train_rows", "{}"),
            ("peak GPU memory, rollout GiB", "rollout_peak_gib", "{:.2f}"),
            (f"peak GPU memory, training GiB (micro-batch {results.get('micro_batch_size', 2)})", "train_peak_gib",
             "{:.2f}"),
            ("policy/first_ratio_error", "policy/first_ratio_error", "{:.2e}"),
            ("train/grad_norm", "train/grad_norm", "{:.3g}"),
            ("LoRA effect on the denoiser (max rel. change)", "lora_effect", "{:.1e}"),
            ("stock pipeline + exported LoRA vs trained, max rel. error", "lora_reload_max_rel_error", "{:.1e}")):
        rows.append((label, cell(tree, key, fmt), cell(flat, key, fmt),
                     *(cell(part, key, fmt) for _, part in variants)))
    table_lines = ["| " + " | ".join(r) + " |" for r in rows]
    table_lines.insert(1, "|" + "---|" * len(rows[0]))
    lines += table_lines
    if "time/epoch_s" in tree and "time/epoch_s" in flat:
        lines.append(f"\ntree vs flat per iteration: {flat['time/epoch_s'] / tree['time/epoch_s']:.2f}x faster")
    tail = results.get("tail", {})
    if "time/epoch_s" in tail and "time/epoch_s" in flat:
        lines.append(f"tree with a {results.get('tail_steps')}-step tail vs flat per iteration: "
                     f"{flat['time/epoch_s'] / tail['time/epoch_s']:.2f}x faster")
    sweeps = [(name, row) for name, part in (("tree", tree), ("flat", flat))
              for row in part.get("micro_batch_sweep", [])]
    if sweeps:
        lines += ["", "| method | train.micro_batch_size (parents) | peak GPU memory, training GiB | train s | "
                      "first_ratio_error |", "|---|---|---|---|---|"]
        for name, row in sweeps:
            lines.append(f"| {name} | {row['micro_batch_size']} | out of memory | - | - |" if row["oom"] else
                         f"| {name} | {row['micro_batch_size']} | {row['train_peak_gib']:.2f} | "
                         f"{row['train_s']:.2f} | {row['first_ratio_error']:.2e} |")
    speed = flat.get("throughput")
    if speed:
        lines.append(f"\ndenoiser rows/s at {speed['throughput_batch_rows']} rows per forward (latents out): our "
                     f"rollout {speed['ours_rows_per_s']:.1f} ({speed['ours_rows']} rows in {speed['ours_s']:.2f} s), "
                     f"stock pipeline {speed['stock_rows_per_s']:.1f} ({speed['stock_rows']} rows in "
                     f"{speed['stock_s']:.2f} s), stock pipeline driving our training denoiser (accelerate's "
                     f"autocast, fp32 LoRA) {speed['stock_shared_rows_per_s']:.1f}")
    fsdp = results.get("fsdp")
    if fsdp is None:
        lines.append("FSDP (accelerate launch, fsdp.yaml, 1 process): not run (needs CUDA)")
    elif fsdp.get("exit_code") == 0:
        lines.append(f"FSDP (accelerate launch, fsdp.yaml, 1 process): ok, {fsdp['time/epoch_s']:.2f} s/epoch, "
                     f"first_ratio_error {fsdp['policy/first_ratio_error']:.2e}, grad_norm "
                     f"{fsdp['train/grad_norm']:.3g}, LoRA exported: {fsdp['lora_exported']}")
    else:
        detail = fsdp.get("stderr_tail") or fsdp.get("error", "")
        lines.append(f"FSDP (accelerate launch, fsdp.yaml, 1 process): FAILED (exit {fsdp.get('exit_code')}):\n"
                     f"{detail}")
    return "\n".join(lines)
