#!/usr/bin/env python
"""Median time of one full optimizer step of the COD model against the bare timm backbone.

    python bench/train_step.py [--backbone edgenext_base] [--img-size 384] [--batch-size 16]
        [--device cuda] [--precision {fp32,bf16,fp16}] [--num-experts 7] [--moe-top-k 2]
        [--deep-supervision] [--channels-last] [--compile] [--grad-checkpointing] [--json]

One step is what training does for one batch: forward through the model under autocast, the loss
of ``losses.build_loss`` (defaults), backward (through a GradScaler for fp16), gradient clipping
(``--grad-clip``, 1.0 as in training; 0 = off) and an AdamW step over ``model.param_groups`` built
with every parameter (frozen ones have no gradient and are skipped, as in training). Rows:

    full stage 2   the model as given, everything trainable
    MoE off        the same with num_experts=1 (plain blocks, no router)
    stage 1        the same as "full stage 2" with ``set_backbone_trainable(0)`` (backbone frozen,
                   its norms in eval mode): forward through the backbone, no backward through it
    (--dense-row)  "full stage 2" with every expert run on every sample (the MoE before its
                   sparse dispatch; the same function)
    bare backbone  the timm ``features_only`` backbone alone (``models.encoder.Encoder``: the four
                   maps the decoder uses), loss = sum of the means of its feature maps, AdamW over
                   its parameters

All four are built in one process and timed interleaved (one step of each per round, after
``--warmup`` rounds), so a slow spell of a shared machine hits every row alike; the reported time
is the median over ``--repeats`` rounds, with the min and max. ``ratio`` is the median full
stage-2 step time over the median bare-backbone step time; ``ratio_of_min`` is the same for the
fastest steps, which other jobs on a shared machine disturb least, and ``ratio_cpu`` the ratio of
the median CPU time of the process per step (``time.process_time``: on a CPU run with
``--threads 1``, the work done, nearly independent of other jobs; on CUDA it is host time). On CUDA every timed step is bracketed
by ``torch.cuda.synchronize()``; peak memory is measured in a separate pass afterwards (see
``measure_peak_memory``) and the fraction of peak FLOP/s uses ``models.flops`` (forward FLOPs;
a training step counted as 3x forward for what trains, 1x for a frozen backbone). With ``--json``
exactly one JSON object is printed on stdout and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402

from losses import build_loss  # noqa: E402
from models import build_model  # noqa: E402
from models.encoder import Encoder  # noqa: E402
from models.flops import forward_gflops  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Assumptions, not measurements of this script: dense matmul throughput reachable on an H100 SXM
# (bf16/fp16 ~790 TFLOP/s as measured elsewhere with a large GEMM; fp32 runs convolutions as TF32,
# ~400 TFLOP/s). Pass --peak-tflops for another card.
DEFAULT_PEAK_TFLOPS = {"fp32": 400.0, "bf16": 790.0, "fp16": 790.0}
WEIGHT_DECAY, BACKBONE_LR_MULT, LR = 1e-4, 0.1, 2.5e-4  # training/config.py defaults


@dataclass
class Variant:
    name: str
    model: torch.nn.Module          # what runs (compiled if --compile)
    module: torch.nn.Module         # the underlying nn.Module (parameters, memory)
    optimizer: torch.optim.Optimizer
    loss_fn: object                 # (outputs, mask) -> loss tensor
    train_gflops: float             # per image, forward + backward
    times: list = field(default_factory=list)
    cpu_times: list = field(default_factory=list)
    peak_mem_mb: float | None = None


def project_loss(loss_fn):
    return lambda outputs, mask: loss_fn(outputs, mask)[0]


def bare_loss(feats, mask):
    return sum(f.float().mean() for f in feats)


def make_optimizer(groups, impl: str) -> torch.optim.Optimizer:
    kwargs = {"foreach": True} if impl == "foreach" else {"fused": True} if impl == "fused" else {}
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), **kwargs)


def dense_moe(v: Variant) -> Variant:
    """Every expert on every sample, zero weights outside the top-k: the same function as the
    sparse dispatch, at the cost the MoE blocks had before it (for an A/B in one process)."""
    for block in v.module.decoder.blocks:
        if hasattr(block, "experts"):
            block._use_dense = lambda: True
    return v


def build_variants(args, device) -> list[Variant]:
    loss_fn = project_loss(build_loss())
    common = dict(backbone=args.backbone, deep_supervision=args.deep_supervision, pretrained=False,
                  decoder_channels=args.decoder_channels, img_size=args.img_size)

    def cod(name, num_experts, level):
        torch.manual_seed(args.seed)
        model = build_model(num_experts=num_experts, moe_top_k=args.moe_top_k, **common)
        model.set_backbone_trainable(level)
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return finish(name, model, model.param_groups(WEIGHT_DECAY, BACKBONE_LR_MULT), loss_fn)

    def finish(name, model, groups, fn):
        model = model.to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        return Variant(name, torch.compile(model) if args.compile else model, model,
                       make_optimizer(groups, args.optimizer), fn, 0.0)

    torch.manual_seed(args.seed)
    bare = Encoder(args.backbone, pretrained=False, img_size=args.img_size)
    if args.grad_checkpointing:
        bare.model.set_grad_checkpointing(True)
    variants = [cod("full stage 2", args.num_experts, 99), cod("MoE off", 1, 99),
                cod("stage 1", args.num_experts, 0),
                *([dense_moe(cod("full stage 2, dense MoE", args.num_experts, 99))] if args.dense_row else []),
                finish("bare backbone", bare, [{"params": list(bare.parameters()),
                                                "weight_decay": WEIGHT_DECAY}], bare_loss)]
    # FLOPs per image, counted once on the module in eval mode (models/flops.py)
    fwd = {v.name: forward_gflops(v.module, args.img_size, device) for v in variants}
    for v in variants:
        if v.name == "stage 1":  # the frozen backbone runs forward only
            v.train_gflops = fwd["bare backbone"] + 3 * (fwd[v.name] - fwd["bare backbone"])
        else:
            v.train_gflops = 3 * fwd[v.name]
    return variants


def update(optimizer, params, scaler, grad_clip: float) -> None:
    """The optimizer update as training does it (core/runtime.py ``Runtime.step``): unscale,
    clip, step, update the scale, zero the gradients."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def make_step(v: Variant, x, mask, autocast, scaler, grad_clip: float):
    params = [p for g in v.optimizer.param_groups for p in g["params"]]

    def step():
        with autocast():
            loss = v.loss_fn(v.model(x), mask)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        update(v.optimizer, params, scaler, grad_clip)

    return step


PHASES = ("encoder fwd", "decoder+heads fwd", "loss fwd", "loss bwd", "decoder+heads bwd", "encoder bwd",
          "clip+AdamW")


def breakdown(v: Variant, x, mask, autocast, scaler, grad_clip: float, sync, rounds: int) -> dict:
    """Median ms of each part of one full stage-2 step (eager, even with --compile). The graph is
    cut where that leaves the gradients unchanged: the encoder's features and the model's outputs
    become leaves, and backward runs part by part, each handing its input gradients on; on CUDA
    every part ends with a sync (more syncs than the plain step, so the parts add up to a bit more)."""
    model = v.module
    params = [p for g in v.optimizer.param_groups for p in g["params"]]
    times = {name: [] for name in PHASES}
    for _ in range(rounds):
        marks = []

        def lap():
            sync()
            marks.append(time.perf_counter())

        lap()
        with autocast():
            feats = model.encoder(x)
            lap()
            feats_in = [f.detach().requires_grad_() for f in feats]
            out = model.forward_head(feats_in, x.shape[-2:])
            lap()
            leaf = {k: (t.detach().requires_grad_() if torch.is_tensor(t) and t.requires_grad else t)
                    for k, t in out.items() if k != "aux"}
            leaf["aux"] = [a.detach().requires_grad_() for a in out["aux"]]
            loss = v.loss_fn(leaf, mask)
            lap()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        lap()
        pairs = [(out[k], leaf[k]) for k in ("main", "moe_aux")] + list(zip(out["aux"], leaf["aux"]))
        pairs = [(t, t_leaf.grad) for t, t_leaf in pairs if t.requires_grad and t_leaf.grad is not None]
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        lap()
        torch.autograd.backward(feats, [f.grad for f in feats_in])
        lap()
        update(v.optimizer, params, scaler, grad_clip)
        lap()
        for name, t0, t1 in zip(PHASES, marks, marks[1:]):
            times[name].append(t1 - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def profile_table(step, device, rows: int = 25) -> str:
    """torch.profiler table of 3 steps, sorted by self time on the device that runs them."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def measure_peak_memory(v: Variant, step, device) -> float:
    """MiB this variant would peak at alone: its parameters, buffers and optimizer state, plus the
    most the step allocates above what was allocated when it started (the other variants' memory
    and the shared input batch are not counted)."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    resident = tensor_bytes(v.module.parameters()) + tensor_bytes(v.module.buffers()) + tensor_bytes(
        t for state in v.optimizer.state.values() for t in state.values())
    return (resident + torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def run(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.precision]
    variants = build_variants(args, device)
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    mask = (torch.rand(args.batch_size, 1, args.img_size, args.img_size, device=device) > 0.5).float()
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    steps = []
    for v in variants:
        scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
        steps.append(make_step(v, x, mask, autocast, scaler, args.grad_clip))
    for _ in range(args.warmup):
        for step in steps:
            step()
    for _ in range(args.repeats):  # interleaved: one step of every variant per round
        for v, step in zip(variants, steps):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            sync()
            v.times.append(time.perf_counter() - t0)
            v.cpu_times.append(time.process_time() - c0)
    if cuda:
        for v, step in zip(variants, steps):
            v.peak_mem_mb = measure_peak_memory(v, step, device)
    parts = None
    if args.breakdown:
        full_scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
        parts = breakdown(variants[0], x, mask, autocast, full_scaler, args.grad_clip, sync, args.repeats)
    if args.profile:
        print(profile_table(steps[0], device), file=sys.stderr)

    bare = variants[-1]
    peak = args.peak_tflops or DEFAULT_PEAK_TFLOPS[args.precision]
    rows = []
    for v in variants:
        med = statistics.median(v.times)
        row = {"name": v.name, "ms_per_step": 1000 * med, "ms_min": 1000 * min(v.times),
               "ms_max": 1000 * max(v.times), "img_per_s": args.batch_size / med,
               "ratio_to_bare": med / statistics.median(bare.times),
               "cpu_ms_per_step": 1000 * statistics.median(v.cpu_times),
               "peak_mem_mb": v.peak_mem_mb, "train_gflops_per_img": v.train_gflops,
               "trainable_params": sum(p.numel() for p in v.module.parameters() if p.requires_grad),
               "peak_flops_fraction": (v.train_gflops * 1e9 * args.batch_size / med / (peak * 1e12)
                                       if cuda else None)}
        rows.append(row)
    full = variants[0]
    per_round = [f / b for f, b in zip(full.times, bare.times)]
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    settings.update(peak_tflops=peak if cuda else None, torch=torch.__version__, timm=timm.__version__,
                    device_name=torch.cuda.get_device_name(device) if cuda else
                    (platform.processor() or platform.machine()),
                    threads=torch.get_num_threads(), load_avg_end=os.getloadavg()[0])
    return {"ratio": statistics.median(full.times) / statistics.median(bare.times),
            "ratio_of_min": min(full.times) / min(bare.times),
            "ratio_cpu": statistics.median(full.cpu_times) / statistics.median(bare.cpu_times),
            "ratio_per_round_min": min(per_round), "ratio_per_round_max": max(per_round),
            "rows": rows, "breakdown": parts, "settings": settings}


def print_table(result: dict) -> None:
    s = result["settings"]
    print(f"{s['backbone']} | {s['img_size']} px | batch {s['batch_size']} | {s['precision']} | "
          f"{s['num_experts']} experts, top-{s['moe_top_k']} | deep supervision {s['deep_supervision']} | "
          f"{s['device']} ({s['device_name']}, {s['threads']} threads) | torch {s['torch']} | "
          f"median of {s['repeats']} interleaved rounds")
    print("| row | img/s | ms/step (min-max) | ratio to bare | peak memory (MiB) | % of peak FLOP/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in result["rows"]:
        mem = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        frac = "n/a" if r["peak_flops_fraction"] is None else f"{100 * r['peak_flops_fraction']:.1f}"
        print(f"| {r['name']} | {r['img_per_s']:.1f} | {r['ms_per_step']:.1f} ({r['ms_min']:.1f}-"
              f"{r['ms_max']:.1f}) | {r['ratio_to_bare']:.2f} | {mem} | {frac} |")
    print(f"ratio (full stage 2 / bare backbone): {result['ratio']:.2f} (per round "
          f"{result['ratio_per_round_min']:.2f}-{result['ratio_per_round_max']:.2f}; of the fastest steps "
          f"{result['ratio_of_min']:.2f}; of CPU time {result['ratio_cpu']:.2f}); "
          f"load average at the end {s['load_avg_end']:.2f}")
    if result["breakdown"]:
        parts = result["breakdown"]
        total = sum(parts.values())
        print("full stage 2 by part (median ms): " + ", ".join(
            f"{k} {v:.1f} ({100 * v / total:.0f}%)" for k, v in parts.items()) + f"; sum {total:.1f}")
    if s["peak_tflops"]:
        print(f"% of peak assumes {s['peak_tflops']:.0f} TFLOP/s ({s['precision']}); FLOPs from "
              "models/flops.py, a training step counted as 3x forward")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="edgenext_base")
    p.add_argument("--img-size", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--num-experts", type=int, default=7)
    p.add_argument("--moe-top-k", type=int, default=2)
    p.add_argument("--deep-supervision", action="store_true")
    p.add_argument("--decoder-channels", type=int, default=64)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (not the loss)")
    p.add_argument("--grad-checkpointing", action="store_true", help="timm's, in the backbone")
    p.add_argument("--optimizer", choices=("default", "foreach", "fused"), default="default",
                   help="AdamW implementation; 'default' is what training/trainer.py builds")
    p.add_argument("--grad-clip", type=float, default=1.0, help="as training's --grad-clip; 0 = off")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's default")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="assumed peak TFLOP/s for the FLOP fraction (CUDA only); default: "
                        + ", ".join(f"{k} {v:.0f}" for k, v in DEFAULT_PEAK_TFLOPS.items())
                        + " (H100 assumptions)")
    p.add_argument("--dense-row", action="store_true",
                   help="add a row: full stage 2 with the MoE blocks forced to their dense path "
                        "(every expert on every sample, as before the sparse dispatch)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the parts of the full stage-2 step (encoder, decoder+heads, loss, "
                        "each forward and backward, clip+AdamW)")
    p.add_argument("--profile", action="store_true",
                   help="print a torch.profiler table of 3 full stage-2 steps on stderr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> None:
    emit(parse_args(argv), run, print_table)


if __name__ == "__main__":
    main()
