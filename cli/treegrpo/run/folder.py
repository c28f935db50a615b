"""One run per output folder: a lock while a run holds it, no fresh run over an existing one unless asked, resume
only of checkpoints this recipe wrote, and no writes through symlinks planted in the folder.

The lock is `fcntl.flock` on `<output.dir>/.treegrpo.lock`: the kernel releases it when the process ends, however it
ends (kill -9 included), so a crashed run never leaves it stuck. The file only says who holds it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from treegrpo.errors import UsageError
from treegrpo.recipe.schema import Recipe

logger = logging.getLogger(__name__)

LOCK_NAME = ".treegrpo.lock"
# what a run writes into its folder (and --overwrite removes); nothing else there is touched
RUN_ENTRIES = ("checkpoints", "metrics.jsonl", "final", "samples", "logs", "recipe.resolved.toml", "reward_curve.png",
               "cpu_threads.json")
# fields that change neither results nor the trajectory (a resume may change them)
FREE_FIELDS = {"train.epochs", "train.max_ratio_error", "train.cpu_threads", "data.cache_embeddings",
               "model.offload_text_encoders", "model.offload_rewards"}
FREE_TABLES = ("output.",)


class RunFolderError(UsageError):
    """The output folder cannot be used as asked; the message says why and what to do. Exit code 2."""


class RunLock:
    """Exclusive hold on an output folder for the life of this process (main process only)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_NAME
        self.handle = None
        self.created_folder = False  # the lock made the folder: a run that wrote nothing removes it again

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, the other checks still apply
            return self
        self.created_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_symlink():
            raise RunFolderError(f"{self.path} is a symlink; refusing to write through it.")
        handle = open(self.path, "a+")  # noqa: SIM115  (held open for the life of the run)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # a filesystem without locks (some NFS, Lustre and CIFS mounts): run unlocked rather than refuse
                # every run, and say so; the folder checks below still apply
                logger.warning("output.dir %s: its filesystem does not support file locks (%s); a second run on "
                               "this folder would not be stopped, so start only one.", self.path.parent,
                               err.strerror or err)
                self.handle = handle
                return self
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            handle.close()
            raise RunFolderError(
                f"output.dir {str(self.path.parent)!r} is in use by another treegrpo run ({holder}). Wait for it to "
                "finish, stop it, or set another output.dir.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the descriptor releases the flock
            self.handle = None
            folder = self.path.parent
            if self.created_folder and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
                # a run that failed before writing anything (a model that would not load) leaves no folder behind
                self.path.unlink(missing_ok=True)
                folder.rmdir()


def existing_run(out_dir: Path) -> str | None:
    """What of an earlier run the folder holds, in words, or None."""
    out_dir = Path(out_dir)
    found = []
    checkpoints = out_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append("checkpoints/")
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append(f"metrics.jsonl ({sum(1 for line in metrics.read_text().splitlines() if line.strip())} epochs)")
    if (out_dir / "final").exists():
        found.append("final/")
    return ", ".join(found) or None


def check_no_symlinks(out_dir: Path) -> None:
    """Refuse to run when one of the entries the run writes is a symlink (it would write or delete elsewhere)."""
    out_dir = Path(out_dir)
    names = [*RUN_ENTRIES, LOCK_NAME]
    checkpoints = out_dir / "checkpoints"
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        names += [f"checkpoints/{p.name}" for p in checkpoints.iterdir()]
    for name in names:
        if (out_dir / name).is_symlink():
            raise RunFolderError(f"{out_dir / name} is a symlink; refusing to write through it (it would write or "
                                 "delete files elsewhere). Remove it or set another output.dir.")


def clear_run(out_dir: Path) -> None:
    """--overwrite: remove what an earlier run wrote (only the run's own entries)."""
    for name in RUN_ENTRIES:
        path = Path(out_dir) / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)


def prepare_folder(recipe: Recipe, *, resume: bool, overwrite: bool) -> RunLock | None:
    """Before anything is loaded: lock the folder and check it suits a fresh run or a resume. Main process only;
    returns the lock to hold (None on other processes)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    out_dir = Path(recipe.output.dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunFolderError(f"output.dir = {str(out_dir)!r} is a file, not a folder; set output.dir to a folder.")
    if resume and overwrite:
        raise RunFolderError("--resume continues the run in output.dir and --overwrite replaces it; pass one.")
    check_no_symlinks(out_dir)
    lock = RunLock(out_dir).acquire()
    try:
        held = existing_run(out_dir)
        if not resume and held:
            if not overwrite:
                raise RunFolderError(
                    f"output.dir {str(out_dir)!r} already holds a run ({held}). Continue it with --resume, replace "
                    "it with --overwrite, or set another output.dir.")
            clear_run(out_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def recipe_fingerprint(recipe: Recipe) -> dict:
    """The recipe fields that change a run's trajectory, flattened (`table.key`), plus a hash of each prompt file's
    contents. Output settings and `train.epochs` are left out: a resume may change them."""
    flat = flatten(json.loads(recipe.model_dump_json()))
    fingerprint = {k: v for k, v in flat.items()
                   if k not in FREE_FIELDS and not k.startswith(FREE_TABLES)}
    for key in ("data.prompts", "data.eval_prompts"):
        path = flat.get(key)
        if path and Path(path).is_file():
            fingerprint[f"{key}#sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return fingerprint


def fingerprint_changes(saved: dict, current: dict) -> list[str]:
    """`key: old → new` for every differing field (missing on either side shown as 'unset'). A field one side lacks
    counts as its schema default there: a field a newer treegrpo added, left at its default, does not stop the
    resume of a run that an older version started (nor one a newer version wrote from resuming in an older one)."""
    defaults = schema_defaults()
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k, 'unset')!r} → {current.get(k, 'unset')!r}" for k in keys
            if saved.get(k, defaults.get(k, "unset")) != current.get(k, defaults.get(k, "unset"))]


def schema_defaults() -> dict:
    """`table.key` → default, as the fingerprint holds it (JSON values), for every field of the recipe's top-level
    tables that has a default."""
    out = {}
    for table, table_field in Recipe.model_fields.items():
        model = table_field.annotation
        if not (isinstance(model, type) and hasattr(model, "model_fields")):
            continue  # the [[reward]] lists
        for name, field in model.model_fields.items():
            if not field.is_required():
                out[f"{table}.{name}"] = json.loads(json.dumps(field.get_default(call_default_factory=True),
                                                               default=str))
    return out


def flatten(value, prefix: str = "") -> dict:
    """A nested recipe dict as `table.key` / `reward.0.kind` → value."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): value}
