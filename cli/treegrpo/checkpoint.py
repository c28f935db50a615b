"""Checkpoints: accelerate state (model, optimizer, RNG streams) + trainer state + the LoRA, written atomically.

Layout: `<output.dir>/checkpoints/epoch-000010/` holds `accelerate/`, `trainer_state.json` and, with LoRA,
`pytorch_lora_weights.safetensors`. Each is first written to `.tmp-epoch-000010` and renamed when complete, so a
crash mid-write never leaves a checkpoint that looks whole.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

PREFIX = "epoch-"


@dataclass
class TrainerState:
    """What besides accelerate's state a resume needs. `epoch` = number of completed epochs."""

    epoch: int
    prompt_position: int
    seed: int
    best_reward: float | None = None


def checkpoint_dir(output_dir: Path, epoch: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"{PREFIX}{epoch:06d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir()
            if p.is_dir() and p.name.startswith(PREFIX) and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.removeprefix(PREFIX)))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator, output_dir: Path, state: TrainerState, *, save_lora=None, keep: int = 3) -> Path:
    """Save on every process (accelerate needs all ranks), publish atomically from the main process."""
    final = checkpoint_dir(output_dir, state.epoch)
    tmp = final.parent / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "accelerate").mkdir(parents=True)  # before any rank writes its RNG state into it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))
    accelerator.wait_for_everyone()  # every rank's files are written before the folder is published
    if accelerator.is_main_process:
        if save_lora is not None:
            save_lora(tmp)
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> TrainerState:
    accelerator.load_state(str(Path(path) / "accelerate"))
    return TrainerState(**json.loads((Path(path) / "trainer_state.json").read_text()))
