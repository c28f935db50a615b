"""The README's install lines, tried the way a laptop user runs them: pip's default configuration (no machine-wide
mirrors, find-links or constraints), PyPI, a fresh resolver. Dry runs: nothing is installed.

1. The CPU line (`pip install torch==... --index-url https://download.pytorch.org/whl/cpu`): resolves torch without
   any CUDA library. PyTorch's index is not reachable from every CI machine; then this part says so and is skipped.
2. The GPU line (`pip install torch==...` from PyPI) on Linux x86_64: resolves the CUDA build (nvidia-* libraries),
   which is why the README sends laptop users to the CPU line.
3. The project (`pip install -e .`, with the README's torch pin): every dependency resolves from PyPI alone.

Run from the repository root: `python .ci/check_install.py`. Exit code 1 when a check fails.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_torch_lines() -> tuple[str, str]:
    """(the CPU line's torch requirement and index, the GPU line's requirement) as the README writes them."""
    readme = (ROOT / "README.md").read_text()
    cpu = re.search(r"pip install (torch==[\w.+]+) --index-url (\S+)", readme)
    gpu = re.search(r"`pip install (torch==[\w.+]+) && pip install -e \.`", readme)
    if not cpu or not gpu:
        sys.exit("README.md: the CPU and GPU install lines are not where .ci/check_install.py expects them")
    return f"{cpu.group(1)} {cpu.group(2)}", gpu.group(1)


def dry_run(*args: str) -> list[str]:
    """Names pip would install, with pip's default configuration; raises on a resolution failure."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no pip.conf: no machine mirrors, find-links or constraints
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                               "--report", str(report), *args], env=env, capture_output=True, text=True, cwd=ROOT,
                              timeout=900)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "pip failed")
        return sorted(item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"])


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=15):
            return True
    except OSError:
        return False


def main() -> int:
    cpu, gpu = readme_torch_lines()
    requirement, index = cpu.split()
    failures = []
    linux_x86 = sys.platform == "linux" and platform.machine() == "x86_64"
    start = time.perf_counter()
    if reachable(index):
        names = dry_run(requirement, "--index-url", index)
        cuda = [n for n in names if n.startswith("nvidia-")]
        print(f"CPU line ({requirement} from {index}): {len(names)} packages, CUDA libraries: {cuda or 'none'}")
        if cuda:
            failures.append(f"the CPU line pulls CUDA libraries {cuda}")
    else:
        print(f"CPU line: {index} is not reachable from this machine; skipped")
    # the GPU line and the project in one resolution: `pip install torch==... && pip install -e .`
    names = dry_run(gpu, "-e", ".", "--index-url", "https://pypi.org/simple")
    print(f"GPU line + project (-e . with {gpu}): {len(names)} packages resolve from PyPI")
    if linux_x86:
        cuda = [n for n in names if n.startswith("nvidia-")]
        print(f"  of which CUDA libraries: {len(cuda)} ({', '.join(cuda[:3])}, ...)")
        if not cuda:
            failures.append("PyPI's torch no longer pulls CUDA on Linux: revisit the README's install advice")
    print(f"checked in {time.perf_counter() - start:.0f} s")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
