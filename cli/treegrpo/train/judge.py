"""One run's evaluations (train/evaluation.py) over time: `eval.jsonl`, the best evaluation's weights as `best/`,
and the collapse check. What it remembers lives in the trainer state, so a resumed run judges exactly as the
uninterrupted one (the best score and epoch, every evaluation the collapse check compares)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from treegrpo.run.metrics import MetricsLog
from treegrpo.train.evaluation import EvalPoint, best_by_name, collapsing, evaluate_policy, is_evaluation_epoch
from treegrpo.train.export import ema_applied, full_state, replace_folder

if TYPE_CHECKING:
    from treegrpo.run.checkpoint import TrainerState
    from treegrpo.run.setup import Run


@dataclass
class Verdict:
    """What one evaluation found: its metrics (merged into that epoch's metrics), whether it is the best so far,
    and whether the evaluations look like a collapse (`evaluation.collapsing`)."""

    metrics: dict[str, float]
    best: bool
    collapsing: bool


@dataclass
class PolicyJudge:
    run: Run
    prompts: list[str]
    metadata: list[dict] | None
    log: MetricsLog
    history: list[EvalPoint] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int | None = None
    train_rewards: list[float] = field(default_factory=list)  # `reward/mean` of the epochs since the last evaluation

    @classmethod
    def start(cls, run: Run, prompts: list[str], metadata: list[dict] | None, state: TrainerState | None
              ) -> PolicyJudge:
        """A fresh run (`state` None) or a resumed one: `eval.jsonl` keeps the evaluations up to the checkpoint."""
        epoch = state.epoch if state is not None else None
        log = MetricsLog(run.out_dir / "eval.jsonl", resume_after_epoch=None if epoch is None else epoch + 1,
                         enabled=run.accelerator.is_main_process and bool(run.eval_rewards))
        judge = cls(run, prompts, metadata, log)
        if state is not None:
            judge.history = [EvalPoint.from_dict(point) for point in state.evaluations]
            judge.best_score, judge.best_epoch = state.best_reward, state.best_epoch
            judge.train_rewards = list(state.train_rewards_since_eval)
        return judge

    @property
    def enabled(self) -> bool:
        return bool(self.run.eval_rewards)

    @property
    def best_by(self) -> str:
        return best_by_name(self.run.recipe)

    def due(self, epochs_done: int) -> bool:
        recipe = self.run.recipe
        every = recipe.evaluation.every or recipe.output.eval_every
        return self.enabled and is_evaluation_epoch(epochs_done, every, recipe.train.epochs)

    def state_fields(self) -> dict:
        """What the trainer state keeps for an exact resume."""
        return {"best_reward": self.best_score, "best_epoch": self.best_epoch,
                "evaluations": [point.to_dict() for point in self.history],
                "train_rewards_since_eval": list(self.train_rewards)}

    def evaluate(self, epochs_done: int) -> Verdict:
        """Evaluate the weights that would be exported; a new best is written to `best/` (every process joins:
        sharded weights are gathered)."""
        run, settings = self.run, self.run.recipe.evaluation
        run.reporter.phase("evaluation")  # what an out-of-memory line names
        with ema_applied(run):
            metrics = evaluate_policy(run, self.prompts, self.metadata)
            score = metrics[f"eval/{self.best_by}/mean"]
            best = self.best_score is None or score > self.best_score
            if best:
                full = full_state(run)
                if run.accelerator.is_main_process:
                    self._write_best(epochs_done, score, full)
        run.accelerator.wait_for_everyone()
        if best:
            self.best_score, self.best_epoch = score, epochs_done
        train_reward = sum(self.train_rewards) / len(self.train_rewards) if self.train_rewards else None
        self.history.append(EvalPoint(epochs_done, score, metrics["eval/diversity"], train_reward))
        self.train_rewards = []
        self.log.write({"epoch": epochs_done, **metrics, "eval/best": best})
        return Verdict(metrics, best,
                       collapsing(self.history, settings.collapse_patience, settings.collapse_tolerance))

    def _write_best(self, epochs_done: int, score: float, full: dict | None) -> None:
        about = {"epochs_done": epochs_done, "reward": self.best_by, "score": score}
        replace_folder(self.run, self.run.out_dir / "best", full, {"best.json": json.dumps(about, indent=2) + "\n"})
