"""Two-stage training: ``fit(cfg)`` reads top to bottom; ``run_stage`` is the loop over epochs.

    set up (runtime, data, model, optimizer, resume) -> print the plan
    for each stage: run_stage: for each epoch: unfreeze -> train -> validate -> log, save
    score best_model.pth on the test split (if there is one)

Everything time-dependent (stage, unfreeze level, LR) is computed from the epoch and the step
inside the stage, so a resume only restores counters, weights, optimizer moments and RNG. Under
torchrun every process runs this same code; only the main one (rank 0) writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from typing import Optional

import torch

import schedulers
from evaluation import format_table, resolve_monitor
from evaluation.pool import MetricPool
from losses import build_loss
from models import build_model
from models.flops import forward_gflops_once
from training import state as ckpt
from training.config import Config
from training.control import RunInterrupted, StopRequest, TimeBudget, continue_command
from training.curves import draw_curves, lr_steps_from_plan
from training.folder import FolderLock, check_folder, move_aside, next_periodic_copy, write_periodic_copy
from training.guards import (DivergenceGuard, RollbackNeeded, after_divergence, check_finite_output,
                             count_plateau, plateau_reached, plateau_restart, rollback, snapshot)
from training.ema import ModelEma
from training.loop import Run, TrainingDiverged, train_one_epoch, validate  # noqa: F401 (re-exported)
from training.resume import resume_run
from training.runlog import (format_epoch_line, log_model_summary, setup_logging, start_logging, stop_buffering,
                             write_metrics_csv)
from training.runtime import Runtime, make_runtime
from training.setup import (build_optimizer, load_data, make_loader, make_lr_plan, prepare_cache,
                            seed_everything, train_samples_per_process)
from training.stages import Stage, current_unfreeze_level, log_unfreeze_plan, plan_stages
from training.state import RunState
from training.tb_logger import TensorBoardLogger

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
            with open(os.path.join(cfg.checkpoint_dir, "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=2)
            setup_logging(cfg.checkpoint_dir, early)
    finally:
        stop_buffering(early)
    c = run.counters
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
    if cfg.tensorboard and rt.is_main:
        run.tb = TensorBoardLogger(os.path.join(cfg.checkpoint_dir, "tensorboard"))
    budget = TimeBudget(cfg.time_limit_s)
    with run.stop, run.pool:  # the metric workers start in the first validation and end here
        outcome = "replan"
        while outcome == "replan":  # the plateau breaker restarts the schedule: plan again from there
            stages = plan_stages(cfg, restart_at=c.restart_at, peak_scale=c.peak_scale)
            plan = make_lr_plan(cfg, stages, n_train=train_samples_per_process(len(train_samples), rt.world_size))
            log.info("%s\n%s", schedulers.format_plan(plan), schedulers.ascii_plot(plan))
            run.lr_steps = lr_steps_from_plan(plan) if rt.is_main else None
            for stage, stage_plan in zip(stages, plan.stages):
                if stage.end_epoch <= start_epoch:
                    continue
                outcome = run_stage(run, stage, stage_plan, start_epoch, train_samples, val_samples, budget, argv)
                if outcome != "done":
                    break
            start_epoch = c.epoch + 1
        if outcome == "stopped":
            return summary(run, finished=False)
        log.info("Done. Best %s -> %s", best_text(run),
                 os.path.join(cfg.checkpoint_dir, "best_model.pth"))
        out = summary(run, finished=True)
        out["test"] = evaluate_test_sets(run, index)
    return out


def start_run(cfg: Config, rt: Runtime):
    """Data, model, optimizer and the resumed state: ``(run, index, train, val)``."""
    seed_everything(cfg.seed)
    log.info("Device: %s | seed %d", rt.describe(), cfg.seed)
    if not rt.is_main:
        rt.barrier()  # the main process finds (or generates) the data first
    index, train_samples, val_samples = load_data(cfg)
    if rt.is_main:
        rt.barrier()
    prepare_cache(cfg, rt, train_samples, val_samples)
    run = build_run(cfg, rt)
    if rt.rank:
        torch.manual_seed(cfg.seed + rt.rank)  # same initial weights everywhere, own dropout masks
    log.info("Batch: %d per process x %d process%s x %d accumulation steps = %d images per optimizer "
             "step (stage 2: %d)", cfg.batch_size, rt.world_size, "es" if rt.world_size > 1 else "",
             cfg.accumulation_steps, cfg.batch_size * rt.world_size * cfg.accumulation_steps,
             cfg.stage2_batch_size_value * rt.world_size * cfg.accumulation_steps)
    if cfg.resume_from:
        resume_run(run)
    return run, index, train_samples, val_samples


def build_run(cfg: Config, rt: Runtime) -> Run:
    model = build_model(backbone=cfg.backbone, num_experts=cfg.num_experts, moe_top_k=cfg.moe_top_k,
                        deep_supervision=cfg.deep_supervision, pretrained=cfg.pretrained,
                        pretrained_path=cfg.pretrained_path, drop_path=cfg.drop_path,
                        dropout=cfg.dropout, decoder_channels=cfg.decoder_channels,
                        img_size=cfg.img_size).to(rt.device)
    loss_fn = build_loss(bce_weight=cfg.bce_weight, iou_weight=cfg.iou_weight, dice_weight=cfg.dice_weight,
                         moe_aux_weight=cfg.moe_aux_weight, ds_weights=cfg.ds_weights,
                         label_smoothing=cfg.label_smoothing)
    if rt.is_main:
        spec = (cfg.backbone, cfg.num_experts, cfg.moe_top_k, cfg.deep_supervision, cfg.decoder_channels)
        log_model_summary(cfg, model, rt.device, forward_gflops_once(model, cfg.img_size, spec, rt.device))
    state = RunState(model, build_optimizer(cfg, model), rt.scaler,
                     ModelEma(model, cfg.ema_decay) if cfg.ema else None, cfg.to_dict(), cfg.monitor,
                     guard=DivergenceGuard(cfg.spike_factor) if cfg.divergence_guard else None)
    return Run(cfg, rt, state, loss_fn, StopRequest(), pool=MetricPool(cfg.metric_workers_value))


def run_stage(run: Run, stage: Stage, stage_plan, first_epoch: int, train_samples, val_samples,
              budget: TimeBudget, argv: Optional[list]) -> str:
    """The epochs of one stage from ``first_epoch`` on: 'done', 'early stop' or 'stopped' (a time
    or epoch limit; a signal raises ``RunInterrupted`` once ``last.pth`` is saved)."""
    cfg, rt, c = run.cfg, run.rt, run.counters
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
            return "stopped"
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
            return "replan"
        if cfg.early_stop_patience and c.bad_epochs >= cfg.early_stop_patience:
            log.info("Early stop: %d epochs without a better %s", c.bad_epochs, cfg.monitor)
            return "early stop"
    return "done"


def validate_epoch(run: Run, val_loader) -> Optional[dict]:
    """Validation metrics ({} without a validation split; None when a stop request cut it short),
    from the EMA weights when there are some."""
    if val_loader is None:
        return {}
    return validate(run.cfg, run.rt, run.eval_model(), run.loss_fn, val_loader, stop=run.stop,
                    scorer=run.pool.scorer(run.cfg.threshold))


def end_of_epoch(run: Run, stage: Stage, epoch: int, level: int, train_stats: dict, val_stats: dict,
                 seconds: float) -> bool:
    """Log one line, update the best record and the patience counts, save best_model.pth (this
    epoch's weights), let the plateau breaker restart the schedule, then save last.pth (what the next
    epoch starts from, so a stop now resumes the restart), the periodic copy and metrics.csv.
    True when the plateau breaker restarted the schedule."""
    cfg, c, rt = run.cfg, run.counters, run.rt
    monitor_key, higher_is_better = resolve_monitor(cfg.monitor)
    if not val_stats:  # no validation split: the training loss is what is monitored
        monitor_key, higher_is_better = "train_loss", False
    c.epoch = epoch
    row = {"epoch": epoch + 1, "stage": stage.index + 1, "unfreeze_level": level, **train_stats,
           **{f"val_{k}": v for k, v in val_stats.items()}}
    c.history.append(row)
    value = val_stats.get(monitor_key, train_stats["train_loss"])
    improved = is_improvement(value, c.best_value, higher_is_better)
    gain = (-math.inf if not math.isfinite(value) else math.inf if c.best_value is None
            else (value - c.best_value) * (1 if higher_is_better else -1))
    count_plateau(cfg, c, stage.index, gain)
    events = [e["kind"] for e in c.events if e["epoch"] == epoch + 1]
    if events:
        row["events"] = "+".join(events)
    if improved:
        c.best_value, c.best_epoch, c.bad_epochs = value, epoch, 0
    else:
        c.bad_epochs += 1
    log.info("%s | %.0fs%s", format_epoch_line(row, cfg), seconds, "  * best" if improved else "")
    copy = next_periodic_copy(run, epoch) if rt.is_main else None  # listed in this epoch's checkpoints
    full = checkpoint_state(run, stage, level)
    best_path = os.path.join(cfg.checkpoint_dir, "best_model.pth")
    if rt.is_main and improved:
        ckpt.save(full, best_path)
    restarted = plateau_reached(cfg, c, epoch)
    if restarted:
        rt.barrier()  # every process reads best_model.pth, which the main one wrote
        plateau_restart(run, epoch, ckpt.load(best_path) if os.path.isfile(best_path) else None)
        full = checkpoint_state(run, stage, level)
    if rt.is_main:
        ckpt.save(full, os.path.join(cfg.checkpoint_dir, "last.pth"))
        write_periodic_copy(run, full, copy)
        write_metrics_csv(c.history, os.path.join(cfg.checkpoint_dir, "metrics.csv"))
        if cfg.curves:  # lr_steps, then the events (one before epoch e drawn at e - 1)
            draw_curves(cfg.checkpoint_dir, c.history, run.lr_steps, [{**e, "epoch": e["epoch"] - 1} for e in c.events])
        if run.tb is not None:
            run.tb.log_epoch(row)
    return restarted


def checkpoint_state(run: Run, stage: Stage, level: int) -> Optional[dict]:
    """The run's state as a checkpoint dict on the main process (None on the others). Every process
    takes part: the RNG states of all of them go into it. Non-finite weights are never saved."""
    rng_ranks = run.rt.gather(ckpt.rng_state()) if run.rt.world_size > 1 else None
    if not bool(torch.stack([torch.isfinite(p).all() for p in run.net.parameters()]).all()):
        raise TrainingDiverged("the weights became NaN or inf")  # never saved
    return run.state.state_dict(stage.index + 1, level, rng_ranks) if run.rt.is_main else None


def is_improvement(value: float, best: Optional[float], higher_is_better: bool) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if higher_is_better else value < best


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
    c = run.counters
    name = run.cfg.monitor if any(k.startswith("val_") for r in c.history for k in r) else "train loss"
    return f"{name} " + ("none" if c.best_value is None else f"{c.best_value:.4f} at epoch {c.best_epoch + 1}")


def summary(run: Run, finished: bool) -> dict:
    c = run.counters
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
        loader = make_loader(cfg, rt, samples, cfg.stage2_batch_size_value, train=False, use_cache=False)
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
        with open(os.path.join(cfg.checkpoint_dir, "test_metrics.json"), "w") as f:
            json.dump({"checkpoint": best_path, "epoch": best["epoch"] + 1, "results": results}, f, indent=2)
    return results
