"""Multi-process training through torch.distributed (gloo on the CPU), as torchrun runs it.

- one optimizer step on 2 processes x 2 images (one image per micro-batch, accumulation 2) all-reduces
  the gradients once, on the last micro-batch (DDP's ``no_sync`` before it, counted by a comm hook),
  equals one step on 1 process x 4 images, and leaves identical weights on both;
- validation over 2 processes (each its own shard) equals validation in 1;
- ``torchrun --nproc_per_node 2 train_ultimate.py train ...`` runs both stages with progressive
  unfreeze, shuffles each epoch anew (``set_epoch``) into one order shared out between the
  processes, writes each epoch once, the same ``metrics.csv`` as 1 process with twice the batch,
  and its checkpoint resumes in a single process;
- SIGTERM to one process stops both at the same step, with one ``last.pth``; SIGTERM to torchrun
  prints one line to go on, a torchrun command.
"""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import train_ultimate
from tests.helpers import REPO, rows
from core import checkpoint as ckpt
from training import build, loop
from training.config import Config
from core.runtime import DistributedRuntime, Runtime
from training.build import load_data, make_loader, seed_everything

pytestmark = pytest.mark.e2e  # several processes each: torchrun, or spawned as torchrun would
TINY = ["--backbone", "edgenext_xx_small", "--no-pretrained", "--img-size", "64", "--device", "cpu",
        "--num-workers", "0", "--no-progress", "--num-experts", "3", "--no-curves"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(rank: int, world: int, port: int) -> dict:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


@pytest.fixture(scope="module")
def root(demo):
    return demo(n_train=24, n_test=2, size=64, seed=5)


# ---- the step and validation, process by process -----------------------------------------------

def step_and_validate(rt: Runtime, root: str) -> dict:
    """Validate the initial model, then one stage-2 optimizer step over the same 4 images: this
    process takes its share, one image per micro-batch."""
    torch.set_num_threads(1)
    cfg = Config(dataset_path=root, backbone="edgenext_xx_small", pretrained=False, img_size=64,
                 num_experts=3, moe_aux_weight=0.0, num_workers=0, progress=False, aug="none",
                 device="cpu", amp="off", val_split=0.3, accumulation_steps=2).validate()
    seed_everything(0)
    run = build.build_run(cfg, rt)
    _, _, val = load_data(cfg)
    metrics = loop.validate(cfg, rt, run.net, run.loss_fn, make_loader(cfg, rt, val, 2, train=False))

    run.net.set_backbone_trainable(run.net.num_backbone_stages + 1)
    run.model = rt.wrap(run.net)
    run.model.train()
    micro, synced = [0], []  # the micro-batch of each gradient bucket DDP all-reduces
    if isinstance(run.model, DistributedDataParallel):
        def counting_allreduce(state, bucket):
            synced.append(micro[0])
            return default_hooks.allreduce_hook(state, bucket)

        run.model.register_comm_hook(None, counting_allreduce)
    gen = torch.Generator().manual_seed(1)
    images, masks = torch.randn(4, 3, 64, 64, generator=gen), (torch.rand(4, 1, 64, 64, generator=gen) > 0.5).float()
    mine = range(rt.rank * 4 // rt.world_size, (rt.rank + 1) * 4 // rt.world_size)
    for j, i in enumerate(mine):
        micro[0] = j
        with rt.accumulating(run.model, sync=j == len(mine) - 1):
            loss, _ = run.loss_fn(run.model(images[i:i + 1]), masks[i:i + 1])
            rt.backward(loss / len(mine))
    grads = {n: p.grad.clone() for n, p in run.net.named_parameters() if p.grad is not None}
    loop.optimizer_step(run, torch.tensor(0.5))
    return {"val": metrics, "grads": grads, "weights": {k: v.clone() for k, v in run.net.state_dict().items()},
            "synced": synced}


def _rank_main(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(dist_env(rank, world, port))
    rt = DistributedRuntime("cpu", "off")
    try:
        torch.save(step_and_validate(rt, root), os.path.join(out, f"rank{rank}.pt"))
    finally:
        rt.close()


def test_two_processes_step_and_validate_like_one(root, tmp_path):
    mp.spawn(_rank_main, args=(2, free_port(), root, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = step_and_validate(Runtime("cpu", "off"), root)

    for r in ranks:  # one gradient reduction for the step, on its last micro-batch (no_sync before it)
        assert r["synced"] and set(r["synced"]) == {1}, r["synced"]
    for key, value in ranks[0]["weights"].items():  # DDP: the same update on every process
        assert torch.equal(value, ranks[1]["weights"][key]), key
    assert single["grads"].keys() == ranks[0]["grads"].keys()
    for name, g in single["grads"].items():  # the reduced gradient of 2 x 2 images is that of 4
        torch.testing.assert_close(ranks[0]["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)
    for key, value in single["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][key], value, rtol=0, atol=1e-6, msg=key)
    assert ranks[0]["val"] == ranks[1]["val"]  # both processes hold the merged result
    assert ranks[0]["val"].keys() == single["val"].keys()
    for key, value in single["val"].items():
        assert ranks[0]["val"][key] == pytest.approx(value, abs=1e-6), key


# ---- the command line under torchrun -------------------------------------------------------------

ORDER_DRIVER = """
import json, os, sys
sys.path.insert(0, {repo!r})
from torch.utils.data import DistributedSampler
import train_ultimate

real_iter = DistributedSampler.__iter__


def recording_iter(self):  # each pass over the training images: this process's indices, one line a pass
    indices = list(real_iter(self))
    with open(os.path.join({out!r}, "order-rank" + os.environ["RANK"] + ".jsonl"), "a") as f:
        f.write(json.dumps(indices) + "\\n")
    return iter(indices)


DistributedSampler.__iter__ = recording_iter
if __name__ == "__main__":
    sys.exit(train_ultimate.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def small(demo):
    """8 training images and 2 validation images (--val-split 0.2): one optimizer step an epoch sees them all."""
    return demo(n_train=10, n_test=2, size=64, seed=5)


def assert_same_metrics(ddp: list, one: list) -> None:
    """metrics.csv of the 2-process run against the 1-process run. The schedule columns are equal.
    Losses and expert usage (continuous in the weights) to 1e-4 relative: measured, they differ in
    the 6th digit (summation order; metrics.csv keeps 6). The validation metrics to 2e-3: most sweep
    256 thresholds, and a pixel whose probability moves across one by float noise (1 validation
    image a process against 2 in one batch) moves them by a step: measured up to 3e-4 (val_fm_max)."""
    assert len(ddp) == len(one) and [r.keys() for r in ddp] == [r.keys() for r in one]
    for a, b in zip(ddp, one):
        for key in a:
            if key in ("epoch", "stage", "unfreeze_level", "lr"):
                assert a[key] == b[key], (a["epoch"], key)
            elif key.startswith("val_") and key != "val_loss":
                assert float(a[key]) == pytest.approx(float(b[key]), abs=2e-3), (a["epoch"], key)
            else:
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6), (a["epoch"], key)


def test_torchrun_trains_like_one_process_and_resumes_in_one(small, tmp_path):
    """2 processes x batch 2 x accumulation 2 against 1 process x batch 4 x accumulation 2: 8 images a
    step, the whole training set, so both runs take each step over the same images, and the
    gradient test says those steps agree. Augmentation off (each process draws its own) and no MoE
    balance loss (it depends on which images share a batch)."""
    common = ["train", "--dataset-path", small, *TINY, "--epochs", "3", "--stage1-epochs", "1", "--progressive-unfreeze",
              "--unfreeze-interval", "1", "--val-split", "0.2", "--aug", "none", "--moe-aux-weight", "0",
              "--scheduler", "cosine", "--lr", "1e-3", "--min-lr", "1e-5", "--accumulation-steps", "2", "--ema",
              "--cache", "--cache-dir", str(tmp_path / "arrays")]  # the main process builds, the other waits
    out, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    args = [*common, "--batch-size", "2", "--checkpoint-dir", out]
    driver = tmp_path / "driver.py"
    driver.write_text(ORDER_DRIVER.format(repo=REPO, out=str(tmp_path)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert "world size 2" in text and "= 8 images per optimizer step" in text
    assert text.count("Epoch 2/3") == 1  # one process logs
    assert text.count("Cache: built") == 2 and len(os.listdir(tmp_path / "arrays")) == 2  # train and val
    got = rows(out)
    assert [r["epoch"] for r in got] == ["1", "2", "3"]
    assert [r["unfreeze_level"] for r in got] == ["0", "1", "2"]

    # each epoch: one shuffled order of the 8 images, shared out between the processes as
    # DistributedSampler does for that epoch (DataLoader.set_epoch), so it changes every epoch
    passes = [[json.loads(line) for line in open(tmp_path / f"order-rank{r}.jsonl")] for r in range(2)]
    assert len(passes[0]) == len(passes[1]) == 3
    orders = []
    for epoch, stage in enumerate([0, 1, 1]):
        expected = []
        for r in range(2):
            sampler = DistributedSampler(range(8), 2, r, shuffle=True, seed=42 + stage, drop_last=True)
            sampler.set_epoch(epoch)
            expected.append(list(sampler))
        assert [passes[0][epoch], passes[1][epoch]] == expected, epoch
        orders.append([i for pair in zip(*expected) for i in pair])
        assert sorted(orders[-1]) == list(range(8))  # both processes' shares: every image once
    assert orders[1] != orders[2]  # one stage, one loader: only set_epoch tells the epochs apart

    assert train_ultimate.main([*common, "--batch-size", "4", "--checkpoint-dir", single]) == 0
    assert_same_metrics(got, rows(single))
    saved = ckpt.load(os.path.join(out, "last.pth"))
    assert saved["world_size"] == 2 and len(saved["rng_ranks"]) == 2
    # the same checkpoint goes on in one process
    assert train_ultimate.main([*args, "--epochs", "4", "--resume-from", os.path.join(out, "last.pth"),
                                "--resume-schedule", "continue"]) == 0
    got = rows(out)
    assert [r["epoch"] for r in got] == ["1", "2", "3", "4"]
    assert [r["unfreeze_level"] for r in got][-1] == "3"


def test_sigterm_to_one_process_stops_both_at_the_same_step(root, signal_driver, tmp_path):
    out, marker, port = str(tmp_path / "killed"), str(tmp_path / "marker"), free_port()
    args = [sys.executable, signal_driver, "train", "--dataset-path", root, "--checkpoint-dir", out, *TINY,
            "--epochs", "2", "--stage1-epochs", "1", "--limit-batches", "3", "--batch-size", "2"]
    procs = []
    for rank in range(2):
        env = {**os.environ, **dist_env(rank, 2, port), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("SIGNAL_MARKER", None)
        if rank == 1:
            env["SIGNAL_MARKER"] = marker  # rank 1 waits in its first update for the signal
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    t0 = time.time()
    while not os.path.exists(marker):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.time() - t0 < 120
        time.sleep(0.05)
    os.killpg(procs[1].pid, signal.SIGTERM)
    results = [p.communicate(timeout=120) for p in procs]
    texts = [o + e for o, e in results]
    assert [p.returncode for p in procs] == [143, 143], texts
    assert all("Traceback" not in t for t in texts), texts
    go_on = [line for t in texts for line in t.splitlines() if "Go on with" in line]  # rank 0 says it
    assert len(go_on) == 1 and "Go on with: python train_ultimate.py train " in texts[0], texts
    assert_stopped_after_update_1(out)


def assert_stopped_after_update_1(out: str) -> None:
    saved = ckpt.load(os.path.join(out, "last.pth"))
    assert saved["partial"] == {**saved["partial"], "epoch": 0, "batches": 1}  # both after update 1
    assert saved["global_step"] == 1
    assert [f for f in os.listdir(out) if f.endswith(".pth")] == ["last.pth"]


def test_sigterm_to_torchrun_says_once_how_to_go_on_with_torchrun(small, signal_driver, tmp_path):
    """SIGTERM to torchrun's process group (``timeout``, Ctrl-C, ``docker stop``): the workers save
    last.pth and rank 0 prints one line to go on, a torchrun command. torchrun itself (its agent
    forwards the signal, waits for the workers, then raises its SignalException) exits 1 with its
    own traceback, as docs/multi-gpu.md says."""
    out, marker = str(tmp_path / "killed"), str(tmp_path / "marker")
    args = ["train", "--dataset-path", small, "--checkpoint-dir", out, *TINY, "--epochs", "2", "--stage1-epochs",
            "1", "--limit-batches", "2", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "SIGNAL_MARKER": marker}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", signal_driver, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    t0 = time.time()
    while not os.path.exists(marker):  # both processes wait in their first update
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 120
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    text = "".join(proc.communicate(timeout=120))
    go_on = [line for line in text.splitlines() if "Go on with" in line]
    assert len(go_on) == 1, text
    command = go_on[0].split("Go on with: ", 1)[1]
    assert shlex.split(command) == ["torchrun", "--standalone", "--nproc_per_node", "2", "train_ultimate.py", *args,
                                    "--resume-from", os.path.join(out, "last.pth")]
    assert_stopped_after_update_1(out)
    assert proc.returncode == 1 and text.rstrip().endswith(f"SignalException: Process {proc.pid} got signal: 15")
