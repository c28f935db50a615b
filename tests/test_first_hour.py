"""What a newcomer gets wrong first is judged before torch or diffusers is imported (seconds, not the 8–20 s of the
heavy imports): a finished or busy output.dir, --best-of-tree without --reward, a missing --prompts file, a recipe
typo. Timed by benchmarks/first_hour.py; here only where the judgement happens."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import sys; from treegrpo.app import main; sys.argv = ['treegrpo'] + sys.argv[1:]\n"
         "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
         "print(code, 'torch' in sys.modules, 'diffusers' in sys.modules)")


def _finished_run(folder: Path) -> Path:
    run = folder / "finished"
    (run / "checkpoints" / "epoch-000001").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n')
    return run


@pytest.mark.parametrize("case", ["finished output.dir", "best-of-tree without reward", "missing prompts file"])
def test_judged_before_the_heavy_imports(tmp_path, case):
    recipe = ROOT / "recipes" / "digits.toml"
    args, expected = {
        "finished output.dir": (["run", str(recipe), "--set", f'output.dir="{_finished_run(tmp_path)}"'],
                                "already holds a run"),
        "best-of-tree without reward": (["sample", "builtin:digits", "--prompt", "a", "--best-of-tree"],
                                        "--best-of-tree needs --reward KIND"),
        "missing prompts file": (["sample", "builtin:digits", "--prompts", str(tmp_path / "nope.txt")],
                                 "--prompts = "),
    }[case]
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=tmp_path)
    assert done.stdout.split()[-3:] == ["2", "False", "False"], done.stdout + done.stderr
    assert expected in done.stderr
