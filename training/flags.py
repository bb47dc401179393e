"""The flags of ``train`` (``schedule`` and ``lr-find`` take the same ones), read once into a ``Config``.

Defaults come from ``Config``; the rules that check the values are in ``Config.validate``.
"""

from __future__ import annotations

import argparse

from training.config import AUG_PRESETS, MONITOR_CHOICES, RESUME_SCHEDULES, SCHEDULERS, Config
from core.runtime import AMP_MODES


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
    g.add_argument("--aug", choices=AUG_PRESETS, default=d.aug,
                   help="augmentation strength (Kvasir study, docs/experiments.md: none -0.044 Dice "
                        "vs moderate; light and strong no measured effect)")
    g.add_argument("--num-workers", type=int, default=d.num_workers,
                   help="DataLoader workers (0 = main process), and threads of the start-up file check")
    g.add_argument("--metric-workers", type=int, default=d.metric_workers,
                   help="processes that score validation and the test split (the metrics at each mask's "
                        "resolution) while the model runs; 0 = in the main process (default: --num-workers, at most "
                        "CPUs - 1: validation runs while the training loader's workers are stopped)")
    _bool_flag(g, "--skip-bad-files", "every train/test image and mask is read before training: leave out "
               "unreadable ones and images without mask, named in the log (no: stop)", d.skip_bad_files)
    g.add_argument("--limit-batches", type=int, default=None,
                   help="cap train and validation batches per epoch (quick checks)")
    _bool_flag(g, "--cache", "decode and resize every image and mask once into .npy arrays (in --cache-dir, "
               "reused by later runs on the same files and --img-size) and train from those")
    g.add_argument("--cache-dir", default=d.cache_dir,
                   help="where --cache keeps its arrays (default: ~/.cache/cod_ultimate/arrays)")

    g = p.add_argument_group("model")
    g.add_argument("--backbone", default=d.backbone,
                   help="any timm model with features_only (name or name.tag), e.g. edgenext_base, "
                        "resnet50, pvt_v2_b2, convnext_tiny, swin_tiny_patch4_window7_224, efficientnet_b3, "
                        "mobilenetv4_conv_medium; its stride 4-32 maps feed the decoder "
                        "(docs/backbones.md)")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="start the backbone from random weights (no download)")
    g.add_argument("--pretrained-path", default=None,
                   help="load backbone weights from a local .pth/.safetensors instead of the hub")
    g.add_argument("--num-experts", type=int, default=d.num_experts,
                   help="experts per decoder level (Kvasir study, docs/experiments.md: 4 beat 1 by "
                        "+0.037 Dice; 7 no measured difference from 4)")
    g.add_argument("--moe-top-k", type=int, default=d.moe_top_k,
                   help="experts used per sample (more than --num-experts is capped there, with a note)")
    _bool_flag(g, "--deep-supervision", "add side outputs at three decoder scales to the loss (Kvasir "
               "study: no measured effect)")
    g.add_argument("--decoder-channels", type=int, default=d.decoder_channels)
    g.add_argument("--drop-path", type=float, default=d.drop_path,
                   help="backbone stochastic depth rate (Kvasir study: 0.1 vs 0, no measured effect)")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout before the heads")

    g = p.add_argument_group("loss")
    g.add_argument("--bce-weight", type=float, default=d.bce_weight, help="weighted BCE weight")
    g.add_argument("--iou-weight", type=float, default=d.iou_weight, help="weighted IoU weight")
    g.add_argument("--dice-weight", type=float, default=d.dice_weight,
                   help="Dice weight (Kvasir study: 0.5 and 2 vs 1, no measured effect)")
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
    _bool_flag(g, "--ema", "keep an exponential moving average of the weights and validate with it "
               "(Kvasir study, 10 epochs: no measured effect)")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay)
    _bool_flag(g, "--progressive-unfreeze",
               "in stage 2, unfreeze backbone stages one at a time from the deepest up")
    g.add_argument("--unfreeze-interval", type=int, default=None,
                   help="epochs between unfreeze steps (default: the whole backbone is trainable "
                        "by the middle of stage 2)")

    g = p.add_argument_group("schedule (stepped per optimizer update)")
    g.add_argument("--scheduler", choices=SCHEDULERS, default=d.scheduler,
                   help="LR schedule (Kvasir study: cosine_restart vs cosine, no measured effect)")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="floor of every schedule")
    g.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs,
                   help="linear warm-up from --min-lr at the start of stage 2 (after a resume that "
                        "restarts the schedule inside stage 2: at the resume epoch)")
    g.add_argument("--t-mult", type=int, default=d.t_mult, help="cosine_restart: cycle growth factor")
    g.add_argument("--restart-epochs", type=int, default=None,
                   help="cosine_restart: first cycle length (default: max(1, stage epochs // 4))")
    g.add_argument("--onecycle-pct-start", type=float, default=d.onecycle_pct_start)
    g.add_argument("--onecycle-div-factor", type=float, default=d.onecycle_div_factor)


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
    g.add_argument("--no-curves", dest="curves", action="store_false",
                   help="skip curves.png (drawn after every epoch; needs matplotlib)")
    _bool_flag(g, "--tensorboard", "also write TensorBoard event files (checkpoint dir/tensorboard; needs the "
               "tensorboard package)")


def config_from_args(args: argparse.Namespace) -> Config:
    """The one place a Namespace becomes a Config (the flags that are Config fields)."""
    return Config.from_dict(vars(args)).validate()


def add_guard_arguments(p, d: "Config") -> None:
    """The guards' flags of ``train`` (``d``: the defaults)."""
    g = p.add_argument_group("guards (docs/plateaus.md)")
    _bool_flag(g, "--divergence-guard", "skip steps with a non-finite loss or gradient; roll back to the last "
               "good epoch on repeated ones or on a loss spike, with a lower LR", default=d.divergence_guard)
    g.add_argument("--spike-factor", type=float, default=d.spike_factor,
                   help="a step loss above this x the running median of recent losses rolls back")
    g.add_argument("--lr-backoff", type=float, default=d.lr_backoff,
                   help="each rollback multiplies the LR by this from then on (after a short warm-up); 1: "
                        "retry the epoch at the same LR, without warm-up")
    g.add_argument("--max-rollbacks", type=int, default=d.max_rollbacks,
                   help="stop (keeping the last good checkpoint) after this many rollbacks")
    g.add_argument("--plateau-patience", type=int, default=None,
                   help="stage 2: restart the schedule after N epochs without a better --monitor (off by "
                        "default; Kvasir study: +0.021 Dice, within the seed spread)")
    g.add_argument("--plateau-min-delta", type=float, default=d.plateau_min_delta,
                   help="an improvement smaller than this does not count as one")
    g.add_argument("--plateau-lr-factor", type=float, default=d.plateau_lr_factor,
                   help="the restarted schedule's peak LR = this x the previous peak")
    g.add_argument("--plateau-from", choices=("best", "current"), default=d.plateau_from,
                   help="restart from the best weights (best_model.pth) or the current ones")
    g.add_argument("--plateau-max-restarts", type=int, default=d.plateau_max_restarts)
