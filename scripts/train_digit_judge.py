"""Train and ship the digits **judge**: a second digit classifier that no training run ever optimises, so benchmark
accuracies cannot be inflated by the policy learning the reward classifier's blind spots (reward hacking).

It differs from the reward's classifier (`builtin/digits/classifier`, the `digits` reward) in everything it can:
- data: it trains on the 30 % of scikit-learn's digits that the reward's classifier never trained on (its validation
  and test splits, 540 images), and is scored on the reward's 70 % training split, which it never saw;
- architecture: a wider first layer, one conv block less, a bigger head (`DigitClassifierConfig(channels=(24, 48),
  hidden=128)`), a different seed and no temperature fit (only its argmax is used).

Usage (needs scikit-learn, a build-time extra; about a minute on 2 cores):

    python scripts/train_digit_judge.py          # writes cli/treegrpo/builtin/digits/judge
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_data import fit_classifier, load_data  # noqa: E402  (the same data and training loop)

from treegrpo.builtin import BUILTIN_DIGITS_DIR  # noqa: E402
from treegrpo.rewards.digits import (  # noqa: E402
    DigitClassifier,
    DigitClassifierConfig,
    load_digit_classifier,
    save_digit_classifier,
)

JUDGE_CONFIG = DigitClassifierConfig(channels=(24, 48), hidden=128)


def train_judge(seed: int, epochs: int) -> tuple[DigitClassifier, dict]:
    data = load_data(0)  # the reward classifier's split (its seed 0), so the judge's data is exactly its held-out part
    judge_train = np.concatenate([data.val, data.test])
    model = fit_classifier(JUDGE_CONFIG, data.pixels[judge_train], data.labels[judge_train], seed=seed,
                           epochs=epochs, batch=32)
    reward = load_digit_classifier()
    with torch.no_grad():
        unseen = torch.as_tensor(data.train)
        judged = model(data.pixels[unseen]).argmax(-1)
        rewarded = reward(data.pixels[unseen]).argmax(-1)
    report = {
        "train_images": int(len(judge_train)),
        "unseen_images": int(len(unseen)),
        "unseen_accuracy": round((judged == data.labels[unseen]).float().mean().item(), 4),
        "agreement_with_reward_classifier": round((judged == rewarded).float().mean().item(), 4),
        "seed": seed,
        "epochs": epochs,
    }
    return model, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BUILTIN_DIGITS_DIR / "judge")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=120)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, report = train_judge(args.seed, args.epochs)
    shutil.rmtree(args.out, ignore_errors=True)
    save_digit_classifier(model, args.out, extra={"role": "judge (never a training reward)", "training": report})
    print(report)


if __name__ == "__main__":
    main()
