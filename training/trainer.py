"""Two-stage training: ``fit(cfg)`` reads top to bottom; ``run_stage`` is the loop over epochs.

    set up (runtime, data, model, optimizer, resume) -> print the plan
    for each stage: run_stage: for each epoch: unfreeze -> train -> validate -> log, save
    score best_model.pth on the test split (if there is one)

Everything time-dependent (stage, unfreeze level, LR) is computed from the epoch and the step
inside the stage, so a resume only restores counters, weights, optimizer moments and RNG. Under
torchrun every process runs this same code; only the main one (rank 0) writes files.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import nullcontext
from enum import Enum
from typing import Optional

import torch

import schedulers
from core import checkpoint as ckpt
from core.io import write_json
from core.runtime import Runtime, make_runtime
from evaluation import format_table, resolve_monitor
from training.build import make_loader, make_lr_plan, stage_plans, start_run, train_samples_per_process
from training.config import Config
from training.control import RunInterrupted, TimeBudget, continue_command
from training.folder import FolderLock, check_folder, move_aside
from training.guards import RollbackNeeded, after_divergence, check_finite_output, rollback, snapshot
from training.loop import Run, TrainingDiverged, train_one_epoch, validate  # noqa: F401 (re-exported)
from training.plateau import count_plateau, plateau_step
from training.progress import rng_state
from training.report.reporters import EpochEnd, make_reporters, report_epoch
from training.report.curves import lr_steps_from_plan
from training.report.log import setup_logging, start_logging, stop_buffering
from training.stages import Stage, current_unfreeze_level, log_unfreeze_plan, plan_stages

log = logging.getLogger("cod")


def fit(cfg: Config, argv: Optional[list] = None) -> dict:
    """Train; ``argv`` (the command line) is only used to print the exact command that goes on."""
    rt = make_runtime(cfg.device, cfg.amp)
    try:
        check_folder(cfg)  # before anything is written: a trained model is never replaced
        if rt.is_main:
            os.makedirs(cfg.checkpoint_dir, exist_ok=True)
        rt.barrier()
        with FolderLock(cfg.checkpoint_dir) if rt.is_main else nullcontext():
            try:
                result = _fit(cfg, rt, argv)
                rt.barrier()  # no process tears the process group down while another still uses it
                return result
            except TrainingDiverged as e:
                raise TrainingDiverged(f"{e}: stopped; {after_divergence(cfg)}") from None
    finally:
        rt.close()


def _fit(cfg: Config, rt: Runtime, argv: Optional[list]) -> dict:
    early = start_logging(rt.is_main)  # train.log gets these lines only if the start succeeds
    try:
        run, index, train_samples, val_samples = start_run(cfg, rt)
        if rt.is_main:  # only once the data, the model and the resume are known to work
            if cfg.overwrite:
                move_aside(cfg.checkpoint_dir)
            write_json(os.path.join(cfg.checkpoint_dir, "config.json"), cfg.to_dict())
            setup_logging(cfg.checkpoint_dir, early)
    finally:
        stop_buffering(early)
    c = run.progress
    start_epoch = c.partial["epoch"] if c.partial else c.epoch + 1
    if cfg.skip_stage1 and start_epoch < cfg.stage1_epochs:
        log.info("--skip-stage1: stage 2 starts at epoch %d from %s", cfg.stage1_epochs + 1,
                 "the resumed weights" if cfg.resume_from else
                 "the initial (%s) weights" % ("pretrained" if cfg.pretrained else "random"))
        start_epoch, c.partial, c.restart_at = cfg.stage1_epochs, None, None
    if start_epoch >= cfg.epochs:
        log.info("Nothing to train: epoch %d already reached --epochs %d (raise --epochs to go on)",
                 start_epoch, cfg.epochs)
        return summary(run, finished=True)

    log_unfreeze_plan(run, start_epoch)
    run.reporters = make_reporters(cfg, rt.is_main)
    budget = TimeBudget(cfg.time_limit_s)
    try:
        with run.stop, run.pool:  # the metric workers start in the first validation and end here
            outcome = Outcome.REPLAN
            while outcome is Outcome.REPLAN:  # the plateau breaker restarted the schedule: plan from there
                stages = plan_stages(cfg, restart_at=c.restart_at, peak_scale=c.peak_scale)
                plan = make_lr_plan(cfg, stages, n_train=train_samples_per_process(len(train_samples), rt.world_size))
                log.info("%s\n%s", schedulers.format_plan(plan), schedulers.ascii_plot(plan))
                run.lr_steps = lr_steps_from_plan(plan) if rt.is_main else None
                for stage, stage_plan in stage_plans(stages, plan):
                    if stage.end_epoch <= start_epoch:
                        continue
                    outcome = run_stage(run, stage, stage_plan, start_epoch, train_samples, val_samples, budget, argv)
                    if outcome is not Outcome.DONE:
                        break
                start_epoch = c.epoch + 1
            if outcome is Outcome.STOPPED:
                return summary(run, finished=False)
            log.info("Done. Best %s -> %s", best_text(run), os.path.join(cfg.checkpoint_dir, "best_model.pth"))
            out = summary(run, finished=True)
            out["test"] = evaluate_test_sets(run, index)
        return out
    finally:
        for reporter in run.reporters:
            reporter.close()


class Outcome(Enum):
    """How ``run_stage`` ended (a signal raises ``RunInterrupted`` instead, once last.pth is saved)."""
    DONE = "done"              # the stage's last epoch
    REPLAN = "replan"          # the plateau breaker restarted the schedule: plan again
    EARLY_STOP = "early stop"  # --early-stop-patience
    STOPPED = "stopped"        # --run-epochs or --time-limit


def run_stage(run: Run, stage: Stage, stage_plan, first_epoch: int, train_samples, val_samples,
              budget: TimeBudget, argv: Optional[list]) -> Outcome:
    """The epochs of one stage from ``first_epoch`` on."""
    cfg, rt, c = run.cfg, run.rt, run.progress
    last_path = os.path.join(cfg.checkpoint_dir, "last.pth")
    train_loader = make_loader(cfg, rt, train_samples, stage.batch_size, train=True, seed_offset=stage.index)
    val_loader = make_loader(cfg, rt, val_samples, stage.batch_size, train=False) if val_samples else None
    restarts = set(stage_plan.restart_epochs())
    good = snapshot(run.state.state_dict(stage.index + 1, 0))  # the rollback point
    for epoch in range(max(stage.start_epoch, first_epoch), stage.end_epoch):
        if epoch in (stage.start_epoch, stage.schedule_start) or epoch in restarts:
            c.bad_epochs = 0  # patience restarts with the stage and each LR restart
        reason = rt.broadcast(stop_reason(cfg, budget))
        if reason:
            log.info("%s: stopping before epoch %d. Go on with:\n  %s", reason, epoch + 1,
                     continue_command(argv, last_path))
            return Outcome.STOPPED
        level = current_unfreeze_level(run, epoch)
        t0 = time.time()
        while True:  # an epoch, again after each rollback of the divergence guard
            run.net.set_backbone_trainable(level)
            run.model = rt.wrap(run.net)  # under DDP: re-wrapped when the trainable parameters changed
            train_loader.set_epoch(epoch)
            partial, c.partial = c.partial, None
            try:
                train_stats, progress = train_one_epoch(run, train_loader, stage_plan, stage, epoch, partial)
                val_stats = validate_epoch(run, val_loader) if train_stats and not run.stop.agree(rt) else None
                if val_stats == {}:
                    check_finite_output(run, epoch)  # no validation would have noticed
                if run.guard is not None and val_stats is not None:
                    run.guard.check_epoch(train_stats, val_stats, c.history)  # a blow-up rolls back
                break
            except (RollbackNeeded, TrainingDiverged) as e:
                if run.guard is None:
                    raise
                rollback(run, good, str(e), epoch, stage_plan.steps_per_epoch)
                run.guard.reset()
        if val_stats is None:  # a stop request: in the epoch, at its end, or in validation
            c.partial = progress
            full = checkpoint_state(run, stage, level)  # every process takes part; the main one writes
            if full is not None:
                ckpt.save(full, last_path)
            raise interrupted(run, f"in epoch {epoch + 1} after {progress['batches']} batches"
                              if not train_stats else f"at the end of epoch {epoch + 1}, before its validation",
                              last_path, argv)
        restarted = end_of_epoch(run, stage, epoch, level, train_stats, val_stats, time.time() - t0)
        budget.record(time.time() - t0)
        if run.guard is not None:
            good = snapshot(run.state.state_dict(stage.index + 1, level))
        if run.stop.agree(rt):
            raise interrupted(run, f"after epoch {epoch + 1}", last_path, argv)
        if restarted:
            return Outcome.REPLAN
        if cfg.early_stop_patience and c.bad_epochs >= cfg.early_stop_patience:
            log.info("Early stop: %d epochs without a better %s", c.bad_epochs, cfg.monitor)
            return Outcome.EARLY_STOP
    return Outcome.DONE


def validate_epoch(run: Run, val_loader) -> Optional[dict]:
    """Validation metrics ({} without a validation split; None when a stop request cut it short),
    from the EMA weights when there are some."""
    if val_loader is None:
        return {}
    return validate(run.cfg, run.rt, run.eval_model(), run.loss_fn, val_loader, stop=run.stop,
                    scorer=run.pool.scorer(run.cfg.threshold))


def end_of_epoch(run: Run, stage: Stage, epoch: int, level: int, train_stats: dict, val_stats: dict,
                 seconds: float) -> bool:
    """Record the epoch (history, best, patience), let the plateau breaker restart the schedule, and
    report it (training/report: the epoch line, checkpoints, metrics.csv, curves, TensorBoard), in
    that order: last.pth holds what the next epoch starts from, a restart included. True when the
    plateau breaker restarted the schedule."""
    cfg, c = run.cfg, run.progress
    monitor_key, higher_is_better = resolve_monitor(cfg.monitor)
    if not val_stats:  # no validation split: the training loss is what is monitored
        monitor_key, higher_is_better = "train_loss", False
    row = {"epoch": epoch + 1, "stage": stage.index + 1, "unfreeze_level": level, **train_stats,
           **{f"val_{k}": v for k, v in val_stats.items()}}
    improved, gain = c.record_epoch(row, val_stats.get(monitor_key, train_stats["train_loss"]), higher_is_better)
    count_plateau(cfg, c, stage.index, gain)
    restart = plateau_step(run, epoch)
    report_epoch(run, EpochEnd(epoch, row, improved, checkpoint_state(run, stage, level), seconds))
    if restart:
        log.info("%s", restart)
    return bool(restart)


def checkpoint_state(run: Run, stage: Stage, level: int) -> Optional[dict]:
    """The run's state as a checkpoint dict on the main process (None on the others). Every process
    takes part: the RNG states of all of them go into it. Non-finite weights are never saved."""
    rng_ranks = run.rt.gather(rng_state()) if run.rt.world_size > 1 else None
    if not bool(torch.stack([torch.isfinite(p).all() for p in run.net.parameters()]).all()):
        raise TrainingDiverged("the weights became NaN or inf")  # never saved
    return run.state.state_dict(stage.index + 1, level, rng_ranks) if run.rt.is_main else None


def interrupted(run: Run, where: str, last_path: str, argv: Optional[list]) -> RunInterrupted:
    name = signal.Signals(run.stop.signum).name
    return RunInterrupted(f"stopped by {name} {where}; saved {last_path}. Go on with: "
                          f"{continue_command(argv, last_path)}", 128 + run.stop.signum)


def stop_reason(cfg: Config, budget: TimeBudget) -> Optional[str]:
    if cfg.run_epochs is not None and budget.epochs >= cfg.run_epochs:
        return f"--run-epochs {cfg.run_epochs} reached"
    if not budget.allows_another():
        return (f"--time-limit {cfg.time_limit}: another epoch (up to {1.1 * budget.longest:.0f} s) "
                "would not fit")
    return None


def best_text(run: Run) -> str:
    """'iou 0.4612 at epoch 8', naming what was monitored ('train loss' without a validation split)."""
    c = run.progress
    name = run.cfg.monitor if any(k.startswith("val_") for r in c.history for k in r) else "train loss"
    return f"{name} " + ("none" if c.best_value is None else f"{c.best_value:.4f} at epoch {c.best_epoch + 1}")


def summary(run: Run, finished: bool) -> dict:
    c = run.progress
    return {"best_value": c.best_value, "best_epoch": c.best_epoch, "history": c.history, "finished": finished}


def evaluate_test_sets(run: Run, index) -> dict:
    """Score best_model.pth on every test set, kept apart from validation in test_metrics.json.
    In fp32 whatever the training precision, as ``evaluate`` scores it, so the two reports agree.
    A stop request ends the scoring (training is finished; ``evaluate`` can score it later)."""
    cfg, rt = run.cfg, run.rt
    best_path = os.path.join(cfg.checkpoint_dir, "best_model.pth")
    rt.barrier()  # the main process wrote it
    if not index.tests or cfg.val_on_test or not os.path.isfile(best_path):
        return {}
    best = ckpt.load(best_path)
    ckpt.load_model_weights(run.net, best["ema"]["module"] if best.get("ema") else best["model"], best_path)
    results = {}
    for name, samples in index.tests.items():
        loader = make_loader(cfg, rt, samples, cfg.effective_stage2_batch_size, train=False, use_cache=False)
        results[name] = validate(cfg, rt, run.net, run.loss_fn, loader, stop=run.stop, desc=f"test {name}",
                                 fp32=True, scorer=run.pool.scorer(cfg.threshold))
        if results[name] is None:
            raise RunInterrupted(
                f"stopped by {signal.Signals(run.stop.signum).name} while scoring the test split; training "
                f"is finished ({best_path}). Score it with: python train_ultimate.py evaluate --checkpoint "
                f"{best_path}{' --use-ema' if cfg.ema else ''} --dataset-path {cfg.dataset_path}",
                128 + run.stop.signum)
    log.info("Test split (best_model.pth, epoch %d):\n%s", best["epoch"] + 1, format_table(results))
    if rt.is_main:
        write_json(os.path.join(cfg.checkpoint_dir, "test_metrics.json"),
                   {"checkpoint": best_path, "epoch": best["epoch"] + 1, "results": results})
    return results
