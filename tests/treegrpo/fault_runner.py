"""`python fault_runner.py run RECIPE ...`: the treegrpo CLI with one fault injected, chosen by TREEGRPO_FAULT:

- `kill-mid-checkpoint:N`: SIGKILL after accelerate wrote checkpoint N's state, before it is published
- `kill-in-training:N`: SIGKILL at the start of training in the N-th epoch (1-based)
- `sigterm-in-scoring:N`: SIGTERM to itself while scoring the N-th epoch (the run must checkpoint and exit 143)

The fault is patched in here, so production code carries no test hooks and the recipe stays the same as the
uninterrupted run's (a resume checks that it is).
"""

import os
import signal
import sys

from accelerate import Accelerator

import treegrpo.train.grpo
import treegrpo.train.trainer
from treegrpo.app import main

kind, _, count = os.environ.get("TREEGRPO_FAULT", "none:0").partition(":")
target = int(count or 0)
calls = [0]


def _nth_call() -> bool:
    calls[0] += 1
    return calls[0] == target


if kind == "kill-mid-checkpoint":
    original_save_state = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        result = original_save_state(self, output_dir, **kwargs)
        if f"epoch-{target:06d}" in str(output_dir):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    Accelerator.save_state = save_state
elif kind == "kill-in-training":
    original_train = treegrpo.train.trainer.train_on_record

    def train_on_record(**kwargs):
        if _nth_call():
            os.kill(os.getpid(), signal.SIGKILL)
        return original_train(**kwargs)

    treegrpo.train.trainer.train_on_record = train_on_record
elif kind == "sigterm-in-scoring":
    import treegrpo.train.overlap

    original_score = treegrpo.train.overlap.score_frames  # the epoch's scoring (grouped or not) goes through it

    def score_frames(*args, **kwargs):
        if _nth_call():
            os.kill(os.getpid(), signal.SIGTERM)
        return original_score(*args, **kwargs)

    treegrpo.train.overlap.score_frames = score_frames

if __name__ == "__main__":
    sys.argv[0] = "treegrpo"
    main()
