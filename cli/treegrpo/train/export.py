"""Writing the policy out: the weights that would be exported (EMA when on), gathered when sharded, as a LoRA in
the format stock diffusers pipelines load (or the full denoiser without LoRA). `final/` and `best/` use it."""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from treegrpo.model.loading import save_lora
from treegrpo.run.checkpoint import CheckpointError, write_failure
from treegrpo.train.epoch_outputs import is_sharded

if TYPE_CHECKING:
    from treegrpo.run.setup import Run


def ema_applied(run: Run):
    """The EMA weights in place inside the block (what samples, evaluations and exports show), when EMA is on."""
    return run.ema.applied() if run.ema is not None else nullcontext()


def full_state(run: Run) -> dict | None:
    """With FSDP the weights are sharded: gather a full state dict (every process must call this)."""
    return run.accelerator.get_state_dict(run.model) if is_sharded(run) else None


def write_policy(run: Run, folder: Path, full: dict | None) -> None:
    """The current weights (or `full`, a gathered state dict) into `folder`; main process only. One line on failure."""
    try:
        if run.recipe.model.lora is not None:
            save_lora(run.pipe, run.denoiser, run.denoiser_name, folder, full)
        else:
            run.accelerator.unwrap_model(run.model).save_pretrained(folder / run.denoiser_name, state_dict=full)
    except OSError as err:
        raise CheckpointError(f"export to {folder} failed: {write_failure(folder, err)}") from None


def replace_folder(run: Run, folder: Path, full: dict | None, files: dict[str, str] | None = None) -> None:
    """`write_policy` (and the text `files`) into `folder` atomically: written beside it, then renamed over it, so
    a kill mid-write leaves the previous `folder` whole. Main process only."""
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    write_policy(run, staging, full)
    for name, text in (files or {}).items():
        (staging / name).write_text(text)
    previous = folder.with_name(folder.name + ".old")
    shutil.rmtree(previous, ignore_errors=True)
    if folder.exists():
        folder.rename(previous)
    staging.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)
