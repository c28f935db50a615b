"""Checkpoints: accelerate state (model, optimizer, RNG streams) + trainer state + EMA + the LoRA, written atomically,
read back with a fallback past damaged ones.

Layout: `<output.dir>/checkpoints/epoch-000010/` holds `accelerate/`, `trainer_state.json`, with EMA `ema/rank-N
.safetensors` (one file per process: under FSDP each holds its shard), and with LoRA
`pytorch_lora_weights.safetensors`. Everything is first written to `.tmp-epoch-000010` and renamed when complete, so a
crash mid-write never leaves a checkpoint that looks whole. Only folders named exactly `epoch-NNNNNN` are ours; our own
state is JSON and safetensors (nothing of ours is unpickled).
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from treegrpo.errors import TrainingError

PREFIX = "epoch-"
NAME = re.compile(r"^epoch-(\d{6,})$")
MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.bin")
OPTIMIZER_FILES = ("optimizer.bin", "optimizer.pt")


class CheckpointError(TrainingError):
    """A checkpoint cannot be written or read; the message is one line naming the path and the reason."""


@dataclass
class TrainerState:
    """What besides accelerate's state a resume needs. `epoch` = number of completed epochs; `recipe` = the
    trajectory-defining recipe fields (`rundir.recipe_fingerprint`) of the run that wrote it."""

    epoch: int
    prompt_position: int
    seed: int
    best_reward: float | None = None  # the best evaluation's score (train/judge.py), and its epoch
    best_epoch: int | None = None
    evaluations: list = field(default_factory=list)  # every evaluation the collapse check compares
    train_rewards_since_eval: list = field(default_factory=list)
    recipe: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"trainer_state.json is not valid JSON ({err.msg})") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not {"epoch", "prompt_position", "seed"} <= set(data):
            raise CheckpointError("trainer_state.json lacks epoch/prompt_position/seed")
        if not all(isinstance(data[k], int) and not isinstance(data[k], bool) for k in ("epoch", "prompt_position",
                                                                                            "seed")):
            raise CheckpointError("trainer_state.json: epoch, prompt_position and seed must be integers")
        return cls(**{k: v for k, v in data.items() if k in names})


def checkpoint_dir(output_dir: Path, epoch: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"{PREFIX}{epoch:06d}"


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch in a checkpoint folder's name, or None when the folder is not ours (e.g. `epoch-000009-backup`)."""
    match = NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Published checkpoints (named `epoch-NNNNNN`, with a trainer_state.json), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and checkpoint_epoch(p) is not None
            and (p / "trainer_state.json").is_file()]
    return sorted(done, key=checkpoint_epoch)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def describe_newest(output_dir: Path) -> str:
    """For messages after a failure: which checkpoint a `--resume` would start from."""
    newest = latest_checkpoint(output_dir)
    if newest is None:
        return "no checkpoint has been written yet"
    return f"the newest checkpoint is {newest} ({checkpoint_epoch(newest)} epochs; continue with --resume)"


def checkpoint_problem(path: Path, max_epoch: int, *, with_ema: bool) -> str | None:
    """What is wrong with a checkpoint folder that can be seen without loading it, or None."""
    path = Path(path)
    try:
        state = TrainerState.from_json((path / "trainer_state.json").read_text())
    except (OSError, UnicodeDecodeError) as err:
        return f"trainer_state.json unreadable ({err})"
    except CheckpointError as err:
        return str(err)
    if state.epoch != checkpoint_epoch(path):
        return f"trainer_state.json says epoch {state.epoch} but the folder is {path.name}"
    if not 1 <= state.epoch <= max_epoch:
        return f"epoch {state.epoch} is outside this recipe's 1 … {max_epoch} (train.epochs)"
    accelerate = path / "accelerate"
    present = {p.name for p in accelerate.iterdir()} if accelerate.is_dir() else set()
    if not present & set(MODEL_FILES):
        return "accelerate/ has no model file"
    if not present & set(OPTIMIZER_FILES):
        return "accelerate/ has no optimizer file"
    files = [accelerate / "model.safetensors"] if "model.safetensors" in present else []
    if with_ema:
        ema_files = sorted((path / "ema").glob("rank-*.safetensors"))
        if not ema_files:
            return "the EMA state (ema/) is missing"
        files += ema_files
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # noqa: BLE001  (any damage: truncated header, garbage)
            return f"{file.relative_to(path)} is damaged ({type(err).__name__})"
    return None


def load_checkpoint(accelerator, path: Path, ema=None) -> TrainerState:
    """Restore model, optimizer and RNG streams (accelerate), then EMA (ours, safetensors)."""
    path = Path(path)
    accelerator.load_state(str(path / "accelerate"))
    if ema is not None:
        ema.load_tensors(load_file(str(path / "ema" / f"rank-{accelerator.process_index}.safetensors")))
    return TrainerState.from_json((path / "trainer_state.json").read_text())


def load_newest_intact(accelerator, output_dir: Path, max_epoch: int, *, ema=None, warn=print,
                       check=None) -> tuple[Path, TrainerState]:
    """Load the newest checkpoint that is intact, warning about each damaged newer one. `check(state)` may raise to
    refuse a checkpoint outright (e.g. written by another recipe): that is not damage, so there is no fallback.
    Raises `CheckpointError` when none loads."""
    found = list_checkpoints(output_dir)
    if not found:
        raise CheckpointError(f"--resume: no checkpoint in {Path(output_dir) / 'checkpoints'}; start without "
                              "--resume.")
    reasons = []
    for path in reversed(found):
        problem = checkpoint_problem(path, max_epoch, with_ema=ema is not None)
        if problem is None:
            if check is not None:
                check(TrainerState.from_json((path / "trainer_state.json").read_text()))
            try:
                return path, load_checkpoint(accelerator, path, ema)
            except Exception as err:  # noqa: BLE001  (a file that passed the quick check but does not load)
                problem = f"it does not load ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        reasons.append(f"{path.name}: {problem}")
        warn(f"checkpoint {path} is damaged ({problem}); trying an older one.")
    raise CheckpointError(f"--resume: no intact checkpoint in {Path(output_dir) / 'checkpoints'} "
                          f"({'; '.join(reasons)}). Start without --resume (with --overwrite) or restore a copy.")


def save_checkpoint(accelerator, output_dir: Path, state: TrainerState, *, save_lora=None, ema=None,
                    keep: int = 3) -> Path:
    """Save on every process (accelerate needs all ranks), publish atomically from the main process. A failed write
    (disk full) removes the temporary folder and raises `CheckpointError`; published checkpoints are untouched."""
    final = checkpoint_dir(output_dir, state.epoch)
    tmp = final.parent / f".tmp-{final.name}"
    try:
        if accelerator.is_main_process:
            _remove(tmp)
            (tmp / "accelerate").mkdir(parents=True)  # before any rank writes its RNG state into it
            if ema is not None:
                (tmp / "ema").mkdir()
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "accelerate"))
        if ema is not None:
            save_file(ema.tensors(), str(tmp / "ema" / f"rank-{accelerator.process_index}.safetensors"))
        accelerator.wait_for_everyone()  # every rank's files are written before the folder is published
        if accelerator.is_main_process:
            if save_lora is not None:
                save_lora(tmp)
            (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
            _remove(final)
            tmp.rename(final)
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(write_failure(tmp, err)) from None
    accelerator.wait_for_everyone()
    return final


def write_failure(path: Path, err: OSError) -> str:
    """One line for a failed write: the path, the OS reason and, when the disk is full, the free space."""
    message = f"could not write {path}: {err.strerror or err}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(Path(path).parent if not Path(path).exists() else path).free
            message += f" ({free / 2**30:.2f} GiB free there)"
        except OSError:
            pass
    return message


def all_finite(tensors, accelerator) -> bool:
    """Whether every tensor is finite on every process (one all-reduce)."""
    bad = sum(int(not torch.isfinite(t.detach().to_local() if hasattr(t, "to_local") else t.detach()).all())
              for t in tensors)
    flag = torch.tensor([float(bad)], device=accelerator.device)
    return float(accelerator.reduce(flag, reduction="sum")) == 0


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
