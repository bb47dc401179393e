"""The ``schedule`` command end to end: its CSV against the LR contract, and training against its CSV.

The contract (docs/schedulers.md) is written out again here, independently of ``schedulers/``, in
numpy (onecycle: a real ``torch.optim.lr_scheduler.OneCycleLR``). Training runs are tiny: CPU,
edgenext_xx_small, 64 px, a few batches.
"""

import csv
import math
import os
import re
import shlex

import numpy as np
import pytest
import torch

import train_ultimate
from training import trainer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = ["--backbone", "edgenext_xx_small", "--no-pretrained", "--img-size", "64", "--num-workers", "0",
        "--no-progress", "--num-experts", "2", "--decoder-channels", "16", "--no-curves"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The runs here are tiny; on a shared 2-core box a second intra-op thread mostly waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, list(reader)


# ---------------------------------------------------------------------------------------------
# the contract, written independently of schedulers/
# ---------------------------------------------------------------------------------------------

def ref_onecycle(S, eta, m, pct, div):
    """A real torch OneCycleLR on a dummy optimizer, read before each of its S steps."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=eta)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=eta, total_steps=S, pct_start=pct, div_factor=div,
        final_div_factor=(eta / div) / m, anneal_strategy="cos", three_phase=False)
    out = []
    for k in range(S):
        out.append(opt.param_groups[0]["lr"])
        if k < S - 1:
            opt.step()
            sched.step()
    return np.array(out)


def ref_stage(kind, S, spe, eta, m, w, R, t, pct, div):
    """Head LR of one stage at k = 0..S-1."""
    if kind == "onecycle":
        return ref_onecycle(S, eta, m, w / S if w else pct, div)
    k = np.arange(S, dtype=np.float64)
    lr = np.empty(S)
    ramp = k < w
    if w:
        lr[ramp] = m + (eta - m) * k[ramp] / w
    j = k[~ramp] - w  # steps since the warm-up ended
    if kind == "none":
        lr[~ramp] = eta
    elif kind == "cosine":
        lr[~ramp] = m + (eta - m) * (1 + np.cos(np.pi * j / (S - w))) / 2
    elif kind == "cosine_restart":
        length = np.full_like(j, R * spe)
        while (j >= length).any():  # move each step into its cycle: R*spe, R*spe*t, ...
            later = j >= length
            j[later] -= length[later]
            length[later] *= t
        lr[~ramp] = m + (eta - m) * (1 + np.cos(np.pi * j / length)) / 2
    else:
        raise AssertionError(kind)
    return lr


CASES = [  # kind, warm-up epochs, extra flags, t_mult, restart_epochs (None = default)
    ("onecycle", 0, [], None, None),
    ("onecycle", 2, [], None, None),
    ("onecycle", 0, ["--onecycle-pct-start", "0.3", "--onecycle-div-factor", "10"], None, None),
    ("cosine", 0, [], None, None),
    ("cosine", 2, [], None, None),
    ("cosine_restart", 0, ["--t-mult", "1"], 1, None),
    ("cosine_restart", 2, ["--t-mult", "1", "--restart-epochs", "2"], 1, 2),
    ("cosine_restart", 0, ["--t-mult", "2", "--restart-epochs", "1"], 2, 1),
    ("cosine_restart", 2, ["--t-mult", "2"], 2, None),
    ("none", 0, [], None, None),
    ("none", 2, [], None, None),
]


@pytest.mark.parametrize("kind,warmup,extra,t,R", CASES,
                         ids=[f"{c[0]}-w{c[1]}-{'-'.join(c[2]) or 'default'}" for c in CASES])
def test_schedule_csv_matches_the_contract(tmp_path, capsys, kind, warmup, extra, t, R):
    spe, E, E1 = 7, 14, 4
    lr1, lr2, m = 3e-4, 5e-4, 2e-6
    out = tmp_path / "plan.csv"
    rc = train_ultimate.main(["schedule", "--scheduler", kind, "--epochs", str(E), "--stage1-epochs",
                              str(E1), "--lr", str(lr1), "--stage2-lr", str(lr2), "--min-lr", str(m),
                              "--warmup-epochs", str(warmup), "--steps-per-epoch", str(spe),
                              "--out", str(out), *extra])
    assert rc == 0
    assert f"wrote {E * spe} rows to {out}" in capsys.readouterr().out

    header, rows = read_csv(out)
    assert header == ["step", "epoch", "stage", "lr"]
    assert len(rows) == E * spe
    steps = [int(r[0]) for r in rows]
    epochs = [int(r[1]) for r in rows]
    stages = [r[2] for r in rows]
    lrs = np.array([float(r[3]) for r in rows])
    assert steps == list(range(E * spe))
    assert epochs == [s // spe for s in steps]  # 0-based global epoch
    assert stages == ["stage1"] * (E1 * spe) + ["stage2"] * ((E - E1) * spe)

    pct = float(extra[extra.index("--onecycle-pct-start") + 1]) if "--onecycle-pct-start" in extra else 0.1
    div = float(extra[extra.index("--onecycle-div-factor") + 1]) if "--onecycle-div-factor" in extra else 25.0
    expected = []
    for eta, epochs_in_stage, w in ((lr1, E1, 0), (lr2, E - E1, warmup * spe)):  # warm-up: stage 2 only
        r = R if R is not None else max(1, epochs_in_stage // 4)
        expected.append(ref_stage(kind, epochs_in_stage * spe, spe, eta, m, w, r, t, pct, div))
    expected = np.concatenate(expected)
    np.testing.assert_allclose(lrs, expected, rtol=1e-6, atol=0)
    # stage 2 starts from its own LR, or from the floor with a warm-up (onecycle: from its base / d)
    first2 = E1 * spe
    if kind != "onecycle":
        assert lrs[first2] == pytest.approx(m if warmup else lr2, rel=1e-6)
    else:  # and onecycle ends each stage at --min-lr
        assert lrs[first2 - 1] == pytest.approx(m, rel=1e-6) and lrs[-1] == pytest.approx(m, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# training applies exactly the LRs that `schedule` prints
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_root(demo):
    # 10 images -> 9 train + 1 val (val split 0.1); batch 2 -> 4 batches, capped at 3 below
    return demo(n_train=10, n_test=2, size=64, seed=0)


@pytest.fixture
def record_steps(monkeypatch):
    """Every AdamW.step: each param group's LR and lr_scale at that moment, and which optimizer."""
    calls = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        calls.append(([float(g["lr"]) for g in self.param_groups],
                      [g.get("lr_scale", 1.0) for g in self.param_groups], id(self)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return calls


@pytest.mark.parametrize("kind,extra", [
    ("cosine", []),
    ("onecycle", ["--backbone-lr-mult", "0.3"]),
])
@pytest.mark.e2e
def test_training_applies_exactly_the_scheduled_lrs(demo_root, tmp_path, record_steps, kind, extra):
    flags = ["--dataset-path", demo_root, "--checkpoint-dir", str(tmp_path / "ckpt"),
             "--scheduler", kind, "--epochs", "4", "--stage1-epochs", "1",
             "--batch-size", "2", "--accumulation-steps", "2", "--limit-batches", "3",  # 3 % 2 != 0
             "--lr", "2e-3", "--stage2-lr", "1e-3", "--min-lr", "1e-5", "--warmup-epochs", "1",
             "--progressive-unfreeze", "--unfreeze-interval", "1", *TINY, *extra]
    out = tmp_path / "plan.csv"
    assert train_ultimate.main(["schedule", *flags, "--out", str(out)]) == 0
    assert not record_steps  # the preview builds no optimizer
    _, rows = read_csv(out)
    planned = [float(r[3]) for r in rows]
    # 3 micro-batches, accumulation 2 -> 2 optimizer steps per epoch (the last one from 1 batch)
    assert len(planned) == 4 * 2

    assert train_ultimate.main(["train", *flags]) == 0
    assert len(record_steps) == len(planned)
    assert len({opt for *_, opt in record_steps}) == 1  # one optimizer for both stages
    with open(tmp_path / "ckpt" / "metrics.csv") as f:  # unfreezing went on while the LR was checked
        assert [r["unfreeze_level"] for r in csv.DictReader(f)] == ["0", "1", "2", "3"]
    mult = 0.3 if extra else 0.1
    for step, ((lrs, scales, _), want) in enumerate(zip(record_steps, planned)):
        assert sorted(set(scales)) == sorted({1.0, mult}), scales
        head = [lr for lr, s in zip(lrs, scales) if s == 1.0]
        assert head and all(math.isclose(lr, want, rel_tol=1e-12, abs_tol=0) for lr in head), (step, head, want)
        for lr, s in zip(lrs, scales):
            assert math.isclose(lr, s * want, rel_tol=1e-12, abs_tol=0), (step, lr, s, want)
    # the curve really moves (so equality above is not trivially one constant)
    assert len({round(x, 12) for x in planned}) >= 5


# ---------------------------------------------------------------------------------------------
# --plot and a bad floor
# ---------------------------------------------------------------------------------------------

def test_plot_writes_a_png(tmp_path, capsys):
    png = tmp_path / "img" / "lr.png"
    assert train_ultimate.main(["schedule", "--scheduler", "cosine_restart", "--epochs", "12",
                                "--stage1-epochs", "4", "--warmup-epochs", "2",
                                "--steps-per-epoch", "5", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in capsys.readouterr().out


def test_warmup_filling_the_stage_leaves_no_restart_cycle(capsys):
    assert train_ultimate.main(["schedule", "--scheduler", "cosine_restart", "--epochs", "3",
                                "--stage1-epochs", "1", "--warmup-epochs", "5",
                                "--steps-per-epoch", "3"]) == 0
    out = capsys.readouterr().out
    assert "no cosine cycle: the warm-up fills the stage" in out
    assert "the LR stays on the ramp" in out


def test_min_lr_above_lr_exits_2_naming_the_flag(tmp_path, capsys):
    out = tmp_path / "never.csv"
    rc = train_ultimate.main(["schedule", "--lr", "1e-4", "--min-lr", "1e-3", "--epochs", "4",
                              "--stage1-epochs", "1", "--steps-per-epoch", "3", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--min-lr" in lines[0], err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# early stopping and LR restarts
# ---------------------------------------------------------------------------------------------

def run_with_one_improvement(monkeypatch, demo_root, tmp_path, flags):
    """Train with validation that improves in the first epoch only (a flat score is scripted; the
    patience bookkeeping in fit() is the code under test). Returns the 1-based epochs that ran."""
    flat = {"loss": 1.0, "sm": 0.5, "wfm": 0.3, "em_mean": 0.5, "em_adp": 0.5, "em_max": 0.5, "fm_mean": 0.3,
            "fm_adp": 0.3, "fm_max": 0.3, "mae": 0.2, "iou": 0.4, "dice": 0.5}
    monkeypatch.setattr(trainer, "validate_epoch", lambda run, loader: dict(flat))
    out = tmp_path / "ckpt"
    assert train_ultimate.main(["train", "--dataset-path", demo_root, "--checkpoint-dir", str(out),
                                "--batch-size", "4", "--limit-batches", "1", "--early-stop-patience",
                                "2", *TINY, *flags]) == 0
    with open(out / "metrics.csv") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


@pytest.mark.e2e
def test_early_stopping_counts_from_each_lr_restart(monkeypatch, demo_root, tmp_path):
    # stage 2 = epochs 2-5 with a restart at the start of epochs 3, 4, 5 (1-epoch cycles): patience 2
    # can never run out, since no two epochs in a row lie in one cycle. Without the reset at
    # restarts it would stop after epoch 3.
    ran = run_with_one_improvement(monkeypatch, demo_root, tmp_path,
                                   ["--epochs", "5", "--stage1-epochs", "1", "--scheduler",
                                    "cosine_restart", "--restart-epochs", "1", "--t-mult", "1"])
    assert ran == [1, 2, 3, 4, 5]


@pytest.mark.e2e
def test_early_stopping_counts_from_stage2_start_and_stops_without_restarts(monkeypatch, demo_root,
                                                                            tmp_path):
    # cosine has no restarts: epoch 2 is the first miss, epoch 3 (stage 2 starts) counts again from
    # 0 -> 1, epoch 4 -> 2 = patience: stop. Without the reset at stage 2 it would stop after epoch 3.
    ran = run_with_one_improvement(monkeypatch, demo_root, tmp_path,
                                   ["--epochs", "6", "--stage1-epochs", "2", "--scheduler", "cosine"])
    assert ran == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# docs/schedulers.md: its commands run, its pasted output is what they print, its plots exist
# ---------------------------------------------------------------------------------------------

def test_the_docs_commands_and_pasted_output(tmp_path, capsys):
    blocks = re.findall(r"```(\w+)\n(.*?)```", open(os.path.join(ROOT, "docs", "schedulers.md")).read(), re.S)
    commands = [i for i, (lang, body) in enumerate(blocks)
                if lang == "bash" and "train_ultimate.py schedule" in body]
    assert len(commands) == 3
    pasted = 0
    for i in commands:
        argv = shlex.split(blocks[i][1].replace("\\\n", " "))
        assert argv[:3] == ["python", "train_ultimate.py", "schedule"]
        png = argv[argv.index("--plot") + 1]
        assert png.startswith("docs/img/") and 0 < os.path.getsize(os.path.join(ROOT, png)) < 150_000
        here = str(tmp_path / os.path.basename(png))
        argv[argv.index("--plot") + 1] = here
        assert train_ultimate.main(argv[2:]) == 0
        out = capsys.readouterr().out
        assert os.path.isfile(here)
        if i + 1 < len(blocks) and blocks[i + 1][0] == "text":
            assert out.replace(here, png).strip() == blocks[i + 1][1].strip()
            pasted += 1
    assert pasted == 1
