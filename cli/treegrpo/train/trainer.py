"""The training run: set up once, then for every epoch roll out trees, score the leaves, back advantages up the
tree, and update the policy (the per-epoch math lives in `grpo.py`); checkpoints, metrics, samples, final LoRA."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from treegrpo.errors import Interrupted, TrainingError
from treegrpo.model.loading import save_lora
from treegrpo.recipe.loading import to_toml
from treegrpo.recipe.schema import Recipe
from treegrpo.run.checkpoint import (
    CheckpointError,
    TrainerState,
    all_finite,
    describe_newest,
    load_newest_intact,
    save_checkpoint,
    write_failure,
)
from treegrpo.run.folder import RunLock, fingerprint_changes, prepare_folder, recipe_fingerprint
from treegrpo.run.metrics import MetricsLog, reward_by_window_start, reward_curve
from treegrpo.run.reporting import Reporter
from treegrpo.run.seeds import Stream, training_generator, tree_generators
from treegrpo.run.setup import Run, SetupError, read_prompt_records, setup
from treegrpo.run.signals import StopNow, StopSignals, signal_name
from treegrpo.run.threads import record_cpu_threads, recorded_cpu_threads
from treegrpo.run.tracking import log_grid, log_metrics, start_trackers
from treegrpo.sources import source_paths
from treegrpo.train.epoch_outputs import epoch_metrics, is_sharded, save_samples
from treegrpo.train.evaluation import best_by_name
from treegrpo.train.export import ema_applied, full_state, write_policy
from treegrpo.train.failures import lost_peer, out_of_memory, out_of_memory_message
from treegrpo.train.grpo import (
    epoch_positions,
    epoch_prompt_indices,
    process_share,
    select_edges,
    stop_together,
    train_on_record,
    tree_advantages,
)
from treegrpo.train.judge import PolicyJudge, Verdict
from treegrpo.train.overlap import rollout_and_score

logger = logging.getLogger(__name__)


def run_epoch(run: Run, epoch: int) -> dict:
    """One epoch: rollout → scores → advantages → update. Returns the epoch's metrics (global over processes)."""
    r, acc = run.recipe, run.accelerator
    t0 = time.perf_counter()
    window_start = run.window.start_for_epoch(epoch, r.train.seed) if run.window else 0
    global_indices = epoch_prompt_indices(len(run.prompts), epoch, r.data.prompts_per_epoch, r.train.seed)
    local_indices = process_share(global_indices, acc.process_index, acc.num_processes)
    local_positions = process_share(epoch_positions(epoch, r.data.prompts_per_epoch), acc.process_index,
                                    acc.num_processes)
    local_prompts = [run.prompts[i] for i in local_indices]
    run.reporter.phase("rollout")
    metadata = [run.prompt_metadata[i] for i in local_indices] if run.prompt_metadata else None
    conditioning = run.encode(local_prompts, source_paths(metadata))
    generators = tree_generators(r.train.seed, epoch, local_positions, r.tree.num_trees)
    out = rollout_and_score(run, local_prompts, metadata, conditioning, generators, window_start,
                            before_scoring=lambda: _check_interrupt(run, epoch, stepped=False))
    record, scores = out.record, out.scores
    t1 = out.rollout_end
    stop_together(run.accelerator, out.failure, "scoring")
    t2 = time.perf_counter()
    _check_interrupt(run, epoch, stepped=False)
    run.reporter.phase("training")
    adv = tree_advantages(record, scores, [spec.weight for spec in r.reward], aggregation=r.advantage.aggregation,
                          eps=r.advantage.eps, weighting=r.advantage.weighting,
                          depth_normalize=r.advantage.depth_normalize)
    mask = select_edges(record, algorithm=r.tree.algorithm, timestep_fraction=r.tree.timestep_fraction,
                        generator=tree_generators(r.train.seed, epoch, local_positions, r.tree.num_trees,
                                                  Stream.EDGE_SELECTION))
    stats = train_on_record(accelerator=acc, adapter=run.rollout.adapter, scheduler=run.rollout.scheduler,
                            record=record, conditioning=conditioning, edge_advantage=adv.advantage, edge_mask=mask,
                            optimizer=run.optimizer, params=run.params, train=r.train, adv_clip=r.advantage.clip,
                            generator=training_generator(r.train.seed, epoch, acc.process_index), ema=run.ema,
                            reference=_reference_context(run) if r.train.kl_beta > 0 else None)
    t3 = time.perf_counter()
    metrics = epoch_metrics(run, epoch, window_start, scores, adv, stats, out.rows, (t0, t1, t2, t3), out.images,
                            record.leaf_prompt_index)
    metrics["time/scoring_work_s"] = out.scoring_s
    metrics.update(mean_over_processes(acc, out.extras))
    return metrics


def mean_over_processes(acc, extras: dict[str, float]) -> dict[str, float]:
    """`reward/<key>` → the mean over the processes that have the key: accuracies of rewards that judge right/wrong
    (digits) and sub-scores of remote rewards, which a server may send on one process and not on another. The union
    of keys first (one gather), then every key's sum and count in one all-reduce, so the collectives are the same on
    every process whatever each one's keys."""
    from accelerate.utils import gather_object

    names = sorted(set(extras)) if acc.num_processes == 1 else sorted(set(gather_object(sorted(extras))))
    if not names:
        return {}
    local = torch.tensor([[extras.get(n, 0.0), float(n in extras)] for n in names], dtype=torch.float64,
                         device=acc.device)
    total = acc.reduce(local, reduction="sum").cpu()
    return {f"reward/{n}": float(total[i, 0] / total[i, 1]) for i, n in enumerate(names)}


def _reference_context(run: Run):
    denoiser = run.denoiser

    class _Disabled:
        def __enter__(self):
            denoiser.disable_adapters()

        def __exit__(self, *exc):
            denoiser.enable_adapters()
            return False

    return _Disabled


class _StopAtSafePoint(Exception):
    """Internal: a stop signal was seen at a safe point; `args` = (signum, completed epochs to checkpoint)."""


def _check_interrupt(run: Run, epoch: int, *, stepped: bool) -> None:
    """At a safe point: did any process receive a stop signal? (one all-reduce, so all processes stop together)"""
    received = run.signals.received if run.signals is not None else None
    flag = torch.tensor([float(received or 0)], device=run.accelerator.device)
    signum = int(run.accelerator.gather(flag).max())
    if signum:
        raise _StopAtSafePoint(signum, epoch + (1 if stepped else 0))


def train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, reporter: Reporter | None = None,
          signals: StopSignals | None = None, folder: RunLock | None = None) -> Path:
    """Run the recipe end to end. Returns `<output.dir>/final`.

    Stop signals (see `signals.py`): during setup the run stops at once (nothing written); during training the first
    signal stops at the next safe point with a checkpoint of the completed epochs, a second one at once; during the
    final export the first signal is noted and the export completes. Raises `Interrupted` with what is on disk.
    `folder`: the output folder's lock when the caller already judged and locked it (`prepare_folder`, as
    `treegrpo run` does before the heavy imports); released at the end either way."""
    reporter = reporter or Reporter()
    owned = signals is None
    signals = signals or StopSignals(notify=reporter.warn).install()
    lock = folder
    try:
        if lock is None:
            lock = prepare_folder(recipe, resume=resume, overwrite=overwrite)
        return _train(recipe, resume, reporter, signals)
    except StopNow as stop:
        raise Interrupted(stop.args[0], f"{signal_name(stop.args[0])}: stopped at once; "
                                        f"{describe_newest(Path(recipe.output.dir))}.") from None
    except TrainingError as err:  # CheckpointError too: the message gains what a --resume would start from
        raise TrainingError(f"{str(err).rstrip('.')}; {describe_newest(Path(recipe.output.dir))}.") from None
    except OSError as err:  # a write outside the checkpoint code (metrics, samples, logs): disk full, permissions
        where = Path(err.filename) if err.filename else Path(recipe.output.dir)
        raise TrainingError(f"{write_failure(where, err)}; {describe_newest(Path(recipe.output.dir))}.") from None
    except RuntimeError as err:
        if out_of_memory(err):
            raise TrainingError(out_of_memory_message(recipe, reporter.current_phase, err)) from None
        if not lost_peer(err):
            raise
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise TrainingError(f"another process of this run is gone (crashed, killed, or its node lost): {first} "
                            "This process cannot go on without it; start every node again with --resume: "
                            f"{describe_newest(Path(recipe.output.dir))}.") from None
    finally:
        if owned:
            signals.restore()
        if lock is not None:
            lock.release()
        _leave_process_group()


def _leave_process_group() -> None:
    """Destroy the default process group before the interpreter exits: a gloo group left for the interpreter's
    teardown aborted a 2-process run at exit about 1 time in 6 ("terminate called without an active exception",
    exit -6) after its work was done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _train(recipe: Recipe, resume: bool, reporter: Reporter, signals: StopSignals) -> Path:
    recorded_threads = recorded_cpu_threads(Path(recipe.output.dir)) if resume else None
    run = setup(recipe, reporter, recorded_threads)
    run.signals = signals
    acc, out_dir = run.accelerator, run.out_dir
    state = _resume(run) if resume else None
    start = state.epoch if state is not None else 0
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.resolved.toml").write_text(to_toml(recipe))
        if acc.device.type == "cpu" and recorded_threads is None:
            record_cpu_threads(out_dir, torch.get_num_threads())
    metrics_log = MetricsLog(out_dir / "metrics.jsonl", resume_after_epoch=start if resume else None,
                             enabled=acc.is_main_process, warn=reporter.warn)
    tracking = start_trackers(acc, recipe, reporter.warn)
    eval_prompts, eval_metadata = _evaluation_prompts(run)
    judge = PolicyJudge.start(run, eval_prompts, eval_metadata, state)
    eval_sources = source_paths(eval_metadata)  # editing models: the grids edit the evaluation prompts' sources
    if start == 0:
        save_samples(run, out_dir / "samples" / "before.png", eval_prompts, recipe.train.seed, eval_sources)
        if judge.due(0):
            _report_evaluation(run, judge.evaluate(0), 0)
    signals.deferred = True  # from here a first signal means: checkpoint at the next safe point
    try:
        _epochs(run, start, judge, metrics_log, eval_prompts, eval_sources)
    except _StopAtSafePoint as stop:
        signum, done = stop.args
        signals.deferred = False  # a further signal while this checkpoint is written stops at once
        path = _checkpoint(run, done, judge)
        raise Interrupted(signum, f"{signal_name(signum)}: checkpoint of {done} completed epochs written to "
                                  f"{path}; continue with --resume.") from None
    finally:
        if tracking:  # accelerate's end_training would also destroy the process group, which finish() still uses
            for tracker in acc.trackers:
                tracker.finish()
    try:
        final = finish(run, metrics_log, eval_prompts, judge.log.read(), eval_sources)
    except StopNow as stop:
        raise Interrupted(stop.args[0], f"{signal_name(stop.args[0])} during the final export: {out_dir / 'final'} "
                                        f"may be incomplete; {describe_newest(out_dir)}, which redoes the "
                                        "export.") from None
    if signals.received:
        reporter.warn(f"{signal_name(signals.received)} arrived during the final export; the export completed.")
    if recipe.output.push_to_hub and acc.is_main_process:
        from treegrpo.hub.push import push_after_training

        reporter.info(f"pushed to {push_after_training(out_dir, recipe.output.push_to_hub)}")
    return final


def _epochs(run: Run, start: int, judge: PolicyJudge, metrics_log: MetricsLog, eval_prompts: list[str],
            eval_sources: list[str] | None) -> None:
    """The epochs from `start`: each one's metrics (with the evaluation's when one is due), sample grids,
    checkpoints; a stop signal is honoured at the safe point after each epoch, a collapse (if the recipe says stop)
    after its checkpoint."""
    recipe, acc = run.recipe, run.accelerator
    with run.reporter.epochs(recipe.train.epochs, start) as progress:
        for epoch in range(start, recipe.train.epochs):
            metrics = run_epoch(run, epoch)
            judge.train_rewards.append(metrics["reward/mean"])
            done = epoch + 1
            verdict = judge.evaluate(done) if judge.due(done) else None
            metrics.update(verdict.metrics if verdict else {})
            metrics_log.write(metrics)
            log_metrics(acc, metrics, epoch)
            progress.epoch_done(metrics)
            collapsed = verdict is not None and _report_evaluation(run, verdict, done)
            if done % recipe.output.eval_every == 0 and done < recipe.train.epochs:
                with ema_applied(run):  # samples show the weights that would be exported
                    grid = save_samples(run, run.out_dir / "samples" / f"epoch-{done:06d}.png", eval_prompts,
                                        recipe.train.seed, eval_sources)
                log_grid(acc, grid, done)
            if done % recipe.output.checkpoint_every == 0 or done == recipe.train.epochs or collapsed:
                _checkpoint(run, done, judge)
            if collapsed:
                return
            _check_interrupt(run, epoch, stepped=True)


def _evaluation_prompts(run: Run) -> tuple[list[str], list[dict] | None]:
    """`data.eval_prompts` (with a .jsonl file's metadata), else the first 10 training prompts."""
    data = run.recipe.data
    if data.eval_prompts:
        prompts, metadata = read_prompt_records(data.eval_prompts, "data.eval_prompts")
        return prompts, metadata
    return run.prompts[:10], run.prompt_metadata[:10] if run.prompt_metadata else None


def _report_evaluation(run: Run, verdict: Verdict, done: int) -> bool:
    """One line per evaluation; the collapse warning. True when the recipe says to stop on it."""
    settings, judge_name = run.recipe.evaluation, best_by_name(run.recipe)
    shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in verdict.metrics.items()
                      if "/tag/" not in k)  # the per-category means are in eval.jsonl; their mean is shown
    run.reporter.info(f"evaluation after {done} epochs: {shown}{' (best so far: best/)' if verdict.best else ''}")
    if settings.collapse == "off" or not verdict.collapsing:
        return False
    message = (f"possible collapse after {done} epochs: over the last {settings.collapse_patience} evaluations the "
               f"training reward rose while eval/{judge_name} or eval/diversity fell by more than "
               f"{settings.collapse_tolerance:.0%}; the rollout reward is being gamed or the images lose variety. "
               "best/ holds the best evaluated weights.")
    run.reporter.warn(message + (" Stopping (evaluation.collapse = 'stop')." if settings.collapse == "stop" else ""))
    return settings.collapse == "stop"


def _resume(run: Run) -> TrainerState:
    """Load the newest intact checkpoint written by this recipe; returns its trainer state."""
    current = recipe_fingerprint(run.recipe)

    def same_recipe(state: TrainerState) -> None:
        changes = fingerprint_changes(state.recipe, current) if state.recipe else []
        if changes:
            shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
            raise SetupError(f"--resume: the checkpoints in {run.out_dir} were written by a different recipe "
                             f"({shown}). Resume with the recipe that started the run (a copy is "
                             f"{run.out_dir / 'recipe.resolved.toml'}), or start fresh with --overwrite or another "
                             "output.dir.")

    try:
        found, state = load_newest_intact(run.accelerator, run.out_dir, run.recipe.train.epochs, ema=run.ema,
                                          warn=run.reporter.warn, check=same_recipe)
    except CheckpointError as err:
        raise SetupError(str(err)) from None
    run.reporter.info(f"resumed from {found} (epoch {state.epoch})")
    return state


def _checkpoint(run: Run, completed_epochs: int, judge: PolicyJudge) -> Path:
    recipe = run.recipe
    if not all_finite(run.params, run.accelerator):  # never publish a checkpoint that cannot be resumed
        raise TrainingError(f"non-finite trainable weights after {completed_epochs} epochs (try a lower "
                            "train.learning_rate or fp32); no checkpoint written for them")
    full = None
    if recipe.model.lora and (run.ema is not None or is_sharded(run)):
        # the checkpoint's LoRA file holds what would be exported (EMA when on): captured while the EMA weights are
        # in place, since the file is written later, after they are swapped back. Without EMA (and unsharded)
        # save_lora reads the live weights.
        with ema_applied(run):
            full = full_state(run) if is_sharded(run) else \
                {k: v.detach().clone() for k, v in run.denoiser.state_dict().items() if "lora_" in k}
    lora = (lambda folder: save_lora(run.pipe, run.denoiser, run.denoiser_name, folder, full)) \
        if recipe.model.lora else None
    state = TrainerState(epoch=completed_epochs, prompt_position=completed_epochs * recipe.data.prompts_per_epoch,
                         seed=recipe.train.seed, recipe=recipe_fingerprint(recipe), **judge.state_fields())
    return save_checkpoint(run.accelerator, run.out_dir, state, save_lora=lora, ema=run.ema,
                           keep=recipe.output.keep_checkpoints)


def finish(run: Run, metrics_log: MetricsLog, eval_prompts: list[str], evaluations: list[dict] = (),
           eval_sources: list[str] | None = None) -> Path:
    """Final LoRA (diffusers format) or full weights, the after-training grid and the reward curve."""
    final = run.out_dir / "final"
    acc = run.accelerator
    acc.wait_for_everyone()
    if run.ema is not None:
        run.ema.copy_to_params()  # export (and sample) the averaged weights
    if not all_finite(run.params, acc):
        raise TrainingError("non-finite trainable weights at the end of training; nothing exported")
    full = full_state(run)
    if acc.is_main_process:
        write_policy(run, final, full)
    save_samples(run, run.out_dir / "samples" / "final.png", eval_prompts, run.recipe.train.seed, eval_sources)
    if acc.is_main_process:
        history = metrics_log.read()
        reward_curve(history, run.out_dir / "reward_curve.png", evaluations)
        by_start = reward_by_window_start(history, since_epoch=len(history) // 2)
        if len(by_start) > 1:  # tree and mix runs: one line, so a jumpy rollout curve is read correctly
            run.reporter.info("rollout reward by window start, second half of training: " + ", ".join(
                f"s={start} {mean:.3g} ({count} epoch{'s' if count != 1 else ''})"
                for start, (mean, count) in by_start.items()))
    acc.wait_for_everyone()
    return final
