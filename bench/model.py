#!/usr/bin/env python
"""Parameters and CPU forward+backward time per image of the model variants.

    python bench/model.py [--size 256] [--repeats 5] [--batch 2] [--threads 2] [--num-experts 4]

For edgenext_xx_small and edgenext_base: MoE off (num_experts=1), N experts dense (top_k=N) and
N experts top-2. Each timing is the median over ``--repeats`` forward+backward passes (after one
warm-up pass) of a random batch, in fp32, with deep supervision on and the loss of ``losses/``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from losses import build_loss  # noqa: E402
from models import build_model  # noqa: E402



def time_step(model, loss_fn, x, mask, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        total, _ = loss_fn(model(x), mask)
        total.backward()
        model.zero_grad(set_to_none=True)
        if i:  # the first pass is warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--backbones", nargs="+", default=["edgenext_xx_small", "edgenext_base"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    mask = (torch.rand(args.batch, 1, args.size, args.size) > 0.5).float()
    loss_fn = build_loss()
    print(f"torch {torch.__version__} | {platform.processor() or platform.machine()} | "
          f"{args.threads} threads | batch {args.batch} | {args.size}x{args.size} | fp32 | "
          f"median of {args.repeats} | load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print("| backbone | decoder | params total (M) | decoder+heads (M) | fwd+bwd ms/image |")
    print("| --- | --- | ---: | ---: | ---: |")
    n = args.num_experts
    variants = [("MoE off (num_experts=1)", 1, 1), (f"dense ({n} experts, top_k={n})", n, n),
                (f"top-2 ({n} experts, top_k=2)", n, 2)]
    for backbone in args.backbones:
        for label, experts, k in variants:
            model = build_model(backbone, num_experts=experts, moe_top_k=k, deep_supervision=True,
                                pretrained=False, img_size=args.size).train()
            c = model.param_counts()
            sec = time_step(model, loss_fn, x, mask, args.repeats)
            print(f"| {backbone} | {label} | {c['total'] / 1e6:.2f} | {(c['decoder'] + c['heads']) / 1e6:.3f} "
                  f"| {1000 * sec / args.batch:.0f} |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f} (timings are only comparable on an idle machine)")


if __name__ == "__main__":
    main()
