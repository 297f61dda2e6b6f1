"""Device, threads, distributed world and logging: the parts that depend on where we run.

    device = select_device("auto")          # cuda > mps > cpu
    set_threads(None, device)               # physical cores on CPU
    w = world(); w.rank, w.size             # torchrun's environment, or a single process
    log("only rank 0 prints this")
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import VisionRecipeError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all processes (identity in one process)."""
        if self.size > 1:
            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.size
        return float(value)


def world() -> World:
    """Read torchrun's environment; initialise the process group once (gloo on CPU, NCCL on GPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return World(rank, size, local_rank)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


def warn(message: str) -> None:
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def select_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise VisionRecipeError("--device cuda: no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise VisionRecipeError("--device mps: Apple's MPS backend is not available")
    return torch.device(name, local_rank) if name == "cuda" else torch.device(name)


def physical_cores() -> int:
    """Cores, not hyper-threads: two threads on one core slow PyTorch's CPU kernels down."""
    try:
        with open("/proc/cpuinfo") as f:
            cores = {line.split(":")[1].strip() for line in f if line.startswith("core id")}
        allowed = len(os.sched_getaffinity(0))
        return max(1, min(len(cores) or allowed, allowed))
    except (OSError, AttributeError, IndexError):
        return os.cpu_count() or 1


def set_threads(threads: int | None, device: torch.device) -> None:
    if device.type == "cpu":
        per_process = max(1, (threads or physical_cores()) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(per_process)
