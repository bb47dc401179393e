"""One epoch of training and one pass of validation. The recipe only; names of loss terms and
metrics come from the loss and the scorer, devices and processes from the runtime.

    fetch batch -> forward under autocast -> loss / accumulation -> backward
    -> (every N micro-batches) clip, step, zero, EMA, count -> (a stop request?) -> log
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm

import schedulers
from evaluation.pool import MetricPool
from training.config import Config
from training.control import StopRequest
from training.guards import DivergenceGuard, RollbackNeeded, TrainingDiverged, lr_factor
from core.runtime import Runtime
from training.stages import Stage, steps_per_epoch
from training.progress import Progress, RunState


@dataclass
class Run:
    """What one training run holds; the loop's functions take this instead of a dozen arguments."""
    cfg: Config
    rt: Runtime
    state: RunState           # model (unwrapped), optimizer, scaler, EMA, counters
    loss_fn: torch.nn.Module
    stop: StopRequest
    model: Optional[torch.nn.Module] = None  # what the loop calls: rt.wrap(state.model)
    reporters: list = field(default_factory=list)  # training/report: what each epoch writes
    lr_steps: Optional[list] = None          # (epoch axis, LR) of every update of the plan, for curves.png
    pool: Optional[MetricPool] = None        # --metric-workers: scores validation and the test split

    @property
    def net(self) -> torch.nn.Module:
        return self.state.model

    @property
    def guard(self) -> Optional[DivergenceGuard]:
        """--divergence-guard (kept in the state: its loss window is saved in checkpoints)."""
        return self.state.guard

    @guard.setter
    def guard(self, guard: Optional[DivergenceGuard]) -> None:
        self.state.guard = guard

    @property
    def progress(self) -> Progress:
        return self.state.progress

    def eval_model(self) -> torch.nn.Module:
        """The weights validation scores: the EMA's when there is one."""
        return self.state.ema.module if self.state.ema is not None else self.state.model


def optimizer_step(run: Run, loss: torch.Tensor) -> None:
    """One update; with the divergence guard, a non-finite gradient skips it, and a run of those or
    a loss spike raises ``RollbackNeeded`` (agreed by all processes). ``loss``: the step's mean loss."""
    stepped = run.rt.step(run.state.optimizer, run.net, run.cfg.grad_clip, check_finite=run.guard is not None)
    if stepped and run.state.ema is not None:
        run.state.ema.update(run.net)
    run.progress.global_step += 1
    if run.guard is not None:
        reason = run.guard.after_step(float(loss), stepped)
        if run.rt.any(reason is not None):
            raise RollbackNeeded(reason or "another process's divergence guard")


def micro_step(run: Run, batch: dict, group_size: int, sync: bool = True):
    """Forward and backward of one micro-batch of an update of ``group_size`` of them: its loss / group
    size is added to the gradients (reduced between processes only when ``sync``). Returns
    ``(loss, terms, outputs)``."""
    rt = run.rt
    image = batch["image"].to(rt.device, non_blocking=True)
    mask = batch["mask"].to(rt.device, non_blocking=True)
    with rt.accumulating(run.model, sync=sync):
        with rt.autocast():
            outputs = run.model(image)
            loss, terms = run.loss_fn(outputs, mask)
        rt.backward(loss / group_size)
    return loss, terms, outputs


def mean_over_processes(rt: Runtime, values):
    """``values`` (a number, None, or lists and dicts of them) averaged over the processes."""
    if rt.world_size == 1:
        return values
    return _mean(rt.gather(values))


def _mean(items: list):
    first = items[0]
    if isinstance(first, dict):
        return {k: _mean([it[k] for it in items]) for k in first}
    if isinstance(first, list):
        return [_mean([it[j] for it in items]) for j in range(len(first))]
    return None if first is None else sum(items) / len(items)


def train_one_epoch(run: Run, loader, stage_plan, stage: Stage, epoch: int,
                    partial: Optional[dict] = None) -> tuple[Optional[dict], dict]:
    """Train one epoch. Returns ``(stats, progress)``: ``progress`` says how far the epoch got (the
    ``partial`` a checkpoint saves, so that a resume finishes the epoch), ``stats`` is None when a
    stop request cut the epoch short.

    A resumed ``partial`` epoch replays the data order from the start, loading but not training the
    batches that were done, so the rest of the epoch sees exactly the batches it would have. The
    accumulators come back onto the run's device, whichever device wrote the checkpoint."""
    cfg, rt, accum = run.cfg, run.rt, run.cfg.accumulation_steps
    run.model.train()
    n_batches = min(len(loader), cfg.limit_batches or len(loader))
    spe = steps_per_epoch(n_batches, accum)
    assert spe == stage_plan.steps_per_epoch, (spe, stage_plan.steps_per_epoch)  # one clock for both
    k0 = (epoch - stage.schedule_start) * spe
    done = partial["batches"] if partial else 0
    sums = {k: torch.tensor(v, device=rt.device) for k, v in partial["sums"].items()} if partial else {}
    usage = (torch.tensor(partial["usage"], device=rt.device)
             if partial and partial.get("usage") is not None else None)
    head_lr = (stage_plan.lr_at(k0 + max(done - 1, 0) // accum)  # the LR of the last update done
               * lr_factor(run.progress, run.progress.global_step - 1))

    def progress(batches: int) -> dict:
        means = mean_over_processes(rt, {"sums": {k: float(v) for k, v in sums.items()},
                                         "usage": None if usage is None else usage.tolist()})
        return {"epoch": epoch, "batches": batches, **means}

    bar = tqdm(total=n_batches, initial=done, desc=f"Epoch {epoch + 1}/{cfg.epochs} {stage.name}",
               leave=False, disable=not (cfg.progress and rt.is_main), dynamic_ncols=True, mininterval=1.0)
    run.state.optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(loader if done < n_batches else ()):
        if i >= n_batches:
            break
        if i < done:
            continue
        group = i // accum
        group_size = min(accum, n_batches - group * accum)
        if i % accum == 0:
            head_lr = stage_plan.lr_at(k0 + group) * lr_factor(run.progress, run.progress.global_step)
            schedulers.apply_lr(run.state.optimizer, head_lr)
            group_loss = 0.0
        last_micro = (i + 1) % accum == 0 or i + 1 == n_batches
        loss, terms, outputs = micro_step(run, batch, group_size, sync=last_micro)
        group_loss = group_loss + loss.detach().float() / group_size
        ok = torch.isfinite(loss.detach())  # a non-finite batch is left out of the means (its step skipped)
        for name, value in {"loss": loss.detach(), **terms, "_batches": torch.ones(())}.items():
            sums[name] = sums.get(name, 0.0) + torch.where(ok, value.float(), 0.0)
        u = outputs.get("expert_usage")
        if u is not None and u.numel() > 0:
            usage = u.float() if usage is None else usage + u.float()
        bar.update(1)
        if cfg.progress and rt.is_main and (i % 20 == 0 or i + 1 == n_batches):  # the only host syncs
            bar.set_postfix(loss=f"{(sums['loss'] / sums['_batches'].clamp(min=1)).item():.4f}", lr=f"{head_lr:.2e}")
        if last_micro:
            optimizer_step(run, group_loss)
            if i + 1 < n_batches and run.stop.agree(rt):
                bar.close()
                return None, progress(i + 1)
    bar.close()
    final = progress(n_batches)
    counted = final["sums"].get("_batches", 0.0)
    out = {"lr": head_lr, **{f"train_{k}": v / counted if counted else math.nan
                             for k, v in final["sums"].items() if not k.startswith("_")}}
    for e, total in enumerate(final["usage"] or []):
        out[f"expert{e}_usage"] = total / n_batches
    if not math.isfinite(out["train_loss"]):
        raise TrainingDiverged(f"the training loss became {out['train_loss']} in epoch {epoch + 1}")
    return out, final


@torch.no_grad()
def validate(cfg: Config, rt: Runtime, model, loss_fn, loader, stop: Optional[StopRequest] = None,
             desc: str = "val", fp32: bool = False, scorer=None) -> Optional[dict]:
    """Loss at the training size and the scorer's metrics at each ground truth's own resolution, over
    this process's shard of the images merged with the others'. None when a stop was requested (a
    signal: save and exit quickly; chunks still being scored are left to ``MetricPool.close``).
    ``fp32``: whatever the training precision (the reported test-split numbers). ``scorer``: the
    run's (``run.pool.scorer``); without one, ``cfg.effective_metric_workers`` processes start for this call."""
    if scorer is None:
        with MetricPool(cfg.effective_metric_workers) as pool:
            return validate(cfg, rt, model, loss_fn, loader, stop, desc, fp32, pool.scorer(cfg.threshold))
    model.eval()
    loss_sum, seen, stopped = 0.0, 0, False
    for batch in tqdm(loader, desc=desc, leave=False, disable=not (cfg.progress and rt.is_main),
                      dynamic_ncols=True, mininterval=1.0):
        if stop is not None and stop.requested:
            stopped = True
            break
        image = batch["image"].to(rt.device)
        mask = batch["mask"].to(rt.device)
        with nullcontext() if fp32 else rt.autocast():
            outputs = model(image)
            loss, _ = loss_fn(outputs, mask)
        loss_sum += loss.float().item() * image.shape[0]
        seen += image.shape[0]
        probs = torch.sigmoid(outputs["main"].float())
        if not torch.isfinite(probs).all():  # the scorer moves them to the host anyway: no extra sync
            raise TrainingDiverged(f"the model's predictions became NaN or inf ({desc})")
        scorer.add(probs, batch["mask_path"])
    if stop is not None and stop.agree(rt, stopped):
        return None
    totals = mean_over_processes(rt, {"loss_sum": loss_sum, "seen": seen})
    metrics = scorer.results(rt)
    return {"loss": totals["loss_sum"] / max(totals["seen"], 1e-9), **(metrics or {})}
