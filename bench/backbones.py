#!/usr/bin/env python
"""Per backbone: parameters, forward GFLOPs and timm's pretrained tags (the table of docs/backbones.md).

    python bench/backbones.py [--img-size 384] [--backbones edgenext_small resnet18 ...]

Each model is ``build_model(backbone, pretrained=False, img_size=...)`` with the default decoder (4
experts, top-2, no deep supervision); GFLOPs of one image are counted by ``models.flops`` (torch's
FlopCounterMode, 2 per multiply-add) for the backbone alone and for the whole model. Tags are
``timm.list_models(name, pretrained=True)``. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402

from models import build_model  # noqa: E402
from models.flops import forward_gflops  # noqa: E402

DEFAULT_BACKBONES = ["edgenext_small", "resnet18", "res2net50_26w_4s", "pvt_v2_b1", "convnext_femto",
                     "swin_tiny_patch4_window7_224", "efficientnet_b0", "mobilenetv3_large_100",
                     "mobilenetv4_conv_small"]


def row(backbone: str, img_size: int) -> str:
    torch.manual_seed(0)
    model = build_model(backbone, pretrained=False, img_size=img_size).eval()
    counts = model.param_counts()
    enc = model.encoder
    tags = [t.partition(".")[2] for t in timm.list_models(backbone, pretrained=True)]
    return (f"| {backbone} | {'NHWC' if enc.nhwc else 'NCHW'} | {', '.join(map(str, enc.channels))} | "
            f"{counts['backbone'] / 1e6:.1f} | {counts['total'] / 1e6:.1f} | "
            f"{forward_gflops(enc, img_size):.1f} | {forward_gflops(model, img_size):.1f} | "
            f"{', '.join(tags) or 'none'} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--img-size", type=int, default=384)
    p.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES)
    args = p.parse_args(argv)
    print(f"timm {timm.__version__} | torch {torch.__version__} | {args.img_size} px | default decoder")
    print("| backbone | layout | channels (strides 4-32) | backbone params (M) | model params (M) | "
          "backbone GFLOPs | model GFLOPs | pretrained tags |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    for backbone in args.backbones:
        print(row(backbone, args.img_size), flush=True)


if __name__ == "__main__":
    main()
