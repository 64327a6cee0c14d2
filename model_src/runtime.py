"""Where training runs: the device, the precision (autocast, a gradient scaler for fp16), the process group.

`--device auto` takes CUDA when torch sees it. Under torchrun, the backend follows the device: NCCL on CUDA (one
GPU per process, LOCAL_RANK picks it), gloo on CPU. Weights stay fp32 whatever the precision: autocast runs the
matmuls in bf16 / fp16 and the optimizer updates fp32 weights, so checkpoints are fp32 and load on CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False); "
                         "use --device auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


@dataclass
class Precision:
    """Autocast and, for fp16, a gradient scaler (bf16 has fp32's range and needs none)."""

    name: str
    device: torch.device

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.name!r}")
        if self.name == "fp16" and self.device.type == "cpu":
            raise ValueError("--precision fp16 needs CUDA (on CPU, use bf16)")
        self.scaler = torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None

    def autocast(self):
        dtype = PRECISIONS[self.name]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params, clip_norm: float) -> None:
        """Unscale (fp16), clip, step; a step whose gradients overflowed is skipped by the scaler."""
        if self.scaler:
            self.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins torchrun's process group when there is one, with the device's backend."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def all_reduce_sum(value: float, device: torch.device) -> float:
    """A number summed over every rank (tokens processed, for throughput)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())
