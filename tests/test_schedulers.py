"""schedulers/: whole curves against closed forms written independently here (numpy), onecycle
against a real torch OneCycleLR, the plan's step/epoch bookkeeping, and the printouts."""

from __future__ import annotations

import csv
import math
import sys
import warnings

import numpy as np
import pytest
import torch

import schedulers
from schedulers import (KINDS, LRPlan, StagePlan, apply_lr, ascii_plot, build_plan, build_schedule,
                        format_plan, plot_png, write_csv)

ETA, M = 2.5e-4, 1e-6


def curve(schedule) -> np.ndarray:
    return np.array([schedule.lr_at(k) for k in range(schedule.total_steps)])


def close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=0)


# ---- independent closed forms (vectorised) ---------------------------------------------------

def ref_warmup(k, w, eta, m):
    return m + (eta - m) * k / max(w, 1)


def ref_cosine(S, w, eta, m):
    k = np.arange(S, dtype=float)
    cos = m + (eta - m) * (1 + np.cos(np.pi * (k - w) / max(S - w, 1))) / 2
    return np.where(k < w, ref_warmup(k, w, eta, m), cos)


def ref_none(S, w, eta, m):
    k = np.arange(S, dtype=float)
    return np.where(k < w, ref_warmup(k, w, eta, m), eta)


def ref_cosine_restart(S, w, eta, m, first, t):
    lengths, covered = [], 0
    while covered < max(S - w, 0):
        lengths.append(first * t ** len(lengths))
        covered += lengths[-1]
    pos = np.concatenate([np.arange(n) for n in lengths] or [np.zeros(0)])[:max(S - w, 0)]
    length = np.concatenate([np.full(n, n) for n in lengths] or [np.zeros(0)])[:max(S - w, 0)]
    k = np.arange(S, dtype=float)
    after = m + (eta - m) * (1 + np.cos(np.pi * pos / np.maximum(length, 1))) / 2
    return np.concatenate([ref_warmup(k[:min(w, S)], w, eta, m), after])


def torch_onecycle(S, eta, pct, div, m):
    """The LR a real OneCycleLR gives at steps 0..S-1 (stepped after optimizer.step())."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=eta)
    final_div = (eta / div) / m if m > 0 else math.inf
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=eta, total_steps=S, pct_start=float(pct),
                                                div_factor=div, final_div_factor=final_div,
                                                anneal_strategy="cos", three_phase=False,
                                                cycle_momentum=False)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(S):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            if k < S - 1:
                sched.step()
    return np.array(out)


# ---- whole curves ----------------------------------------------------------------------------

@pytest.mark.parametrize("epochs,spe,w", [(10, 7, 0), (10, 7, 21), (4, 3, 1), (1, 1, 0), (3, 5, 15),
                                          (2, 5, 13)])
def test_cosine_and_none_match_closed_form(epochs, spe, w):
    S = epochs * spe
    close(curve(build_schedule("cosine", ETA, M, epochs, spe, warmup_steps=w)), ref_cosine(S, w, ETA, M))
    close(curve(build_schedule("none", ETA, M, epochs, spe, warmup_steps=w)), ref_none(S, w, ETA, M))


@pytest.mark.parametrize("epochs,spe,w,R,t", [(15, 4, 0, 1, 2), (15, 4, 8, 1, 2), (16, 3, 0, 2, 1),
                                              (16, 3, 6, 3, 1), (12, 5, 0, None, 2), (20, 2, 4, None, 3),
                                              (3, 4, 0, None, 2), (2, 3, 6, 1, 2)])
def test_cosine_restart_matches_closed_form(epochs, spe, w, R, t):
    S = epochs * spe
    first = (max(1, epochs // 4) if R is None else R) * spe
    sched = build_schedule("cosine_restart", ETA, M, epochs, spe, warmup_steps=w, restart_epochs=R,
                           t_mult=t)
    close(curve(sched), ref_cosine_restart(S, w, ETA, M, first, t))


ONECYCLE_CASES = [  # (S, pct_start, div_factor, min_lr); none has pct_start * S == 1 (torch divides by 0)
    (1, 0.1, 25.0, M), (2, 0.1, 25.0, M), (2, 1.0, 25.0, M), (3, 0.1, 25.0, M), (3, 0.5, 10.0, M),
    (3, 1.0, 25.0, M), (5, 0.1, 25.0, M), (30, 0.3, 25.0, 1e-7), (97, 0.25, 4.0, 3e-5),
    (100, 0.1, 25.0, 0.0), (200, 0.0, 25.0, M), (64, 0.5, 1.0, M),
]


@pytest.mark.parametrize("S,pct,div,m", ONECYCLE_CASES)
def test_onecycle_matches_torch(S, pct, div, m):
    sched = build_schedule("onecycle", ETA, m, S, 1, onecycle_pct_start=pct, onecycle_div_factor=div)
    ours = curve(sched)
    close(ours, torch_onecycle(S, ETA, pct, div, m))
    if pct < 1.0:
        assert ours[-1] == m  # exactly the floor at the last step
        assert sched.lr_at(S + 10) == m
    if pct * S >= 2:
        close(ours[0], ETA / div)
    if pct * S >= 1 and pct * S == int(pct * S):  # the peak falls on a step
        assert ours.max() == pytest.approx(ETA, rel=1e-12)


@pytest.mark.parametrize("epochs,spe,w", [(10, 3, 6), (4, 5, 2), (5, 10, 30), (2, 1, 1)])
def test_onecycle_warmup_is_its_ramp(epochs, spe, w):
    """With a warm-up of w steps, onecycle is OneCycleLR with pct_start = w / S: the peak is at
    k = w - 1, with no extra ramp before it."""
    S = epochs * spe
    sched = build_schedule("onecycle", ETA, M, epochs, spe, warmup_steps=w, onecycle_pct_start=0.3)
    ours = curve(sched)
    if w >= 2:
        close(ours, torch_onecycle(S, ETA, w / S, 25.0, M))
        close(ours[0], ETA / 25)
    assert ours[w - 1] == pytest.approx(ETA, rel=1e-12) and int(np.argmax(ours)) == w - 1
    assert ours[-1] == M
    d = sched.describe()
    assert d["pct_start"] == w / S and d["peak_step"] == w - 1 and d["warmup_steps"] == w


def test_onecycle_zero_length_phase_takes_its_end_value():
    """torch raises ZeroDivisionError when pct_start * S == 1; we put that one step at the peak."""
    sched = build_schedule("onecycle", ETA, M, 10, 1, onecycle_pct_start=0.1)
    ours = curve(sched)
    assert ours[0] == ETA and ours[-1] == M and np.all(np.diff(ours) < 0)
    one = build_schedule("onecycle", ETA, M, 1, 1, warmup_steps=1)
    assert one.lr_at(0) == ETA


def test_warmup_longer_than_stage_stays_on_the_ramp():
    for kind in ("cosine", "cosine_restart", "none"):
        sched = build_schedule(kind, ETA, M, 2, 5, warmup_steps=15)  # S = 10 < w = 15
        close(curve(sched), M + (ETA - M) * np.arange(10) / 15)
        assert sched.describe()["peak_lr"] == pytest.approx(M + (ETA - M) * 9 / 15)
    oc = curve(build_schedule("onecycle", ETA, M, 2, 5, warmup_steps=15))
    assert np.all(np.diff(oc) > 0) and oc[0] == pytest.approx(ETA / 25) and oc[-1] < ETA


def test_clamp_past_end_and_pure_function():
    for kind in KINDS:
        sched = build_schedule(kind, ETA, M, 6, 4, warmup_steps=4)
        full = curve(sched)
        assert sched.lr_at(24) == sched.lr_at(1000) == full[-1]
        order = np.random.default_rng(0).permutation(24)
        assert [sched.lr_at(int(k)) for k in order] == [full[k] for k in order]
        with pytest.raises(ValueError):
            sched.lr_at(-1)


def test_min_lr_equal_to_base_lr_is_flat():
    for kind in ("cosine", "cosine_restart", "none"):
        close(curve(build_schedule(kind, ETA, ETA, 3, 4, warmup_steps=2)), np.full(12, ETA))


# ---- cosine_restart specifics ----------------------------------------------------------------

@pytest.mark.parametrize("t,w,expected", [(1, 0, [8, 16, 24, 32, 40, 48, 56]), (2, 0, [8, 24, 56]),
                                          (2, 4, [12, 28]), (1, 4, [12, 20, 28, 36, 44, 52])])
def test_restart_positions(t, w, expected):
    sched = build_schedule("cosine_restart", ETA, M, 15, 4, warmup_steps=w, restart_epochs=2, t_mult=t)
    d = sched.describe()
    assert d["restart_steps"] == expected
    lrs = curve(sched)
    starts = [w] + expected
    ends = expected + [60]
    for a, b in zip(starts, ends):
        assert lrs[a] == ETA                           # each cycle starts at the peak
        assert np.all(np.diff(lrs[a:b]) < 0)           # and falls
    for r in expected:                                  # a full cycle ends near the floor
        length = r - starts[starts.index(r) - 1]
        assert lrs[r - 1] - M == pytest.approx((ETA - M) * (1 + math.cos(math.pi * (length - 1) / length)) / 2)
        assert lrs[r - 1] < M + 0.05 * (ETA - M)


def test_restart_default_cycle_for_short_stage():
    sched = build_schedule("cosine_restart", ETA, M, 3, 4, restart_epochs=None, t_mult=2)
    d = sched.describe()
    assert d["restart_epochs"] == 1 and d["cycle_steps"] == [4, 8] and d["restart_steps"] == [4]
    assert build_schedule("cosine_restart", ETA, M, 20, 2).describe()["restart_epochs"] == 5
    assert build_schedule("cosine_restart", ETA, M, 1, 1).describe()["restart_steps"] == []


# ---- parameter groups ------------------------------------------------------------------------

def test_two_param_groups_keep_their_ratio():
    head, backbone = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW([{"params": head.parameters(), "lr_scale": 1.0},
                             {"params": backbone.parameters(), "lr_scale": 0.1}], lr=123.0)
    for g in opt.param_groups:
        g["initial_lr"] = 999.0  # must be ignored
    plan = build_plan("cosine", [
        dict(name="stage1", start_epoch=0, end_epoch=2, steps_per_epoch=3, base_lr=ETA),
        dict(name="stage2", start_epoch=2, end_epoch=5, steps_per_epoch=2, base_lr=2e-4, warmup_steps=2)],
        min_lr=M)
    x = torch.randn(4, 3)
    for step in range(plan.total_steps):
        lr = plan.lr_at(step)
        apply_lr(opt, lr)
        assert opt.param_groups[0]["lr"] == lr
        assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * lr, rel=1e-12)
        opt.zero_grad()
        (head(x).sum() + backbone(x).sum()).backward()
        opt.step()
    stage2, _ = plan.locate(6)
    assert stage2.lr_at(0) == M and opt.param_groups[1]["lr"] == pytest.approx(0.1 * plan.lr_at(11))
    apply_lr(opt, M)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * M)  # the backbone floor is r * m
    assert all(g["initial_lr"] == 999.0 for g in opt.param_groups)


def test_apply_lr_keeps_tensor_lr_a_tensor():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=torch.tensor(0.5))
    apply_lr(opt, 1e-3)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-3)


# ---- the plan ----------------------------------------------------------------------------------

def two_stage_plan(kind="cosine_restart", **kw):
    return build_plan(kind, [
        dict(name="stage1", start_epoch=0, end_epoch=3, steps_per_epoch=5, base_lr=ETA),
        dict(name="stage2", start_epoch=3, end_epoch=7, steps_per_epoch=3, base_lr=2e-4, warmup_steps=3)],
        min_lr=M, restart_epochs=1, t_mult=1, **kw)


def test_plan_locate_and_rows_across_stages():
    plan = two_stage_plan()
    s1, s2 = plan.stages
    assert (s1.index, s2.index) == (0, 1) and plan.total_steps == 15 + 12 == len(list(plan.rows()))
    assert plan.locate(0) == (s1, 0) and plan.locate(14) == (s1, 14)
    assert plan.locate(15) == (s2, 0) and plan.locate(26) == (s2, 11)
    assert plan.locate(40) == (s2, 25) and plan.lr_at(40) == s2.lr_at(11)
    rows = list(plan.rows())
    assert [r[0] for r in rows] == list(range(27))
    assert [r[1] for r in rows] == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 3 + [4] * 3 + [5] * 3 + [6] * 3
    assert [r[2] for r in rows] == ["stage1"] * 15 + ["stage2"] * 12
    assert [r[3] for r in rows] == [plan.lr_at(g) for g in range(27)]
    assert s2.epoch_of(0) == 3 and s2.epoch_of(11) == 6 and s2.epoch_of(99) == 6
    assert s1.restart_epochs() == [1, 2] and s2.restart_epochs() == [5, 6]
    assert plan.restart_steps() == [5, 10, 15 + 6, 15 + 9]
    with pytest.raises(ValueError):
        plan.locate(-1)


def test_build_plan_leaves_out_empty_stage_and_keeps_index():
    plan = build_plan("cosine", [
        dict(name="stage1", start_epoch=0, end_epoch=0, steps_per_epoch=5, base_lr=ETA),
        dict(name="stage2", start_epoch=0, end_epoch=4, steps_per_epoch=2, base_lr=ETA)], min_lr=M)
    assert [(s.name, s.index) for s in plan.stages] == [("stage2", 1)]
    assert plan.locate(0) == (plan.stages[0], 0)


def test_plan_with_a_gap_after_a_restarted_schedule():
    plan = build_plan("cosine", [
        dict(name="stage1", start_epoch=0, end_epoch=2, steps_per_epoch=2, base_lr=ETA),
        dict(name="stage2", start_epoch=5, end_epoch=7, steps_per_epoch=2, base_lr=ETA)], min_lr=M)
    assert [r[1] for r in plan.rows()] == [0, 0, 1, 1, 5, 5, 6, 6]


def test_empty_schedule_and_plan():
    sched = build_schedule("cosine", ETA, M, 0, 10)
    assert sched.total_steps == 0 and sched.describe()["start_lr"] is None
    with pytest.raises(ValueError, match="no steps"):
        sched.lr_at(0)
    plan = LRPlan([])
    assert plan.total_steps == 0 and list(plan.rows()) == []
    with pytest.raises(ValueError, match="no steps"):
        plan.locate(0)
    assert "no" in format_plan(plan) and ascii_plot(plan).count("\n") == 0


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_min_lr_above_base_lr_is_rejected(kind):
    with pytest.raises(ValueError, match="min_lr"):
        build_schedule(kind, 1e-4, 2e-4, 5, 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="step"), "unknown scheduler"),
    (dict(kind="onecycle", min_lr=1e-5), "div_factor"),                 # m >= eta / d
    (dict(kind="onecycle", min_lr=1e-5, onecycle_div_factor=25.0), "min_lr"),
    (dict(kind="onecycle", onecycle_pct_start=1.5), "pct_start"),
    (dict(kind="onecycle", onecycle_div_factor=0.5), "div_factor"),
    (dict(kind="cosine_restart", restart_epochs=0), "restart_epochs"),
    (dict(kind="cosine_restart", t_mult=0), "t_mult"),
    (dict(kind="cosine_restart", t_mult=1.5), "t_mult"),
    (dict(kind="cosine", base_lr=0.0), "base_lr"),
    (dict(kind="cosine", min_lr=-1e-6), "min_lr"),
    (dict(kind="cosine", warmup_steps=-1), "warmup_steps"),
    (dict(kind="cosine", base_lr=float("nan")), "base_lr"),
])
def test_bad_settings_raise_value_error(kwargs, match):
    args = dict(kind="cosine", base_lr=2.5e-4, min_lr=1e-6, stage_epochs=5, steps_per_epoch=3)
    with pytest.raises(ValueError, match=match):
        build_schedule(**{**args, **kwargs})


def test_build_plan_errors_name_the_stage():
    with pytest.raises(ValueError, match="stage2: min_lr"):
        build_plan("cosine", [dict(name="stage2", start_epoch=0, end_epoch=3, steps_per_epoch=2,
                                   base_lr=1e-7)], min_lr=1e-6)
    with pytest.raises(ValueError, match="stage2: steps_per_epoch"):
        build_plan("cosine", [dict(name="stage2", start_epoch=0, end_epoch=3, steps_per_epoch=0,
                                   base_lr=1e-3)], min_lr=1e-6)
    with pytest.raises(ValueError, match="unknown"):
        build_plan("cosine", [dict(name="stage2", start_epoch=0, end_epoch=3, steps_per_epoch=2,
                                   base_lr=1e-3, warmup_epochs=2)], min_lr=1e-6)
    with pytest.raises(ValueError, match="inside"):
        LRPlan([StagePlan("a", 0, 0, 4, 1, build_schedule("none", ETA, M, 4, 1)),
                StagePlan("b", 1, 3, 5, 1, build_schedule("none", ETA, M, 2, 1))])


# ---- printouts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_format_plan_mentions_each_stage(kind):
    text = format_plan(two_stage_plan(kind))
    assert "stage1: epochs 1-3" in text and "stage2: epochs 4-7" in text
    assert "per optimizer update" in text and text.count(f"scheduler {kind}") == 2
    assert "5 updates/epoch" in text and "3 updates/epoch" in text
    assert "warm-up" in text
    if kind == "cosine_restart":
        assert "restarts" in text and "epoch 2" in text


@pytest.mark.parametrize("width,height", [(72, 12), (40, 5), (120, 20)])
def test_ascii_plot_shape(width, height):
    text = ascii_plot(two_stage_plan(), width=width, height=height)
    lines = text.split("\n")
    assert len(lines) == height + 3
    assert all(len(line) <= width for line in lines)
    assert "+" in lines[height] and "r" in lines[height]   # stage boundary and restarts on the axis
    assert lines[-2].split()[0] == "0" and lines[-2].split()[-1] == "26"  # first and last step
    if width >= 72:
        assert "stage2" in lines[-1] and "15" in lines[-2].split()


def test_write_csv(tmp_path):
    plan = two_stage_plan()
    path = tmp_path / "sub" / "lr.csv"
    write_csv(plan, path)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "epoch", "stage", "lr"]
    assert len(rows) == 1 + plan.total_steps
    for (step, epoch, name, lr), got in zip(plan.rows(), rows[1:]):
        assert got == [str(step), str(epoch), name, got[3]] and float(got[3]) == lr  # exact round trip


def test_plot_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "lr.png"
    plot_png(two_stage_plan(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_png_without_matplotlib(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.ticker", "matplotlib.backends",
                 "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        plot_png(two_stage_plan(), tmp_path / "lr.png")


def test_public_api():
    for name in ("KINDS", "Schedule", "WarmupWrapper", "build_schedule", "StagePlan", "LRPlan",
                 "build_plan", "apply_lr", "format_plan", "ascii_plot", "write_csv", "plot_png"):
        assert hasattr(schedulers, name)
    assert KINDS == ("onecycle", "cosine", "cosine_restart", "none")
    d = build_schedule("cosine_restart", ETA, M, 8, 2, warmup_steps=2).describe()
    for key in ("kind", "start_lr", "peak_lr", "end_lr", "warmup_steps", "total_steps", "restart_steps",
                "t_mult", "restart_epochs"):
        assert key in d
    assert d["start_lr"] == M and d["peak_lr"] == ETA and d["total_steps"] == 16
