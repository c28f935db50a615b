"""How long each mistake a newcomer makes takes to come back as one line: the CLI run as a user runs it (a fresh
`python -m treegrpo` process each time), wall clock until exit. The checks that need no model are judged before
torch or diffusers is imported (tests/test_first_hour.py checks that; this measures the seconds).

    python benchmarks/first_hour.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cases(work: Path) -> list[tuple[str, list[str]]]:
    recipe = ROOT / "recipes" / "digits.toml"
    done = work / "finished"
    (done / "checkpoints" / "epoch-000001").mkdir(parents=True)
    (done / "metrics.jsonl").write_text('{"epoch": 0}\n')
    return [
        ("recipe typo (--set tree.brnch_factor=2)", ["check", str(recipe), "--set", "tree.brnch_factor=2"]),
        ("number written as a string", ["check", str(recipe), "--set", 'train.learning_rate="3e-4"']),
        ("output.dir holds a finished run", ["run", str(recipe), "--set", f'output.dir="{done}"']),
        ("--best-of-tree without --reward", ["sample", "builtin:digits", "--prompt", "a", "--best-of-tree"]),
        ("--prompts file missing", ["sample", "builtin:digits", "--prompts", str(work / "nope.txt")]),
        ("unknown option", ["sample", "builtin:digits", "--nope"]),
        ("Hub model not cached, offline", ["sample", "nosuchorg/nosuchmodel", "--prompt", "a"]),
    ]


def main() -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    print("| mistake | exit code | seconds | message |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, args in cases(Path(folder)):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "treegrpo", *args], capture_output=True, text=True, env=env,
                                  cwd=folder, timeout=300)
            seconds = time.perf_counter() - start
            line = next((x for x in done.stderr.splitlines() if x.startswith("error:")), done.stderr.strip()[-80:])
            print(f"| {name} | {done.returncode} | {seconds:.1f} | {line[:110]} |")


if __name__ == "__main__":
    main()
