"""Where and how the math runs: device, precision, backward/step, and (with torchrun) several processes.

The loop never calls ``.cuda()``, ``autocast``, ``GradScaler`` or ``torch.distributed`` itself; it asks
a runtime:

    rt = make_runtime(device="auto", amp="auto")     # Runtime, or DistributedRuntime under torchrun
    model = rt.wrap(net)                               # DDP under torchrun; re-wrap after (un)freezing
    with rt.accumulating(model, sync=last_micro_batch):
        with rt.autocast():
            loss = ...
        rt.backward(loss)
    rt.step(optimizer, net, grad_clip)                 # unscale, clip, step, update scaler, zero grads
    rt.any(flag) / rt.gather(obj) / rt.barrier()       # agreement between processes

``evaluation/`` uses the same runtime for inference (device and precision), never the trainer.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from typing import Any, Optional

import torch

from core.errors import UserError

AMP_MODES = ("auto", "off", "fp16", "bf16")
log = logging.getLogger("cod")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but none is available: use --device cpu")
    return dev


def native_bf16(device: torch.device) -> bool:
    """bf16 with tensor cores: compute capability 8.0 or newer (A100, L4, H100...). A T4 (7.5), V100
    (7.0) or P100 (6.0) only emulates it, slower than fp16, although ``is_bf16_supported()``'s default
    (``including_emulation=True``) says yes there."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def choose_precision(mode: str, device: torch.device) -> tuple[Optional[torch.dtype], str]:
    """(autocast dtype or None for fp32, the reason in words). AMP runs only on CUDA; 'auto' means
    native bf16 where the GPU has it, else fp16 with a GradScaler."""
    if mode not in AMP_MODES:
        raise UserError(f"--amp {mode!r}: choose one of {', '.join(AMP_MODES)}")
    if device.type != "cuda":
        return None, "fp32 (AMP runs only on CUDA)"
    if mode == "off":
        return None, "fp32 (--amp off)"
    if mode == "bf16":
        return torch.bfloat16, "bf16 (--amp bf16)"
    if mode == "fp16":
        return torch.float16, "fp16 with loss scaling (--amp fp16)"
    name = torch.cuda.get_device_name(device)
    cap = "%d.%d" % torch.cuda.get_device_capability(device)
    if native_bf16(device):
        return torch.bfloat16, f"bf16 (--amp auto: {name}, compute capability {cap}, has native bf16)"
    return torch.float16, (f"fp16 with loss scaling (--amp auto: {name}, compute capability {cap}, "
                           "has no native bf16)")


def amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``choose_precision`` (None = fp32)."""
    return choose_precision(mode, device)[0]



def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel or DataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, (torch.nn.parallel.DistributedDataParallel,
                                              torch.nn.DataParallel)) else model

class Runtime:
    """One process: a device, a precision, and trivial versions of the collective operations."""

    rank, world_size, local_rank = 0, 1, 0

    def __init__(self, device: str = "auto", amp: str = "auto"):
        self.device = self._device(device)
        self.dtype, self.precision = choose_precision(amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

    def _device(self, name: str) -> torch.device:
        return resolve_device(name)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"{self.device} | precision {self.precision}"

    # ---- math ---------------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model the loop calls; call again after (un)freezing parameters."""
        return model

    def accumulating(self, model, sync: bool):
        """Around forward and backward of a micro-batch: ``sync=False`` skips the gradient reduction
        (DDP's ``no_sync``) on all but the last micro-batch of an accumulation group."""
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, grad_clip: float,
             check_finite: bool = False) -> bool:
        """One optimizer update: unscale, clip the gradient norm, step, update the scale, zero the
        gradients. With ``check_finite`` (one host sync for the gradient norm) an update with inf/NaN
        gradients is skipped and False returned; under fp16 the scaler skips those by itself and
        lowers its scale, which is routine, so True is returned."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        finite = True
        if grad_clip > 0 or check_finite:
            params = [p for p in unwrap(model).parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
            finite = bool(torch.isfinite(norm)) if check_finite else True
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skips by itself on inf/NaN
            self.scaler.update()
        elif finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return finite or self.scaler is not None  # fp16 overflow steps are the scaler's business

    # ---- processes ----------------------------------------------------------------------------
    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any."""
        return bool(flag)

    def gather(self, obj: Any) -> list:
        """Every process's ``obj``, in rank order, on every process."""
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        return obj

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class DistributedRuntime(Runtime):
    """One process of a ``torchrun`` job: DistributedDataParallel over nccl (GPU) or gloo (CPU).

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the process group is
    initialised from them. Frozen parameters are not reduced, so ``wrap`` re-wraps the model
    whenever the set of trainable parameters changed (stage 1 -> 2, each progressive-unfreeze step).
    ``find_unused_parameters`` covers experts that no sample of a batch was routed to."""

    def __init__(self, device: str = "auto", amp: str = "auto"):
        import torch.distributed as dist

        self.dist = dist
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        super().__init__(device, amp)
        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, **({"device_id": self.device} if backend == "nccl" else {}))
        self._wrapped: Optional[torch.nn.Module] = None
        self._trainable: Optional[tuple] = None

    def _device(self, name: str) -> torch.device:
        dev = resolve_device(name)
        if dev.type == "cuda":
            if torch.cuda.device_count() < self.world_size and dev.index is None:
                raise UserError(f"torchrun started {self.world_size} processes but this machine has "
                                f"{torch.cuda.device_count()} GPUs: lower --nproc_per_node")
            dev = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(dev)
        return dev

    def describe(self) -> str:
        return (f"{self.device} | precision {self.precision} | DDP over "
                f"{'nccl' if self.device.type == 'cuda' else 'gloo'}, world size {self.world_size}")

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        net = unwrap(model)
        trainable = tuple(p.requires_grad for p in net.parameters())
        if self._wrapped is None or self._wrapped.module is not net or trainable != self._trainable:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._wrapped = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=ids, find_unused_parameters=True)
            self._trainable = trainable
        return self._wrapped

    def accumulating(self, model, sync: bool):
        if sync or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return nullcontext()
        return model.no_sync()

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], device=self._comm_device())
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj: Any) -> list:
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def make_runtime(device: str = "auto", amp: str = "auto") -> Runtime:
    """A DistributedRuntime when started by torchrun with more than one process, else a Runtime."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return DistributedRuntime(device, amp)
    return Runtime(device, amp)
