"""Two-stage training: ``fit(cfg)`` reads top to bottom; the loop calls small named functions.

    setup (data, model, loss, optimizer, resume) -> print the plan
    for each stage: for each epoch: set unfreeze level -> train_one_epoch -> validate -> log, save
    evaluate best_model.pth on the test split (if there is one)

Everything time-dependent (stage, unfreeze level, LR) is computed from the epoch and the step
inside the stage, so a resume only restores counters, weights, optimizer moments and RNG.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

import data as cod_data
import schedulers
from errors import UserError
from evaluation import SegMetrics, resolve_monitor
from losses import build_loss
from models import build_model
from models.flops import forward_gflops
from training import checkpoint as ckpt
from training.config import Config
from training.control import RunInterrupted, StopRequest, TimeBudget, continue_command
from training.ema import ModelEma
from training.resume import archive_abandoned_history, decide_schedule
from training.stages import (Stage, batches_per_epoch, plan_stages, stage_of_epoch, steps_per_epoch,
                             unfreeze_level)

log = logging.getLogger("cod")

class TrainingDiverged(UserError):
    pass


@dataclass
class RunState:
    """The counters a checkpoint restores; everything else is derived from them."""
    epoch: int = -1                 # last completed epoch (0-based); -1 = none yet
    global_step: int = 0            # optimizer updates so far, all stages
    best_value: Optional[float] = None
    best_epoch: Optional[int] = None
    history: list = field(default_factory=list)
    bad_epochs: int = 0             # epochs without improvement (early stopping)
    restart_at: Optional[int] = None  # epoch where a plateau-breaking resume restarted the schedule
    partial: Optional[dict] = None    # an epoch cut short by a signal: how far it got


# ---------------------------------------------------------------------------------------------
# set-up
# ---------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but none is available: use --device cpu")
    return dev


def amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """None means full fp32. AMP runs only on CUDA; 'auto' prefers bf16 where the GPU has it."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(cfg: Config):
    """Index the dataset and split it. Validation never uses the test set unless asked."""
    index = cod_data.find_dataset(cfg.dataset_path, include_noncam=cfg.include_noncam, seed=cfg.seed)
    if cfg.val_on_test:
        if not index.tests:
            raise UserError(f"--val-on-test: no test set found under {cfg.dataset_path}")
        train = index.train
        val = [s for samples in index.tests.values() for s in samples]
        val_source = "the TEST split (--val-on-test)"
    else:
        train, val = cod_data.split_train_val(index.train, cfg.val_split, cfg.seed)
        val_source = f"a held-out {cfg.val_split:.0%} of the training images (seed {cfg.seed})"
    if not train:
        raise UserError(f"no training images left in {cfg.dataset_path} (lower --val-split)")
    log.info("Data: %s layout at %s | train %d | val %d from %s | test sets: %s",
             index.layout, index.root, len(train), len(val), val_source,
             ", ".join(f"{k} ({len(v)})" for k, v in index.tests.items()) or "none")
    return index, train, val


def make_loader(cfg: Config, samples, batch_size: int, train: bool, seed_offset: int = 0):
    aug = cod_data.aug_preset(cfg.aug) if train else None
    ds = cod_data.SegDataset(samples, cfg.img_size, train=train, aug=aug)
    workers = min(cfg.num_workers, os.cpu_count() or 1)  # more workers than cores only adds overhead
    return cod_data.build_loader(ds, batch_size=batch_size, shuffle=train, num_workers=workers,
                                 seed=cfg.seed + seed_offset, drop_last=train and len(samples) >= batch_size)


def build_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    """Built once with every parameter; frozen ones simply have no gradient yet."""
    groups = model.param_groups(cfg.weight_decay, cfg.backbone_lr_mult)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))


def make_lr_plan(cfg: Config, stages: list[Stage], n_train: Optional[int] = None,
                 steps_per_epoch_override: Optional[int] = None) -> schedulers.LRPlan:
    """The LR plan of ``stages``. Steps per epoch come from the training-set size and each stage's
    batch size (``n_train``), or are given directly (``steps_per_epoch_override``, the preview)."""
    specs = []
    for s in stages:
        spe = steps_per_epoch_override or steps_per_epoch(
            batches_per_epoch(n_train, s.batch_size, cfg.limit_batches), cfg.accumulation_steps)
        specs.append(dict(name=s.name, start_epoch=s.schedule_start, end_epoch=s.end_epoch,
                          steps_per_epoch=spe, base_lr=s.base_lr,
                          warmup_steps=s.warmup_epochs * spe))
    try:
        return schedulers.build_plan(cfg.scheduler, specs, min_lr=cfg.min_lr,
                                     restart_epochs=cfg.restart_epochs, t_mult=cfg.t_mult,
                                     onecycle_pct_start=cfg.onecycle_pct_start,
                                     onecycle_div_factor=cfg.onecycle_div_factor)
    except ValueError as e:
        raise UserError(f"schedule: {e}") from None


# ---------------------------------------------------------------------------------------------
# one epoch
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What one training run holds; the loop's functions take this instead of a dozen arguments."""
    cfg: Config
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    ema: Optional[ModelEma]
    device: torch.device
    dtype: Optional[torch.dtype]
    state: RunState
    stop: StopRequest

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()


def train_one_epoch(run: Run, loader, stage_plan, stage: Stage, epoch: int,
                    partial: Optional[dict] = None) -> tuple[Optional[dict], dict]:
    """Train one epoch. Returns ``(stats, progress)``: ``progress`` says how far the epoch got (the
    ``partial`` a checkpoint saves, so that a resume finishes the epoch), ``stats`` is None when a
    stop request cut the epoch short.

    A resumed ``partial`` epoch replays the data order from the start, loading but not training the
    batches that were done, so the rest of the epoch sees exactly the batches it would have. The
    accumulators come back onto the run's device, whichever device wrote the checkpoint."""
    cfg, model, optimizer = run.cfg, run.model, run.optimizer
    model.train()
    n_batches = min(len(loader), cfg.limit_batches or len(loader))
    spe = steps_per_epoch(n_batches, cfg.accumulation_steps)
    assert spe == stage_plan.steps_per_epoch, (spe, stage_plan.steps_per_epoch)  # one clock for both
    k0 = (epoch - stage.schedule_start) * spe
    done = partial["batches"] if partial else 0
    sums = {k: torch.tensor(v, device=run.device) for k, v in partial["sums"].items()} if partial else {}
    usage = (torch.tensor(partial["usage"], device=run.device)
             if partial and partial.get("usage") is not None else None)
    head_lr = stage_plan.lr_at(k0 + max(done - 1, 0) // cfg.accumulation_steps)

    def progress(batches: int) -> dict:
        return {"epoch": epoch, "batches": batches, "sums": {k: float(v) for k, v in sums.items()},
                "usage": None if usage is None else usage.tolist()}
    bar = tqdm(total=n_batches, initial=done, desc=f"Epoch {epoch + 1}/{cfg.epochs} {stage.name}",
               leave=False, disable=not cfg.progress, dynamic_ncols=True, mininterval=1.0)
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(loader if done < n_batches else ()):
        if i >= n_batches:
            break
        if i < done:
            continue
        group = i // cfg.accumulation_steps
        group_size = min(cfg.accumulation_steps, n_batches - group * cfg.accumulation_steps)
        if i % cfg.accumulation_steps == 0:
            head_lr = stage_plan.lr_at(k0 + group)
            schedulers.apply_lr(optimizer, head_lr)
        image = batch["image"].to(run.device, non_blocking=True)
        mask = batch["mask"].to(run.device, non_blocking=True)
        with run.autocast():
            outputs = model(image)
            loss, terms = run.loss_fn(outputs, mask)
        (run.scaler.scale(loss / group_size) if run.scaler else loss / group_size).backward()
        for name, value in {"loss": loss.detach(), **terms}.items():
            sums[name] = sums.get(name, 0.0) + value.float()
        u = outputs.get("expert_usage")
        if u is not None and u.numel() > 0:
            usage = u.float() if usage is None else usage + u.float()
        bar.update(1)
        if cfg.progress and (i % 20 == 0 or i + 1 == n_batches):  # the only host syncs in the loop
            bar.set_postfix(loss=f"{sums['loss'].item() / (i + 1):.4f}", lr=f"{head_lr:.2e}")
        if (i + 1) % cfg.accumulation_steps == 0 or i + 1 == n_batches:
            optimizer_step(cfg, model, optimizer, run.scaler)
            if run.ema is not None:
                run.ema.update(model)
            run.state.global_step += 1
            if run.stop.requested and i + 1 < n_batches:
                bar.close()
                return None, progress(i + 1)
    bar.close()
    out = {"lr": head_lr, **{f"train_{k}": (v / n_batches).item() for k, v in sums.items()}}
    if usage is not None:
        for e, frac in enumerate((usage / n_batches).tolist()):
            out[f"expert{e}_usage"] = frac
    if not math.isfinite(out["train_loss"]):
        raise TrainingDiverged(
            f"training loss became {out['train_loss']} in epoch {epoch + 1}; last.pth keeps the last "
            "good epoch: resume from it with a lower --lr/--stage2-lr or more --warmup-epochs")
    return out, progress(n_batches)


def optimizer_step(cfg: Config, model, optimizer, scaler) -> None:
    if scaler is not None:
        scaler.unscale_(optimizer)
    if cfg.grad_clip > 0:
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate_model(cfg: Config, model, loss_fn, loader, device, dtype, desc: str = "val",
                   stop: Optional[StopRequest] = None) -> Optional[dict]:
    """Loss at the training size; metrics per image at the ground truth's own resolution.
    None when ``stop`` was requested before the last batch (a signal: save and exit quickly)."""
    model.eval()
    metrics = SegMetrics(threshold=cfg.threshold)
    n_batches = min(len(loader), cfg.limit_batches or len(loader))
    loss_sum, seen = 0.0, 0
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    for i, batch in enumerate(tqdm(loader, total=n_batches, desc=desc, leave=False,
                                   disable=not cfg.progress, dynamic_ncols=True, mininterval=1.0)):
        if i >= n_batches:
            break
        if stop is not None and stop.requested:
            return None
        image = batch["image"].to(device)
        mask = batch["mask"].to(device)
        with autocast:
            outputs = model(image)
            loss, _ = loss_fn(outputs, mask)
        loss_sum += loss.float().item() * image.shape[0]
        seen += image.shape[0]
        probs = torch.sigmoid(outputs["main"].float()).cpu().numpy()[:, 0]
        for prob, mask_path in zip(probs, batch["mask_path"]):
            metrics.step(prob, cod_data.load_mask(mask_path))
    return {"loss": loss_sum / max(seen, 1), **metrics.results()}


# ---------------------------------------------------------------------------------------------
# logging and saving
# ---------------------------------------------------------------------------------------------

def format_epoch_line(row: dict, cfg: Config) -> str:
    return (f"Epoch {row['epoch']}/{cfg.epochs} [{row['stage']}]: Loss: {row['train_loss']:.4f} | "
            f"IoU: {row['val_iou']:.4f} | Dice: {row['val_dice']:.4f} | Sm: {row['val_sm']:.4f} | "
            f"Val loss: {row['val_loss']:.4f} | LR: {format_lr(row['lr'])}")


def format_lr(lr: float) -> str:
    """The users' fixed-point format, switching to exponent form where it would print 0.000000."""
    return f"{lr:.6f}" if lr >= 1e-5 or lr == 0 else f"{lr:.2e}"


def write_metrics_csv(history: list, path: str) -> None:
    """Rewritten whole from the history each epoch (atomically), so a resume never duplicates rows."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(",".join(columns) + "\n")
        for row in history:
            f.write(",".join(_fmt(row.get(c, "")) for c in columns) + "\n")
    os.replace(tmp, path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def checkpoint_state(run: "Run", stage: Stage, level: int) -> dict:
    state, ema = run.state, run.ema
    return {
        "format_version": ckpt.FORMAT_VERSION,
        "model": ckpt.unwrap(run.model).state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "epoch": state.epoch,
        "stage": stage.index + 1,
        "global_step": state.global_step,
        "unfreeze_level": level,
        "best": {"metric": run.cfg.monitor, "value": state.best_value, "epoch": state.best_epoch},
        "bad_epochs": state.bad_epochs,
        "history": state.history,
        "restart_at": state.restart_at,
        "partial": state.partial,
        "rng": ckpt.rng_state(),
        "config": run.cfg.to_dict(),
    }


def save_periodic_copy(cfg: Config, full: dict, epoch: int) -> None:
    """``--save-every N``: epoch_NNNN.pth every N epochs, the newest ``--keep-last K`` kept."""
    if not cfg.save_every or (epoch + 1) % cfg.save_every:
        return
    ckpt.save(full, os.path.join(cfg.checkpoint_dir, f"epoch_{epoch + 1:04d}.pth"))
    if cfg.keep_last:
        copies = sorted(f for f in os.listdir(cfg.checkpoint_dir)
                        if f.startswith("epoch_") and f.endswith(".pth"))
        for old in copies[:-cfg.keep_last]:
            os.remove(os.path.join(cfg.checkpoint_dir, old))


def is_improvement(value: float, best: Optional[float], higher_is_better: bool) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if higher_is_better else value < best


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def resume_run(run: Run) -> None:
    """Restore what ``--resume-from`` holds into ``run`` and decide the schedule (see resume.py)."""
    cfg, state = run.cfg, run.state
    obj = ckpt.load(cfg.resume_from)
    ckpt.load_model_weights(run.model, ckpt.model_state_of(obj), cfg.resume_from)
    if not ckpt.is_full_checkpoint(obj):
        log.info("Resume: %s holds weights only: training starts from them with a fresh schedule",
                 cfg.resume_from)
        if run.ema is not None:
            run.ema.module.load_state_dict(ckpt.unwrap(run.model).state_dict())
        return
    state.epoch = int(obj["epoch"])
    state.global_step = int(obj["global_step"])
    state.history = [dict(r) for r in obj.get("history", []) if r["epoch"] <= state.epoch + 1]
    state.partial = obj.get("partial")
    if obj["best"].get("metric") == cfg.monitor:
        state.best_value, state.best_epoch = obj["best"]["value"], obj["best"]["epoch"]
        state.bad_epochs = int(obj.get("bad_epochs", 0))
    else:
        log.info("Resume: --monitor changed from %s to %s: the best-model record starts anew",
                 obj["best"].get("metric"), cfg.monitor)
    try:
        run.optimizer.load_state_dict(obj["optimizer"])
    except (ValueError, KeyError):
        log.info("Resume: the optimizer state does not fit this model: fresh optimizer moments")
    if run.scaler is not None and obj.get("scaler"):
        run.scaler.load_state_dict(obj["scaler"])
    elif run.scaler is not None or obj.get("scaler"):
        log.info("Resume: the checkpoint was trained %s fp16 loss scaling and this run %s: the loss "
                 "scale starts afresh", "with" if obj.get("scaler") else "without",
                 "uses it" if run.scaler is not None else "does not (CPU, bf16 or --amp off)")
    if run.ema is not None:
        if obj.get("ema"):
            run.ema.load_state_dict(obj["ema"])
        else:
            run.ema.module.load_state_dict(ckpt.unwrap(run.model).state_dict())
    ckpt.set_rng_state(obj.get("rng"))
    next_epoch = state.partial["epoch"] if state.partial else state.epoch + 1
    state.restart_at, why = decide_schedule(cfg, obj.get("config", {}), next_epoch, obj.get("restart_at"))
    if state.partial and state.restart_at == next_epoch:
        state.partial = None  # a fresh schedule starts at an epoch boundary: redo the cut-short epoch
    log.info("Resume: %s after epoch %d%s (stage %s); best %s so far: %s; %s", cfg.resume_from,
             state.epoch + 1, f" + {state.partial['batches']} batches" if state.partial else "",
             obj.get("stage"), cfg.monitor,
             "none" if state.best_value is None else f"{state.best_value:.4f} at epoch {state.best_epoch + 1}",
             why)
    archive_abandoned_history(os.path.join(cfg.checkpoint_dir, "metrics.csv"), state.epoch + 1)


def fit(cfg: Config, argv: Optional[list] = None) -> dict:
    """Train; ``argv`` (the command line) is only used to print the exact command that goes on."""
    os.makedirs(cfg.checkpoint_dir, exist_ok=True)
    setup_file_logging(cfg.checkpoint_dir)
    with open(os.path.join(cfg.checkpoint_dir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = amp_dtype(cfg.amp, device)
    monitor_key, higher_is_better = resolve_monitor(cfg.monitor)
    log.info("Device: %s | AMP: %s | seed %d", device, dtype or "off (fp32)", cfg.seed)

    index, train_samples, val_samples = load_data(cfg)
    model = build_model(backbone=cfg.backbone, num_experts=cfg.num_experts, moe_top_k=cfg.moe_top_k,
                        deep_supervision=cfg.deep_supervision, pretrained=cfg.pretrained,
                        pretrained_path=cfg.pretrained_path, drop_path=cfg.drop_path,
                        dropout=cfg.dropout, decoder_channels=cfg.decoder_channels).to(device)
    loss_fn = build_loss(bce_weight=cfg.bce_weight, iou_weight=cfg.iou_weight, dice_weight=cfg.dice_weight,
                         moe_aux_weight=cfg.moe_aux_weight, ds_weights=cfg.ds_weights,
                         label_smoothing=cfg.label_smoothing)
    log_model_summary(cfg, model, device)
    optimizer = build_optimizer(cfg, model)
    run = Run(cfg, model, loss_fn, optimizer,
              scaler=torch.amp.GradScaler("cuda") if dtype == torch.float16 else None,
              ema=ModelEma(model, cfg.ema_decay) if cfg.ema else None,
              device=device, dtype=dtype, state=RunState(), stop=StopRequest())
    state = run.state
    if cfg.resume_from:
        resume_run(run)
    start_epoch = state.partial["epoch"] if state.partial else state.epoch + 1
    if cfg.skip_stage1 and start_epoch < cfg.stage1_epochs:
        log.info("--skip-stage1: stage 2 starts at epoch %d from %s", cfg.stage1_epochs + 1,
                 "the resumed weights" if cfg.resume_from else
                 "the initial (%s) weights" % ("pretrained" if cfg.pretrained else "random"))
        start_epoch, state.partial, state.restart_at = cfg.stage1_epochs, None, None
    if start_epoch >= cfg.epochs:
        log.info("Nothing to train: epoch %d already reached --epochs %d (raise --epochs to go on)",
                 start_epoch, cfg.epochs)
        return summary(state, finished=True)

    stages = plan_stages(cfg, restart_at=state.restart_at)
    plan = make_lr_plan(cfg, stages, n_train=len(train_samples))
    log.info("%s\n%s", schedulers.format_plan(plan), schedulers.ascii_plot(plan))

    last_path = os.path.join(cfg.checkpoint_dir, "last.pth")
    budget = TimeBudget(cfg.time_limit_s)
    epochs_this_run = 0
    with run.stop:
        for stage, stage_plan in zip(stages, plan.stages):
            if stage.end_epoch <= start_epoch:
                continue
            train_loader = make_loader(cfg, train_samples, stage.batch_size, train=True,
                                       seed_offset=stage.index)
            val_loader = make_loader(cfg, val_samples, stage.batch_size, train=False) if val_samples else None
            restarts = set(stage_plan.restart_epochs())
            for epoch in range(max(stage.start_epoch, start_epoch), stage.end_epoch):
                if epoch in (stage.start_epoch, stage.schedule_start) or epoch in restarts:
                    state.bad_epochs = 0  # patience restarts with the stage and each LR restart
                reason = stop_reason(cfg, epochs_this_run, budget)
                if reason:
                    log.info("%s: stopping before epoch %d. Go on with:\n  %s", reason, epoch + 1,
                             continue_command(argv, last_path))
                    return summary(state, finished=False)
                level = unfreeze_level(cfg, epoch, model.num_backbone_stages)
                model.set_backbone_trainable(level)
                train_loader.set_epoch(epoch)
                t0 = time.time()
                partial, state.partial = state.partial, None
                train_stats, progress = train_one_epoch(run, train_loader, stage_plan, stage, epoch, partial)
                val_stats = validate(run, val_loader) if train_stats and not run.stop.requested else None
                if val_stats is None:  # a stop request: in the epoch, at its end, or in validation
                    state.partial = progress
                    ckpt.save(checkpoint_state(run, stage, level), last_path)
                    where = (f"in epoch {epoch + 1} after {progress['batches']} batches" if not train_stats
                             else f"at the end of epoch {epoch + 1}, before its validation")
                    raise interrupted(run, where, last_path, argv)
                end_of_epoch(run, stage, epoch, level, train_stats, val_stats, monitor_key,
                             higher_is_better, time.time() - t0)
                budget.record(time.time() - t0)
                epochs_this_run += 1
                if cfg.early_stop_patience and state.bad_epochs >= cfg.early_stop_patience:
                    log.info("Early stop: %d epochs without a better %s", state.bad_epochs, cfg.monitor)
                    break
                if run.stop.requested:
                    raise interrupted(run, f"after epoch {epoch + 1}", last_path, argv)
            else:
                continue
            break  # early stop ends the whole run

        log.info("Done. Best %s %s -> %s", cfg.monitor,
                 "none" if state.best_value is None else f"{state.best_value:.4f} at epoch {state.best_epoch + 1}",
                 os.path.join(cfg.checkpoint_dir, "best_model.pth"))
        out = summary(state, finished=True)
        out["test"] = evaluate_test_sets(cfg, index, model, loss_fn, device, run.stop)
    return out


def interrupted(run: Run, where: str, last_path: str, argv: Optional[list]) -> RunInterrupted:
    name = signal.Signals(run.stop.signum).name
    return RunInterrupted(f"stopped by {name} {where}; saved {last_path}. Go on with: "
                          f"{continue_command(argv, last_path)}", 128 + run.stop.signum)


def stop_reason(cfg: Config, epochs_this_run: int, budget: TimeBudget) -> Optional[str]:
    if cfg.run_epochs is not None and epochs_this_run >= cfg.run_epochs:
        return f"--run-epochs {cfg.run_epochs} reached"
    if not budget.allows_another():
        return (f"--time-limit {cfg.time_limit}: another epoch (up to {1.1 * budget.longest:.0f} s) "
                "would not fit")
    return None


def validate(run: Run, val_loader) -> Optional[dict]:
    """Validation metrics ({} without a validation split; None when a stop request cut it short),
    from the EMA weights when there are some."""
    if val_loader is None:
        return {}
    eval_model = run.ema.module if run.ema is not None else run.model
    return evaluate_model(run.cfg, eval_model, run.loss_fn, val_loader, run.device, run.dtype, stop=run.stop)


def end_of_epoch(run: Run, stage: Stage, epoch: int, level: int, train_stats: dict, val_stats: dict,
                 monitor_key: str, higher_is_better: bool, seconds: float) -> None:
    """Log one line, update the best record, save last/best/periodic and metrics.csv."""
    cfg, state = run.cfg, run.state
    state.epoch = epoch
    row = {"epoch": epoch + 1, "stage": stage.index + 1, "unfreeze_level": level, **train_stats,
           **{f"val_{k}": v for k, v in val_stats.items()}}
    state.history.append(row)
    value = val_stats.get(monitor_key, -train_stats["train_loss"])
    improved = is_improvement(value, state.best_value, higher_is_better if val_stats else True)
    if improved:
        state.best_value, state.best_epoch, state.bad_epochs = value, epoch, 0
    else:
        state.bad_epochs += 1
    line = (format_epoch_line(row, cfg) if val_stats else
            f"Epoch {epoch + 1}/{cfg.epochs}: Loss: {row['train_loss']:.4f} | LR: {format_lr(row['lr'])}")
    log.info("%s | %.0fs%s", line, seconds, "  * best" if improved else "")
    full = checkpoint_state(run, stage, level)
    ckpt.save(full, os.path.join(cfg.checkpoint_dir, "last.pth"))
    if improved:
        ckpt.save(full, os.path.join(cfg.checkpoint_dir, "best_model.pth"))
    save_periodic_copy(cfg, full, epoch)
    write_metrics_csv(state.history, os.path.join(cfg.checkpoint_dir, "metrics.csv"))


def summary(state: RunState, finished: bool) -> dict:
    return {"best_value": state.best_value, "best_epoch": state.best_epoch, "history": state.history,
            "finished": finished}


def log_model_summary(cfg: Config, model, device) -> None:
    counts = model.param_counts()
    log.info("Model: %s, %d experts (top-%d), deep supervision %s | params: %s | %.2f GFLOPs per "
             "%d px image (forward)", cfg.backbone, cfg.num_experts, cfg.moe_top_k,
             "on" if cfg.deep_supervision else "off",
             ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()),
             forward_gflops(model, cfg.img_size, device), cfg.img_size)
    log.info("Regularisation: weight decay %g (not on norms/biases) | drop-path %g | dropout %g | "
             "label smoothing %g | grad clip %g", cfg.weight_decay, cfg.drop_path, cfg.dropout,
             cfg.label_smoothing, cfg.grad_clip)


def evaluate_test_sets(cfg: Config, index, model, loss_fn, device, stop: StopRequest) -> dict:
    """Score best_model.pth on every test set, kept apart from validation in test_metrics.json.
    In fp32 whatever the training precision, as ``evaluate`` scores it, so the two reports agree.
    A stop request ends the scoring (training is finished; ``evaluate`` can score it later)."""
    best_path = os.path.join(cfg.checkpoint_dir, "best_model.pth")
    if not index.tests or cfg.val_on_test or not os.path.isfile(best_path):
        return {}
    best = ckpt.load(best_path)
    weights = best["ema"]["module"] if best.get("ema") else best["model"]
    ckpt.load_model_weights(model, weights, best_path)
    results = {}
    for name, samples in index.tests.items():
        loader = make_loader(cfg, samples, cfg.stage2_batch_size_value, train=False)
        results[name] = evaluate_model(cfg, model, loss_fn, loader, device, None, desc=f"test {name}",
                                       stop=stop)
        if results[name] is None:
            raise RunInterrupted(
                f"stopped by {signal.Signals(stop.signum).name} while scoring the test split; training "
                f"is finished ({best_path}). Score it with: python train_ultimate.py evaluate --checkpoint "
                f"{best_path}{' --use-ema' if cfg.ema else ''} --dataset-path {cfg.dataset_path}",
                128 + stop.signum)
    from evaluation import format_table
    log.info("Test split (best_model.pth, epoch %d):\n%s", best["epoch"] + 1, format_table(results))
    with open(os.path.join(cfg.checkpoint_dir, "test_metrics.json"), "w") as f:
        json.dump({"checkpoint": best_path, "epoch": best["epoch"] + 1, "results": results}, f, indent=2)
    return results


def setup_file_logging(folder: str) -> None:
    path = os.path.join(folder, "train.log")
    root = logging.getLogger("cod")
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(path)
               for h in root.handlers):
        fh = logging.FileHandler(path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        root.addHandler(fh)
