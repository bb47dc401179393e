"""The run configuration: argparse is read once into this dataclass, validated, saved as plain data.

Nothing below the command line sees an ``argparse.Namespace``. ``Config.to_dict()`` is what goes into
``config.json`` and into every checkpoint (plain types only, so ``torch.load(weights_only=True)``
reads it back).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

from data.cache import DEFAULT_CACHE_DIR
from data.discovery import DEFAULT_SEED
from core.errors import UserError
from evaluation.metrics import DEFAULT_THRESHOLD
from evaluation.pool import default_metric_workers
from models.spec import DEFAULT_IMG_SIZE, ModelSpec, check_img_size

SCHEDULERS = ("onecycle", "cosine", "cosine_restart", "none")
AUG_PRESETS = ("none", "light", "moderate", "strong")
MONITOR_CHOICES = ("iou", "dice", "sm", "wfm", "em", "mae", "loss")
RESUME_SCHEDULES = ("auto", "continue", "restart")
log = logging.getLogger("cod")


def parse_duration(text: str) -> float:
    """'8h30m', '45m', '90s', '1.5h', '1h2m3s' -> seconds. A bare number is refused (which unit?)."""
    m = re.fullmatch(r"\s*(-?)\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*",
                     str(text))
    if not m or not any(m.groups()[1:]):
        raise UserError(f"--time-limit {text!r}: write a duration with units, e.g. 8h30m, 45m or 90s")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups()[1:])
    if m.group(1) or h * 3600 + mi * 60 + s <= 0:  # negative or zero
        raise UserError(f"--time-limit {text!r} leaves no time to train: give the wall time the run may "
                        "use, e.g. 8h30m, or leave --time-limit out")
    return h * 3600 + mi * 60 + s


def check_writable_folder(flag: str, path: str) -> None:
    """A writable folder, or one that can be created: its nearest existing parent is a writable folder."""
    path = parent = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder; pass a folder (created if missing)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {parent} is not writable; pass a folder you can write to")


@dataclass
class Config:
    # data
    dataset_path: str = "demo"
    checkpoint_dir: str = "checkpoints"
    img_size: int = DEFAULT_IMG_SIZE
    val_split: float = 0.1
    val_on_test: bool = False
    include_noncam: bool = False
    aug: str = "moderate"
    num_workers: int = 4
    metric_workers: Optional[int] = None  # None: the default of effective_metric_workers
    skip_bad_files: bool = True
    cache: bool = False
    cache_dir: Optional[str] = None  # None: DEFAULT_CACHE_DIR (~/.cache/cod_ultimate/arrays)
    limit_batches: Optional[int] = None
    # model
    backbone: str = ModelSpec.backbone
    pretrained: bool = True
    pretrained_path: Optional[str] = None
    num_experts: int = ModelSpec.num_experts
    moe_top_k: int = ModelSpec.moe_top_k
    deep_supervision: bool = ModelSpec.deep_supervision
    decoder_channels: int = ModelSpec.decoder_channels
    drop_path: float = ModelSpec.drop_path
    dropout: float = ModelSpec.dropout
    # loss
    bce_weight: float = 1.0
    iou_weight: float = 1.0
    dice_weight: float = 1.0
    moe_aux_weight: float = 0.01
    ds_weights: tuple = (0.5, 0.3, 0.2)
    label_smoothing: float = 0.0
    # optimisation
    epochs: int = 100
    stage1_epochs: int = 20
    batch_size: int = 4
    stage2_batch_size: Optional[int] = None
    accumulation_steps: int = 1
    lr: float = 2.5e-4
    stage2_lr: Optional[float] = None
    backbone_lr_mult: float = 0.1
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    amp: str = "auto"
    ema: bool = False
    ema_decay: float = 0.999
    progressive_unfreeze: bool = False
    unfreeze_interval: Optional[int] = None
    # schedule
    scheduler: str = "onecycle"
    min_lr: float = 1e-6
    warmup_epochs: int = 0
    t_mult: int = 2
    restart_epochs: Optional[int] = None
    onecycle_pct_start: float = 0.1
    onecycle_div_factor: float = 25.0
    # guards
    divergence_guard: bool = True
    spike_factor: float = 5.0
    lr_backoff: float = 0.7
    max_rollbacks: int = 3
    plateau_patience: Optional[int] = None
    plateau_min_delta: float = 1e-3
    plateau_lr_factor: float = 1.5
    plateau_from: str = "best"
    plateau_max_restarts: int = 2
    # run control
    monitor: str = "iou"
    early_stop_patience: Optional[int] = None
    resume_from: Optional[str] = None
    resume_schedule: str = "auto"
    overwrite: bool = False
    skip_stage1: bool = False
    save_every: Optional[int] = None
    keep_last: Optional[int] = None
    run_epochs: Optional[int] = None
    time_limit: Optional[str] = None
    device: str = "auto"
    seed: int = DEFAULT_SEED
    threshold: float = DEFAULT_THRESHOLD
    progress: bool = True
    curves: bool = True
    tensorboard: bool = False

    # ---- derived values (never stored separately, so they cannot disagree with the flags) ----
    @property
    def effective_stage2_lr(self) -> float:
        return self.lr if self.stage2_lr is None else self.stage2_lr

    @property
    def effective_stage2_batch_size(self) -> int:
        return self.batch_size if self.stage2_batch_size is None else self.stage2_batch_size

    @property
    def effective_metric_workers(self) -> int:
        """Scoring processes: --metric-workers, by default --num-workers (at most the CPUs - 1)."""
        return default_metric_workers(self.num_workers) if self.metric_workers is None else self.metric_workers

    @property
    def stage2_epochs(self) -> int:
        return self.epochs - self.stage1_epochs

    @property
    def effective_cache_dir(self) -> str:
        return os.path.abspath(os.path.expanduser(self.cache_dir or DEFAULT_CACHE_DIR))

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec(self.backbone, self.num_experts, self.moe_top_k, self.deep_supervision,
                         self.decoder_channels, self.drop_path, self.dropout)

    @property
    def time_limit_s(self) -> Optional[float]:
        return None if self.time_limit is None else parse_duration(self.time_limit)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ds_weights"] = list(self.ds_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "ds_weights" in kwargs:
            kwargs["ds_weights"] = tuple(kwargs["ds_weights"])
        return cls(**kwargs)

    def _check_onecycle_floor(self) -> None:
        """onecycle rises from peak / --onecycle-div-factor and must fall below that, to --min-lr."""
        d, m = self.onecycle_div_factor, self.min_lr
        for flag, eta, used in (("--lr", self.lr, self.stage1_epochs > 0 and not self.skip_stage1),
                                ("--stage2-lr", self.effective_stage2_lr, self.stage2_epochs > 0)):
            if used and m >= eta / d:
                other = f" or --onecycle-div-factor {eta / m / 2:.3g}" if eta / m > 2 else ""
                raise UserError(f"--scheduler onecycle starts at {flag} / --onecycle-div-factor = {eta:g} / "
                                f"{d:g} = {eta / d:g} and must end below that, at --min-lr ({m:g}): use "
                                f"--min-lr {eta / d / 10:.2g}{other}")

    def validate(self) -> "Config":
        """Reject bad values with the flag's name and what is allowed."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UserError(msg)

        need(self.epochs >= 1, f"--epochs must be >= 1 (got {self.epochs})")
        need(0 <= self.stage1_epochs <= self.epochs,
             f"--stage1-epochs must be between 0 and --epochs ({self.epochs}), got {self.stage1_epochs}")
        need(not self.skip_stage1 or self.stage1_epochs < self.epochs,
             f"--skip-stage1 with --stage1-epochs {self.stage1_epochs} = --epochs {self.epochs} leaves no "
             "stage-2 epoch to train: raise --epochs above --stage1-epochs")
        check_img_size(self.img_size)
        self.model_spec.validate()
        if self.moe_top_k > self.num_experts:  # the model caps it: log and store what it uses
            if self.num_experts > 1:
                log.info("Note: --moe-top-k %d is more than --num-experts %d: each sample uses all %d experts "
                         "(top-%d)", self.moe_top_k, self.num_experts, self.num_experts, self.num_experts)
            self.moe_top_k = self.num_experts
        need(self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size})")
        need(self.effective_stage2_batch_size >= 1,
             f"--stage2-batch-size must be >= 1 (got {self.stage2_batch_size})")
        need(self.accumulation_steps >= 1,
             f"--accumulation-steps must be >= 1 (got {self.accumulation_steps})")
        need(self.lr > 0, f"--lr must be > 0 (got {self.lr})")
        need(self.effective_stage2_lr > 0, f"--stage2-lr must be > 0 (got {self.stage2_lr})")
        need(self.min_lr >= 0, f"--min-lr must be >= 0 (got {self.min_lr})")
        for flag, eta in (("--lr", self.lr), ("--stage2-lr", self.effective_stage2_lr)):
            need(self.min_lr <= eta,
                 f"--min-lr ({self.min_lr:g}) is above {flag} ({eta:g}): lower --min-lr or raise {flag}")
        need(self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0 (got {self.warmup_epochs})")
        need(self.t_mult >= 1, f"--t-mult must be >= 1 (got {self.t_mult})")
        need(self.restart_epochs is None or self.restart_epochs >= 1,
             f"--restart-epochs must be >= 1 (got {self.restart_epochs})")
        need(0.0 < self.onecycle_pct_start < 1.0,
             f"--onecycle-pct-start must be in (0, 1) (got {self.onecycle_pct_start})")
        need(self.onecycle_div_factor > 1.0,
             f"--onecycle-div-factor must be > 1 (got {self.onecycle_div_factor})")
        if self.scheduler == "onecycle":
            self._check_onecycle_floor()
        need(0.0 <= self.val_split < 1.0, f"--val-split must be in [0, 1) (got {self.val_split})")
        need(self.num_workers >= 0, f"--num-workers must be >= 0 (got {self.num_workers})")
        need(self.metric_workers is None or self.metric_workers >= 0,
             f"--metric-workers must be >= 0, 0 scores in the main process (got {self.metric_workers})")
        need(self.limit_batches is None or self.limit_batches >= 1,
             f"--limit-batches must be >= 1 (got {self.limit_batches})")
        need(0.0 <= self.label_smoothing < 1.0,
             f"--label-smoothing must be in [0, 1) (got {self.label_smoothing})")
        need(len(self.ds_weights) == 3, f"--ds-weights takes three numbers (got {list(self.ds_weights)})")
        need(0.0 < self.ema_decay < 1.0, f"--ema-decay must be in (0, 1) (got {self.ema_decay})")
        need(self.grad_clip >= 0, f"--grad-clip must be >= 0, 0 disables it (got {self.grad_clip})")
        need(self.unfreeze_interval is None or self.unfreeze_interval >= 1,
             f"--unfreeze-interval must be >= 1 (got {self.unfreeze_interval})")
        need(self.early_stop_patience is None or self.early_stop_patience >= 1,
             f"--early-stop-patience must be >= 1 (got {self.early_stop_patience})")
        need(0.0 < self.threshold < 1.0, f"--threshold must be in (0, 1) (got {self.threshold})")
        need(self.spike_factor > 1.0, f"--spike-factor must be > 1 (got {self.spike_factor})")
        need(0.0 < self.lr_backoff <= 1.0, f"--lr-backoff must be in (0, 1], e.g. 0.7 (got {self.lr_backoff})")
        need(self.max_rollbacks >= 0, f"--max-rollbacks must be >= 0 (got {self.max_rollbacks})")
        need(self.plateau_patience is None or self.plateau_patience >= 1,
             f"--plateau-patience must be >= 1 (got {self.plateau_patience})")
        need(self.plateau_min_delta >= 0, f"--plateau-min-delta must be >= 0 (got {self.plateau_min_delta})")
        need(self.plateau_lr_factor > 0, f"--plateau-lr-factor must be > 0 (got {self.plateau_lr_factor})")
        need(self.plateau_from in ("best", "current"), "--plateau-from must be best or current")
        need(self.plateau_max_restarts >= 0,
             f"--plateau-max-restarts must be >= 0 (got {self.plateau_max_restarts})")
        need(self.resume_schedule in RESUME_SCHEDULES,
             f"--resume-schedule must be one of {', '.join(RESUME_SCHEDULES)}")
        for flag, value in (("--save-every", self.save_every), ("--keep-last", self.keep_last),
                            ("--run-epochs", self.run_epochs)):
            need(value is None or value >= 1, f"{flag} must be >= 1 (got {value})")
        self.time_limit_s  # raises a UserError naming --time-limit when malformed or zero
        check_writable_folder("--checkpoint-dir", self.checkpoint_dir)
        if self.cache:
            check_writable_folder("--cache-dir", self.effective_cache_dir)
        for flag, path in (("--resume-from", self.resume_from), ("--pretrained-path", self.pretrained_path)):
            need(path is None or os.path.isfile(path), f"{flag}: no such file: {path}")
        if self.pretrained_path is not None:
            self.pretrained = True
        return self
