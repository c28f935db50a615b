"""What `treegrpo info` reports: package versions, the torch device and CPU threads.

Nothing here imports an optional package at module import time; a missing package reads "not installed".
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from importlib import metadata

import treegrpo

NOT_INSTALLED = "not installed"

# (row label, distribution name on PyPI)
PACKAGES = (
    ("diffusers_tree", "diffusers-tree"),
    ("torch", "torch"),
    ("diffusers", "diffusers"),
    ("transformers", "transformers"),
    ("accelerate", "accelerate"),
    ("peft", "peft"),
)


@dataclass(frozen=True)
class EnvRow:
    """One line of the `treegrpo info` table."""

    name: str
    value: str


def package_version(distribution: str) -> str:
    """Installed version of `distribution`, or "not installed". Reads package metadata without importing it."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED


def torch_device() -> str:
    """The accelerator torch would use: "cuda (<name>, <count> devices)", "mps" or "cpu"."""
    try:
        import torch
    except ImportError:
        return f"torch {NOT_INSTALLED}"
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return f"cuda ({torch.cuda.get_device_name(0)}, {count} device{'s' if count > 1 else ''})"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_threads() -> str:
    """Threads torch uses for CPU ops (follows OMP_NUM_THREADS) and the machine's logical CPU count."""
    try:
        import torch
    except ImportError:
        return f"{os.cpu_count()} logical CPUs"
    return f"{torch.get_num_threads()} (torch), {os.cpu_count()} logical CPUs"


def collect_env() -> list[EnvRow]:
    """All rows of `treegrpo info`, in display order."""
    rows = [EnvRow("python", platform.python_version()), EnvRow("treegrpo", treegrpo.__version__)]
    rows += [EnvRow(label, package_version(distribution)) for label, distribution in PACKAGES]
    rows += [EnvRow("torch device", torch_device()), EnvRow("cpu threads", cpu_threads())]
    return rows
