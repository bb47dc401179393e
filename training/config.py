"""The run configuration: argparse is read once into this dataclass, validated, saved as plain data.

Nothing below the command line sees an ``argparse.Namespace``. ``Config.to_dict()`` is what goes into
``config.json`` and into every checkpoint (plain types only, so ``torch.load(weights_only=True)``
reads it back).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Optional

from data.discovery import DEFAULT_SEED
from errors import UserError
from evaluation.metrics import DEFAULT_THRESHOLD
from models.spec import DEFAULT_IMG_SIZE, ModelSpec, check_img_size
from training.runtime import AMP_MODES

SCHEDULERS = ("onecycle", "cosine", "cosine_restart", "none")
AUG_PRESETS = ("none", "light", "moderate", "strong")
MONITOR_CHOICES = ("iou", "dice", "sm", "wfm", "em", "mae", "loss")
RESUME_SCHEDULES = ("auto", "continue", "restart")


def parse_duration(text: str) -> float:
    """'8h30m', '45m', '90s', '1.5h', '1h2m3s' -> seconds. A bare number is refused (which unit?)."""
    m = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*",
                     str(text))
    if not m or not any(m.groups()) or not str(text).strip():
        raise UserError(f"--time-limit {text!r}: write a duration with units, e.g. 8h30m, 45m or 90s")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


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

    # ---- derived values (never stored separately, so they cannot disagree with the flags) ----
    @property
    def stage2_lr_value(self) -> float:
        return self.lr if self.stage2_lr is None else self.stage2_lr

    @property
    def stage2_batch_size_value(self) -> int:
        return self.batch_size if self.stage2_batch_size is None else self.stage2_batch_size

    @property
    def stage2_epochs(self) -> int:
        return self.epochs - self.stage1_epochs

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

    def validate(self) -> "Config":
        """Reject bad values with the flag's name and what is allowed."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UserError(msg)

        need(self.epochs >= 1, f"--epochs must be >= 1 (got {self.epochs})")
        need(0 <= self.stage1_epochs <= self.epochs,
             f"--stage1-epochs must be between 0 and --epochs ({self.epochs}), got {self.stage1_epochs}")
        check_img_size(self.img_size)
        self.model_spec.validate()
        need(self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size})")
        need(self.stage2_batch_size_value >= 1,
             f"--stage2-batch-size must be >= 1 (got {self.stage2_batch_size})")
        need(self.accumulation_steps >= 1,
             f"--accumulation-steps must be >= 1 (got {self.accumulation_steps})")
        need(self.lr > 0, f"--lr must be > 0 (got {self.lr})")
        need(self.stage2_lr_value > 0, f"--stage2-lr must be > 0 (got {self.stage2_lr})")
        need(self.min_lr >= 0, f"--min-lr must be >= 0 (got {self.min_lr})")
        for flag, eta in (("--lr", self.lr), ("--stage2-lr", self.stage2_lr_value)):
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
        need(0.0 <= self.val_split < 1.0, f"--val-split must be in [0, 1) (got {self.val_split})")
        need(self.num_workers >= 0, f"--num-workers must be >= 0 (got {self.num_workers})")
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
        need(0.0 < self.lr_backoff < 1.0, f"--lr-backoff must be in (0, 1), e.g. 0.7 (got {self.lr_backoff})")
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
        if self.time_limit is not None:
            self.time_limit_s  # raises a UserError naming --time-limit when malformed
        for flag, path in (("--resume-from", self.resume_from), ("--pretrained-path", self.pretrained_path)):
            need(path is None or os.path.isfile(path), f"{flag}: no such file: {path}")
        if self.pretrained_path is not None:
            self.pretrained = True
        return self


def _bool_flag(parser, name: str, help: str, default: bool = False) -> None:
    parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=help)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Every flag of ``train`` (``schedule`` takes the same ones). Defaults come from ``Config``."""
    d = Config()
    g = p.add_argument_group("data")
    g.add_argument("--dataset-path", default=d.dataset_path,
                   help="COD10K-v3 root, SINet-style root (TrainDataset/TestDataset), or 'demo' "
                        "for the built-in generated camouflage data (default: demo)")
    g.add_argument("--checkpoint-dir", default=d.checkpoint_dir,
                   help="where best_model.pth, last.pth, metrics.csv and config.json go")
    g.add_argument("--img-size", type=int, default=d.img_size, help="square training size in px")
    g.add_argument("--val-split", type=float, default=d.val_split,
                   help="fraction of the training images held out for validation (seeded)")
    _bool_flag(g, "--val-on-test", "validate on the test split instead of a held-out split "
               "(the test set then no longer measures generalisation)")
    _bool_flag(g, "--include-noncam", "COD10K: also train on the NonCAM images (empty masks)")
    g.add_argument("--aug", choices=AUG_PRESETS, default=d.aug, help="augmentation strength")
    g.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader workers (0 = main process)")
    g.add_argument("--limit-batches", type=int, default=None,
                   help="cap train and validation batches per epoch (quick checks)")

    g = p.add_argument_group("model")
    g.add_argument("--backbone", default=d.backbone, help="any timm edgenext_* model")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="start the backbone from random weights (no download)")
    g.add_argument("--pretrained-path", default=None,
                   help="load backbone weights from a local .pth/.safetensors instead of the hub")
    g.add_argument("--num-experts", type=int, default=d.num_experts, help="experts per decoder level")
    g.add_argument("--moe-top-k", type=int, default=d.moe_top_k, help="experts used per sample")
    _bool_flag(g, "--deep-supervision", "add side outputs at three decoder scales to the loss")
    g.add_argument("--decoder-channels", type=int, default=d.decoder_channels)
    g.add_argument("--drop-path", type=float, default=d.drop_path, help="backbone stochastic depth rate")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout before the heads")

    g = p.add_argument_group("loss")
    g.add_argument("--bce-weight", type=float, default=d.bce_weight, help="weighted BCE weight")
    g.add_argument("--iou-weight", type=float, default=d.iou_weight, help="weighted IoU weight")
    g.add_argument("--dice-weight", type=float, default=d.dice_weight, help="Dice weight")
    g.add_argument("--moe-aux-weight", type=float, default=d.moe_aux_weight,
                   help="weight of the experts' load-balancing loss")
    g.add_argument("--ds-weights", type=float, nargs=3, default=list(d.ds_weights),
                   metavar=("W1", "W2", "W3"), help="deep-supervision weights, finest scale first")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help="total epochs, both stages")
    g.add_argument("--stage1-epochs", type=int, default=d.stage1_epochs,
                   help="epochs of stage 1 (backbone frozen)")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--stage2-batch-size", type=int, default=None, help="default: --batch-size")
    g.add_argument("--accumulation-steps", type=int, default=d.accumulation_steps,
                   help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=d.lr, help="stage-1 peak LR of the decoder/heads")
    g.add_argument("--stage2-lr", type=float, default=None, help="stage-2 peak LR (default: --lr)")
    g.add_argument("--backbone-lr-mult", type=float, default=d.backbone_lr_mult,
                   help="backbone LR = this x the head LR, at every step")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay (not applied to norms and biases)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max grad norm, 0 = off")
    g.add_argument("--amp", choices=AMP_MODES, default=d.amp,
                   help="mixed precision: auto = bf16 if the GPU supports it else fp16; off on CPU")
    _bool_flag(g, "--ema", "keep an exponential moving average of the weights and validate with it")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay)
    _bool_flag(g, "--progressive-unfreeze",
               "in stage 2, unfreeze backbone stages one at a time from the deepest up")
    g.add_argument("--unfreeze-interval", type=int, default=None,
                   help="epochs between unfreeze steps (default: the whole backbone is trainable "
                        "by the middle of stage 2)")

    g = p.add_argument_group("schedule (stepped per optimizer update)")
    g.add_argument("--scheduler", choices=SCHEDULERS, default=d.scheduler)
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="floor of every schedule")
    g.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs,
                   help="linear warm-up from --min-lr at the start of stage 2")
    g.add_argument("--t-mult", type=int, default=d.t_mult, help="cosine_restart: cycle growth factor")
    g.add_argument("--restart-epochs", type=int, default=None,
                   help="cosine_restart: first cycle length (default: max(1, stage epochs // 4))")
    g.add_argument("--onecycle-pct-start", type=float, default=d.onecycle_pct_start)
    g.add_argument("--onecycle-div-factor", type=float, default=d.onecycle_div_factor)

    from training.guards import add_guard_arguments

    add_guard_arguments(p, d)

    g = p.add_argument_group("run control")
    g.add_argument("--monitor", choices=MONITOR_CHOICES, default=d.monitor,
                   help="validation metric that picks best_model.pth")
    g.add_argument("--early-stop-patience", type=int, default=None,
                   help="stop after N epochs without improvement (off by default)")
    g.add_argument("--resume-from", default=None, help="checkpoint to resume from (last.pth or best_model.pth)")
    g.add_argument("--resume-schedule", choices=RESUME_SCHEDULES, default=d.resume_schedule,
                   help="on resume: continue the saved LR schedule, or restart a fresh one from the "
                        "resume epoch (auto: restart exactly when schedule flags changed)")
    _bool_flag(g, "--skip-stage1", "go straight to stage 2")
    _bool_flag(g, "--overwrite", "start a fresh run in a --checkpoint-dir that holds one: its files are "
               "moved into a previous-<time>/ subfolder, not deleted")
    g.add_argument("--save-every", type=int, default=None,
                   help="also keep a copy of the checkpoint every N epochs (epoch_NNNN.pth)")
    g.add_argument("--keep-last", type=int, default=None,
                   help="keep only the K newest periodic copies (default: all)")
    g.add_argument("--run-epochs", type=int, default=None,
                   help="train at most N epochs in this invocation, then save and print how to go on")
    g.add_argument("--time-limit", default=None,
                   help="stop cleanly after the last epoch that fits in this wall time, e.g. 8h30m")
    g.add_argument("--device", default=d.device, help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--threshold", type=float, default=d.threshold, help="binarisation threshold for IoU/Dice")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def config_from_args(args: argparse.Namespace) -> Config:
    """The one place a Namespace becomes a Config."""
    names = {f.name for f in dataclasses.fields(Config)}
    kwargs = {k: v for k, v in vars(args).items() if k in names}
    if "ds_weights" in kwargs:
        kwargs["ds_weights"] = tuple(kwargs["ds_weights"])
    return Config(**kwargs).validate()
