"""The runtime's rules: which precision --amp picks on which GPU (device properties faked, so this
runs without one), and the single-process runtime's step."""

import pytest
import torch

from core.errors import UserError
from core import runtime
from core.runtime import Runtime, choose_precision


@pytest.fixture
def fake_gpu(monkeypatch):
    def install(name: str, capability: tuple):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        # what the old rule consulted: true on a T4 too, through emulation
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    return install


@pytest.mark.parametrize("name,cap,want", [
    ("Tesla T4", (7, 5), torch.float16),       # Kaggle's T4 x2: emulated bf16 only
    ("Tesla P100-PCIE-16GB", (6, 0), torch.float16),
    ("Tesla V100-SXM2-16GB", (7, 0), torch.float16),
    ("NVIDIA A100-SXM4-40GB", (8, 0), torch.bfloat16),
    ("NVIDIA H100 80GB HBM3", (9, 0), torch.bfloat16),
])
def test_auto_precision_is_native_bf16_only(fake_gpu, name, cap, want):
    fake_gpu(name, cap)
    dtype, why = choose_precision("auto", torch.device("cuda", 0))
    assert dtype == want
    assert name in why and f"{cap[0]}.{cap[1]}" in why
    assert ("loss scaling" in why) == (want == torch.float16)


def test_explicit_modes_and_the_cpu(fake_gpu):
    fake_gpu("Tesla T4", (7, 5))
    cuda = torch.device("cuda", 0)
    assert choose_precision("bf16", cuda)[0] == torch.bfloat16
    assert choose_precision("fp16", cuda)[0] == torch.float16
    assert choose_precision("off", cuda)[0] is None
    for mode in ("auto", "bf16", "fp16", "off"):
        dtype, why = choose_precision(mode, torch.device("cpu"))
        assert dtype is None and "CUDA" in why
    with pytest.raises(UserError, match="--amp"):
        choose_precision("fp8", cuda)


def test_single_process_runtime_step_clips_and_zeroes():
    rt = Runtime("cpu", "auto")
    assert rt.dtype is None and rt.scaler is None and rt.world_size == 1 and rt.is_main
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = model.weight.detach().clone()
    with rt.accumulating(model, sync=True), rt.autocast():
        loss = (model(torch.ones(2, 4)) * 100).sum()
    rt.backward(loss)
    rt.step(opt, model, grad_clip=1.0)
    assert all(p.grad is None for p in model.parameters())
    # clipped to a total norm of 1 over weight and bias, with lr 1: the weight moved by at most 1
    assert 0 < (model.weight.detach() - before).norm() <= 1.0 + 1e-6
    assert rt.any(True) and not rt.any(False) and rt.gather(3) == [3] and rt.broadcast("x") == "x"
    assert runtime.make_runtime("cpu", "off").__class__ is Runtime
