"""``train_ultimate.py lr-find``: the LR range test (Smith 2015; fastai's ``lr_find``).

    build the run as train does (data, model, loss, optimizer, runtime) -> load --resume-from weights
    -> freeze (stage 1) or unfreeze (stage 2) the backbone
    -> N optimizer updates with the head LR rising exponentially from start to end
       (each update: --accumulation-steps micro-batches, the real loss, AMP through the Runtime,
       the loader started again when it runs out)
    -> smooth the loss (EMA with bias correction), stop once it is 4x its minimum or not finite
    -> lr_find.csv, lr_find.png and the suggested LR

The suggestion is the LR at the minimum of the smoothed loss divided by 10. fastai v1's
``recorder.plot(suggestion=True)`` printed two numbers, "Min numerical gradient" and "Min loss
divided by 10"; both are printed here, the second is the suggestion. The steepest descent is the
derivative of a noisy curve: on a short sweep it jumps between neighbouring bumps (and the first
smoothed values, single losses, are left out of it). The minimum is one well-defined point, where
the loss stops improving; a tenth of it lies on the falling part of the curve, a safe distance below
the LRs where training becomes unstable, and also makes up for the EMA's lag (the smoothed minimum
comes some updates, so a higher LR, after the raw one).

The swept LR is the head group's, as ``--lr`` / ``--stage2-lr``; the backbone gets
``--backbone-lr-mult`` times it, as in training. Nothing but ``lr_find.csv`` and ``lr_find.png`` is
written: no config.json, train.log, metrics.csv or checkpoint, and the weights on disk stay as they
are (``--resume-from``'s model weights are read; the sweep trains them in memory only). Stage 2
unfreezes the whole backbone, also with ``--progressive-unfreeze`` (the LR must suit the end state).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

import schedulers
from core.errors import UserError
from core import checkpoint as ckpt
from training.config import Config
from training.loop import micro_step, optimizer_step
from core.io import atomic_write
from core.plots import figure, save_png
from core.runtime import Runtime
from training.build import load_data, make_loader, seed_everything
from training.stages import full_unfreeze_level
from training.build import build_run

log = logging.getLogger("cod")

SMOOTHING = 0.98       # EMA factor of the loss (fastai's beta): an average over the last ~50 updates
DIVERGED = 4.0         # stop once the smoothed loss exceeds this many times its minimum
SKIP_START = 10        # updates left out of the steepest-descent search (fastai's skip_start)
RULE = "the LR at the minimum of the smoothed loss, divided by 10"


@dataclass
class LRFindOptions:
    stage: int = 2          # 1: backbone frozen (--lr); 2: backbone unfrozen (--stage2-lr)
    steps: int = 200        # optimizer updates
    start_lr: float = 1e-7
    end_lr: float = 1.0

    def validate(self) -> "LRFindOptions":
        if self.stage not in (1, 2):
            raise UserError(f"--stage must be 1 or 2 (got {self.stage})")
        if self.steps < 2:
            raise UserError(f"--lr-find-steps must be >= 2 (got {self.steps})")
        if not 0 < self.start_lr < self.end_lr:
            raise UserError(f"--lr-find-start ({self.start_lr:g}) must be > 0 and below --lr-find-end "
                            f"({self.end_lr:g})")
        return self


@dataclass
class LRFindResult:
    lrs: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    smoothed: list = field(default_factory=list)
    stop_reason: str = ""
    suggestion: Optional[float] = None   # lr_min / 10
    lr_min: Optional[float] = None       # LR at the minimum of the smoothed loss
    lr_steepest: Optional[float] = None  # LR at the steepest descent of the smoothed loss

    def rows(self):
        return [(i, lr, loss, s) for i, (lr, loss, s) in enumerate(zip(self.lrs, self.losses, self.smoothed))]


def lr_at(i: int, opts: LRFindOptions) -> float:
    """Exponential from ``start_lr`` (update 0) to ``end_lr`` (update ``steps - 1``)."""
    return opts.start_lr * (opts.end_lr / opts.start_lr) ** (i / (opts.steps - 1))


class Smoother:
    """Exponential moving average with bias correction (fastai): the first value is the first loss,
    later ones weigh the last ~1/(1-beta) losses."""

    def __init__(self, beta: float = SMOOTHING):
        self.beta, self.avg, self.n = beta, 0.0, 0

    def __call__(self, x: float) -> float:
        self.n += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * x
        return self.avg / (1 - self.beta ** self.n)


def suggest(result: LRFindResult) -> LRFindResult:
    """Fill ``lr_min``, ``lr_steepest`` and ``suggestion`` from the finite part of the curve."""
    n = len(result.smoothed)
    while n and not math.isfinite(result.smoothed[n - 1]):
        n -= 1
    if n == 0:
        return result
    lrs, sm = np.asarray(result.lrs[:n]), np.asarray(result.smoothed[:n])
    i_min = int(np.argmin(sm))
    result.lr_min = float(lrs[i_min])
    result.suggestion = result.lr_min / 10
    skip = min(SKIP_START, i_min // 2)  # the first smoothed values are single noisy losses
    if i_min - skip >= 1:  # the steepest fall before the minimum, d(loss)/d(log10 lr)
        slope = np.gradient(sm[skip:i_min + 1], np.log10(lrs[skip:i_min + 1]))
        result.lr_steepest = float(lrs[skip + int(np.argmin(slope))])
    return result


def lr_find(cfg: Config, opts: LRFindOptions, out_dir: Optional[str] = None) -> LRFindResult:
    """Run the sweep, write ``lr_find.csv`` / ``lr_find.png`` to ``out_dir`` (default
    ``--checkpoint-dir``) and print the suggestion. One process only (no torchrun)."""
    opts.validate()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("lr-find runs in one process: start it with python, not torchrun")
    out_dir = out_dir or cfg.checkpoint_dir
    rt = Runtime(cfg.device, cfg.amp)
    seed_everything(cfg.seed)
    log.info("Device: %s | seed %d", rt.describe(), cfg.seed)
    _, train_samples, _ = load_data(cfg)
    run = build_run(cfg, rt)
    run.guard = None  # the sweep diverges on purpose: no rollbacks
    if cfg.resume_from:
        obj = ckpt.load(cfg.resume_from)
        ckpt.load_model_weights(run.net, ckpt.model_state_of(obj), cfg.resume_from)
        log.info("lr-find: starting from the weights in %s (read only)", cfg.resume_from)
    run.net.set_backbone_trainable(0 if opts.stage == 1 else full_unfreeze_level(run.net.num_backbone_stages))
    run.model = rt.wrap(run.net)
    run.model.train()
    batch_size = cfg.batch_size if opts.stage == 1 else cfg.effective_stage2_batch_size
    loader = make_loader(cfg, rt, train_samples, batch_size, train=True, seed_offset=opts.stage - 1)
    log.info("lr-find: stage %d (backbone %s), %d updates of %d x %d images, head LR %.1e -> %.1e "
             "(backbone x %g)", opts.stage, "frozen" if opts.stage == 1 else "unfrozen", opts.steps,
             cfg.accumulation_steps, batch_size, opts.start_lr, opts.end_lr, cfg.backbone_lr_mult)
    result = sweep(run, cycle(loader, cfg.limit_batches), opts)
    suggest(result)
    write_outputs(result, opts, out_dir)
    report(result)
    return result


def cycle(loader, limit_batches: Optional[int]):
    """Batches forever: the loader (at most ``--limit-batches`` of them per pass), pass after pass."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        n = 0
        for batch in loader:
            yield batch
            n += 1
            if limit_batches and n >= limit_batches:
                break
        if n == 0:
            raise UserError("lr-find: the training loader gave no batch (too few training images?)")
        epoch += 1


def sweep(run, batches, opts: LRFindOptions) -> LRFindResult:
    """``opts.steps`` optimizer updates at rising LRs; the loss of an update is the mean over its
    micro-batches (before the update, as training logs it)."""

    accum, res, smoother = run.cfg.accumulation_steps, LRFindResult(), Smoother()
    best = math.inf
    bar = tqdm(total=opts.steps, desc="lr-find", leave=False, disable=not run.cfg.progress,
               dynamic_ncols=True, mininterval=1.0)
    run.state.optimizer.zero_grad(set_to_none=True)
    res.stop_reason = f"all {opts.steps} updates done"
    try:
        for i in range(opts.steps):
            lr = lr_at(i, opts)
            schedulers.apply_lr(run.state.optimizer, lr)
            total = 0.0
            for _ in range(accum):
                loss, _, _ = micro_step(run, next(batches), accum)
                total += loss.detach().float().item() / accum
            optimizer_step(run, total)
            smoothed = smoother(total)
            res.lrs.append(lr)
            res.losses.append(total)
            res.smoothed.append(smoothed)
            bar.update(1)
            bar.set_postfix(lr=f"{lr:.1e}", loss=f"{smoothed:.4f}", refresh=False)
            if not math.isfinite(smoothed):
                res.stop_reason = f"the loss became {total} at LR {lr:.2e} (update {i + 1})"
                break
            best = min(best, smoothed)
            if smoothed > DIVERGED * best:
                res.stop_reason = (f"the smoothed loss passed {DIVERGED:g}x its minimum at LR {lr:.2e} "
                                   f"(update {i + 1})")
                break
    except KeyboardInterrupt:
        res.stop_reason = f"interrupted after {len(res.lrs)} updates"
    finally:
        bar.close()
    return res


def write_outputs(result: LRFindResult, opts: LRFindOptions, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "lr_find.csv")
    with atomic_write(csv_path, "w") as f:
        f.write("step,lr,loss,smoothed\n")
        for i, lr, loss, s in result.rows():
            f.write(f"{i},{lr!r},{loss!r},{s!r}\n")
    log.info("lr-find: wrote %s (%d rows)", csv_path, len(result.lrs))
    png_path = os.path.join(out_dir, "lr_find.png")
    try:
        plot(result, opts, png_path)
        log.info("lr-find: wrote %s", png_path)
    except ImportError:
        log.info("lr-find: matplotlib is not installed (pip install matplotlib): no %s", png_path)


def report(result: LRFindResult) -> None:
    print(f"lr-find: {len(result.lrs)} updates; stopped: {result.stop_reason}")
    if result.suggestion is None:
        raise UserError("lr-find: no finite loss at all; lower --lr-find-start")
    steep = "n/a (the minimum is the first update)" if result.lr_steepest is None else f"{result.lr_steepest:.2e}"
    print(f"suggested LR: {result.suggestion:.2e} (rule: {RULE}; minimum at {result.lr_min:.2e}; "
          f"steepest descent at {steep})")
    if result.lr_min == result.lrs[-1] and len(result.lrs) > 1:
        print("note: the smoothed loss was still falling at the last update: the sweep did not reach "
              "the minimum (raise --lr-find-end or --lr-find-steps)")
    elif result.lr_min == result.lrs[0]:
        print("note: the smoothed loss was lowest at the first update: lower --lr-find-start")


def plot(result: LRFindResult, opts: LRFindOptions, path: str) -> None:
    fig = figure(8, 4.5, dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(result.lrs, result.losses, lw=0.8, alpha=0.4, color="tab:blue", label="loss")
    ax.plot(result.lrs, result.smoothed, lw=1.8, color="tab:blue", label=f"smoothed (EMA {SMOOTHING:g})")
    marks = (("suggestion", result.suggestion, "tab:green", "-"), ("minimum", result.lr_min, "tab:red", "--"),
             ("steepest", result.lr_steepest, "tab:orange", ":"))
    for name, lr, color, ls in marks:
        if lr is not None:
            ax.axvline(lr, color=color, ls=ls, lw=1, label=f"{name} {lr:.1e}")
    finite = [s for s in result.smoothed if math.isfinite(s)]
    if finite:  # the diverged tail would squash the interesting part
        lo, first = min(finite), finite[0]
        span = max(first - lo, 0.1 * abs(lo), 1e-6)
        ax.set_ylim(lo - 0.2 * span, first + 0.6 * span)
    ax.set_xscale("log")
    ax.set_xlabel("head learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test, stage {opts.stage} ({len(result.lrs)} updates); "
                 "suggestion = LR at the smoothed minimum / 10", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", fontsize=8)
    fig.subplots_adjust(left=0.1, right=0.97, top=0.92, bottom=0.12)
    save_png(fig, path)
