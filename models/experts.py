"""Mixture-of-experts block of the decoder: expert types, the router and the balance loss.

Each expert maps C -> C channels at the same resolution. The types differ in what they look at:

    dilated   depthwise 3x3 with dilation 2, 4, 6, ... (one per repeat) + 1x1: wide, sparse context
    large     depthwise 7x7 + 1x1: dense large receptive field (texture)
    contrast  x - local 5x5 average, then 1x1 + depthwise 3x3: what differs from its surroundings
    edge      fixed Laplacian and Sobel-x/y depthwise filters, concatenated, then 1x1: edges/high freq.

``num_experts`` experts are made by cycling through the types in that order.

Dispatch is sparse and batched: each expert runs once, on the batch of the samples that picked it
(gathered with ``index_select``), and its output, times the sample's combine weight, is added back
with ``index_add_`` (an expert that got the whole batch skips both); there is no per-sample
Python loop. The expert batch sizes must be known on
the host to allocate those batches, so each MoE block does one host sync (a single ``.tolist()`` of
the per-expert counts, after a sort of the B*k selections by expert). It cannot be batched across
the decoder levels, since each level's routing depends on the one before. With top_k >= E every
expert sees every sample, and the block runs them on the whole batch with no gather and no sync;
under ``torch.compile`` it does the same for any top_k, with zero weights outside the top-k (the
same function, one graph, but no compute saved).

The experts normalise with GroupNorm (per sample), so an expert run on a subset of the batch gives
those samples exactly what it gives them in the whole batch: the sparse dispatch computes the same
function as running every expert on every sample and masking with zero weights (what this block
did before; ``tests/test_experts.py`` keeps that version as the reference). An expert that no sample
picked still runs, on an empty batch, so its parameters get zero gradients rather than none, as
with the masked version (AdamW treats "zero" and "no gradient" differently).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EXPERT_TYPES = ("dilated", "large", "contrast", "edge")


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups: batch-size independent (stage 2 may run batch 1)."""
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def conv_norm_act(cin: int, cout: int, k: int = 3, groups: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation,
                                   groups=groups, bias=False),
                         group_norm(cout), nn.GELU())


class DilatedExpert(nn.Module):
    def __init__(self, c: int, dilation: int = 2):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=dilation, dilation=dilation, groups=c, bias=False)
        self.pw = conv_norm_act(c, c, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


class LargeKernelExpert(nn.Module):
    def __init__(self, c: int, kernel: int = 7):
        super().__init__()
        self.dw = nn.Conv2d(c, c, kernel, padding=kernel // 2, groups=c, bias=False)
        self.pw = conv_norm_act(c, c, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


class ContrastExpert(nn.Module):
    """Feature minus its local mean: camouflage hides in the mean, the object shows in the difference."""

    def __init__(self, c: int, window: int = 5):
        super().__init__()
        self.window = window
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.dw = conv_norm_act(c, c, 3, groups=c)

    def forward(self, x):
        local = F.avg_pool2d(x, self.window, stride=1, padding=self.window // 2, count_include_pad=False)
        return self.dw(self.pw(x - local))


class EdgeExpert(nn.Module):
    """Fixed Laplacian and Sobel filters per channel (buffers, not trained), then a learned 1x1 mix."""

    def __init__(self, c: int):
        super().__init__()
        lap = torch.tensor([[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]])
        sx = torch.tensor([[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]]) / 4
        kernels = torch.stack([lap, sx, sx.t()])                       # 3 x 3 x 3
        self.register_buffer("kernels", kernels.repeat(c, 1, 1).unsqueeze(1), persistent=False)  # 3C x 1 x 3 x 3
        self.c = c
        self.pw = conv_norm_act(3 * c, c, 1)

    def forward(self, x):
        # each input channel feeds 3 output channels: groups=c with 3 filters per group
        edges = F.conv2d(x, self.kernels.to(x.dtype), padding=1, groups=self.c)
        return self.pw(edges)


def make_expert(kind: str, c: int, repeat: int) -> nn.Module:
    if kind == "dilated":
        return DilatedExpert(c, dilation=2 * (repeat + 1))
    if kind == "large":
        return LargeKernelExpert(c)
    if kind == "contrast":
        return ContrastExpert(c)
    if kind == "edge":
        return EdgeExpert(c)
    raise ValueError(f"unknown expert type {kind!r}")


def expert_kinds(num_experts: int) -> list[str]:
    return [EXPERT_TYPES[i % len(EXPERT_TYPES)] for i in range(num_experts)]


def _top_k(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(renormalised weights, selection mask, selected expert indices B x k)."""
    if k >= probs.shape[1]:
        top = torch.arange(probs.shape[1], device=probs.device).expand(probs.shape[0], -1)
        return probs, torch.ones_like(probs), top
    top = probs.topk(k, dim=1).indices
    keep = torch.zeros_like(probs).scatter(1, top, 1.0)
    kept = probs * keep
    return kept / kept.sum(dim=1, keepdim=True).clamp_min(1e-9), keep, top


def top_k_weights(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(renormalised weights, selection mask), both B x E.

    The weights are the softmax renormalised over each sample's top-k, zero elsewhere; gradients
    reach the router through the kept probabilities (and their renormalisation). For k = 1 they
    equal the selection mask and carry no gradient; ``MoEBlock`` then combines with the raw
    probability instead.
    """
    weights, keep, _ = _top_k(probs, k)
    return weights, keep


def load_balance_loss(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Switch/GShard balance loss ``E * sum_e f_e * P_e`` from B x E probabilities and selections.

    f_e: fraction of the batch's top-k selections that went to expert e (selections / (B*k)), no
    gradient; P_e: mean router probability of e, with gradient. It is 1.0 for uniform routing
    (f_e = P_e = 1/E) and E/k when every sample picks the same k experts with probability 1/k each
    (E when k=1 and the router is certain). Batches where samples pick experts against the batch mean
    can score slightly below 1, so 1 is the value to aim at rather than a hard floor. With k = E every
    expert is always selected, f_e = 1/E, and the loss is the constant 1 (nothing to balance).
    """
    f = keep.sum(0) / keep.sum()
    p = probs.mean(0)
    return probs.shape[1] * (f.detach() * p).sum()


class Router(nn.Module):
    """Global average pool -> linear -> softmax over experts (one router per decoder level)."""

    def __init__(self, c: int, num_experts: int):
        super().__init__()
        self.fc = nn.Linear(c, num_experts)
        nn.init.normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):  # route in fp32 under AMP
            return self.fc(x.mean(dim=(2, 3)).float()).softmax(dim=1)


class MoEBlock(nn.Module):
    """``x + sum_{e in top-k} w_e(x) * expert_e(x)``; returns (out, balance loss, usage).

    w (combine weights): for k >= 2 the softmax renormalised over the sample's top-k; for k = 1 the
    raw softmax probability of the chosen expert, as in Switch Transformer. Renormalised over one
    expert the weight would be the constant 1, and the task loss would give the router no gradient
    at all (only the balance loss would train it).

    usage: per expert, the batch mean of its renormalised top-k weight (sums to 1; for top-1
    routing this is the fraction of samples sent to it).
    """

    def __init__(self, c: int, num_experts: int, top_k: int = 2):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = max(1, min(top_k, num_experts))
        self.kinds = expert_kinds(num_experts)
        self.experts = nn.ModuleList(make_expert(kind, c, i // len(EXPERT_TYPES))
                                     for i, kind in enumerate(self.kinds))
        self.router = Router(c, num_experts)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router probabilities, renormalised top-k weights, selection mask), each B x E."""
        probs = self.router(x)
        return (probs, *top_k_weights(probs, self.top_k))

    def forward(self, x: torch.Tensor):
        probs = self.router(x)
        weights, keep, top = _top_k(probs, self.top_k)
        combine = probs * keep if self.top_k == 1 else weights  # k = 1: Switch's raw probability
        if self._use_dense():
            out = self._dense(x, combine)
        else:
            out = self._sparse(x, combine.gather(1, top), top, keep)
        return out, load_balance_loss(probs, keep), weights.detach().mean(0)

    def _use_dense(self) -> bool:
        return self.top_k >= self.num_experts or torch.compiler.is_compiling()

    def _dense(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Every expert on the whole batch, weighted by ``w`` (B x E, zero outside each sample's
        top-k). Used when top_k >= E, and under torch.compile, where the sparse path's
        data-dependent expert batch sizes would break the graph (and inductor 2.14 fails on them)."""
        out = x
        for e, expert in enumerate(self.experts):
            out = out + w[:, e, None, None, None].to(x.dtype) * expert(x)
        return out

    def _sparse(self, x: torch.Tensor, w: torch.Tensor, top: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Each expert on the samples that picked it. ``w``, ``top``: B x k weights and experts;
        ``keep``: B x E selection mask."""
        k = top.shape[1]
        order = top.flatten().argsort(stable=True)  # the B*k selections, grouped by expert
        samples = order // k                         # which sample each selection belongs to
        weights = w.flatten()[order]
        counts = keep.sum(0).long().tolist()  # samples per expert: the one host sync
        out = x.clone()
        for expert, idx, we, n in zip(self.experts, samples.split(counts), weights.split(counts), counts):
            we = we[:, None, None, None]
            if n == x.shape[0]:  # the whole batch, in order (the sort is stable): no gather/scatter
                y = expert(x)
                out.add_((we.to(y.dtype) * y).to(out.dtype))
            else:
                y = expert(x.index_select(0, idx))
                out.index_add_(0, idx, (we.to(y.dtype) * y).to(out.dtype))
        return out


class PlainBlock(nn.Module):
    """What replaces the MoE block when num_experts <= 1: ``x + conv3x3-GN-GELU(x)``."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = conv_norm_act(c, c, 3)

    def forward(self, x: torch.Tensor):
        return x + self.conv(x)
