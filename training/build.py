"""Building a run: data and loaders, the model, its loss and optimizer, the resumed state, the LR
plan. ``train``, ``lr-find`` and the ``schedule`` preview call the same functions, so they count
steps the same way."""

from __future__ import annotations

import logging
import random
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DistributedSampler

import data as cod_data
import schedulers
from core.errors import UserError
from core.runtime import Runtime
from data.scan import EMPTY_FRACTION
from evaluation.pool import MetricPool
from losses import build_loss
from models import build_model
from models.flops import forward_gflops_once
from training.config import Config
from training.control import StopRequest
from training.ema import ModelEma
from training.guards import DivergenceGuard
from training.loop import Run
from training.progress import RunState
from training.report.log import log_model_summary
from training.resume import resume_run
from training.stages import Stage, batches_per_epoch, steps_per_epoch

log = logging.getLogger("cod")
SHOW_BAD_FILES = 20  # bad files named one per line in the log; the rest are counted


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(cfg: Config):
    """Index the dataset, read every file of it once (``check_files``) and split it. Validation
    never uses the test set unless asked."""
    index = cod_data.find_dataset(cfg.dataset_path, include_noncam=cfg.include_noncam, seed=cfg.seed,
                                  allow_missing_masks=True)
    check_files(cfg, index)
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


def check_files(cfg: Config, index) -> None:
    """Read every image and mask of the train and test splits before training (``data.scan``), so
    that a bad file stops the run (``--no-skip-bad-files``) or is left out, at start-up and not in
    the middle of an epoch or after it. Mostly empty masks are reported: a mask format misread."""
    splits = {"train": index.train, **{f"test set {k}": v for k, v in index.tests.items()}}
    workers = cod_data.usable_workers(cfg.num_workers)
    reports = {name: cod_data.scan_samples(samples, workers, name) for name, samples in splits.items()}
    bad = [b for r in reports.values() for b in r.bad]
    if bad and not cfg.skip_bad_files:
        where = ", ".join(f"{name} {len(r.bad)}" for name, r in reports.items() if r.bad)
        others = f" | others: {', '.join(b.path for b in bad[1:4])}{' ...' if len(bad) > 4 else ''}"
        raise UserError(f"{len(bad)} bad file(s) in {cfg.dataset_path} ({where}): {bad[0].reason}"
                        f"{others if len(bad) > 1 else ''} | fix or remove them, or leave out "
                        "--no-skip-bad-files to train without them")
    for b in bad[:SHOW_BAD_FILES]:
        log.info("Skipping a bad file (--skip-bad-files): %s", b.reason)
    if len(bad) > SHOW_BAD_FILES:
        log.info("Skipping %d more bad files (%d in all)", len(bad) - SHOW_BAD_FILES, len(bad))
    for name, r in reports.items():
        if r.empty_fraction > 0.5:
            log.info("Warning: %d of %d masks of %s are empty or nearly so (under %g %% foreground): are "
                     "they 0/1 masks? Each mask is binarised at half its own largest value "
                     "(data/images.py binarize_mask)", len(r.empty), len(r.good), name,
                     100 * EMPTY_FRACTION)
    index.train = reports["train"].good
    index.tests = {k: reports[f"test set {k}"].good for k in index.tests}
    for name, r in reports.items():
        if splits[name] and not r.good:
            raise UserError(f"no readable sample left in {name} of {cfg.dataset_path}: every one was a bad "
                            "file (see the lines above)")


def train_samples_per_process(n: int, world_size: int) -> int:
    """Each DDP process trains on ``n // world_size`` images an epoch (``DistributedSampler``,
    drop_last), one process on all of them."""
    return n // world_size if world_size > 1 else n


def eval_samples(cfg: Config, samples, batch_size: int):
    """What an evaluation loader reads: the first ``--limit-batches`` batches' worth, or all."""
    return samples[:cfg.limit_batches * batch_size] if cfg.limit_batches else samples


def make_loader(cfg: Config, rt: Runtime, samples, batch_size: int, train: bool, seed_offset: int = 0,
                use_cache: bool = True):
    """Training: shuffled (under DDP each process its own part of one shuffled order); evaluation:
    in order, the first ``--limit-batches`` batches' worth of images, each counted exactly once
    across the processes. With ``--cache`` (and ``use_cache``) items come from the cached arrays."""
    if not train:
        samples = eval_samples(cfg, samples, batch_size)
    aug = cod_data.aug_preset(cfg.aug) if train else None
    cache = open_caches(cfg, rt, [samples])[0] if cfg.cache and use_cache and samples else None
    ds = cod_data.SegDataset(samples, cfg.img_size, train=train, aug=aug, cache=cache)
    sampler = None
    if rt.world_size > 1:
        sampler = (DistributedSampler(ds, rt.world_size, rt.rank, shuffle=True, seed=cfg.seed + seed_offset,
                                      drop_last=True) if train
                   else cod_data.ShardSampler(len(ds), rt.rank, rt.world_size))
    n_local = len(sampler) if sampler is not None else len(samples)
    workers = cod_data.usable_workers(cfg.num_workers)
    return cod_data.build_loader(ds, batch_size=batch_size, shuffle=train, num_workers=workers,
                                 seed=cfg.seed + seed_offset + 7919 * rt.rank, sampler=sampler,
                                 drop_last=train and n_local >= batch_size)


def prepare_cache(cfg: Config, rt: Runtime, train, val) -> None:
    """--cache, at start-up (before anything is written to the checkpoint folder): the arrays of the
    training images and of stage 1's validation images, after one free-space check for both. The
    test sets, scored once after training, are read from their files."""
    if not cfg.cache:
        return
    log.info("Cache (--cache): the training and validation images and masks at %d px, as .npy arrays "
             "under %s", cfg.img_size, cfg.effective_cache_dir)
    open_caches(cfg, rt, [s for s in (train, eval_samples(cfg, val, cfg.batch_size)) if s])


def open_caches(cfg: Config, rt: Runtime, splits) -> list:
    """The ``ArrayCache`` of each split: the main process builds them (or finds them built) while the
    other processes wait, then every process opens them."""
    if not rt.is_main:
        rt.barrier()
    workers = cod_data.usable_workers(cfg.num_workers)
    caches = cod_data.build_caches(splits, cfg.img_size, cfg.effective_cache_dir, workers)
    if rt.is_main:
        rt.barrier()
    return caches


def build_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    """Built once with every parameter; frozen ones simply have no gradient yet."""
    groups = model.param_groups(cfg.weight_decay, cfg.backbone_lr_mult)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))


def make_lr_plan(cfg: Config, stages: list[Stage], n_train: Optional[int] = None,
                 steps_per_epoch_override: Optional[int] = None) -> schedulers.LRPlan:
    """The LR plan of ``stages``. Steps per epoch come from the number of training images one
    process sees and each stage's batch size (``n_train``), or are given directly
    (``steps_per_epoch_override``, the preview)."""
    specs = []
    for s in stages:
        spe = steps_per_epoch_override or steps_per_epoch(
            batches_per_epoch(n_train, s.batch_size, cfg.limit_batches), cfg.accumulation_steps)
        specs.append(dict(name=s.name, index=s.index, start_epoch=s.schedule_start, end_epoch=s.end_epoch,
                          steps_per_epoch=spe, base_lr=s.base_lr, warmup_steps=s.warmup_epochs * spe))
    try:
        return schedulers.build_plan(cfg.scheduler, specs, min_lr=cfg.min_lr,
                                     restart_epochs=cfg.restart_epochs, t_mult=cfg.t_mult,
                                     onecycle_pct_start=cfg.onecycle_pct_start,
                                     onecycle_div_factor=cfg.onecycle_div_factor)
    except ValueError as e:
        raise UserError(f"schedule: {e}") from None


def stage_plans(stages: list[Stage], plan: schedulers.LRPlan) -> list[tuple[Stage, schedulers.StagePlan]]:
    """Each stage with its part of the LR plan (``make_lr_plan(cfg, stages)``), matched by index."""
    by_index = {p.index: p for p in plan.stages}
    assert sorted(by_index) == [s.index for s in stages], (list(by_index), [s.index for s in stages])
    return [(s, by_index[s.index]) for s in stages]


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
             cfg.effective_stage2_batch_size * rt.world_size * cfg.accumulation_steps)
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
    return Run(cfg, rt, state, loss_fn, StopRequest(), pool=MetricPool(cfg.effective_metric_workers))
