"""Device, threads, distributed world and logging: the parts that depend on where we run.

    device = select_device("auto", local_rank())   # cuda > mps > cpu
    set_threads(None, device)                       # physical cores on CPU, shared by local processes
    w = world(device); w.rank, w.size               # torchrun's environment, or a single process
    w.sum(t); w.max([a, b]); w.broadcast(obj); w.gather(obj)   # identity in one process
    log("only rank 0 prints this")
    shutdown()                                      # destroy the process group at the end

Under torchrun every process calls the same collectives in the same order; a decision that one
process could take alone (stop on a signal, skip a NaN batch, save now) goes through `max` first.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from visionrecipe.errors import VisionRecipeError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collective tensors live: NCCL only moves CUDA tensors

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over all processes, as a new tensor."""
        if self.size == 1:
            return tensor
        total = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(total)
        return total.to(tensor.device)

    def max(self, values: list[int]) -> list[int]:
        """Elementwise maximum of small integers over all processes: how they agree on a decision."""
        if self.size == 1:
            return list(values)
        flags = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags.tolist()

    def broadcast(self, obj):
        """Rank 0's value of a picklable object, on every process."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every process's object, in rank order, on every process."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every process's module (in place)."""
        if self.size > 1:
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (decodes and caches a folder); the others then read the cache."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world(device: torch.device | None = None) -> World:
    """Read torchrun's environment; initialise the process group once: NCCL for a CUDA device,
    gloo otherwise (CPU training, or `--device cpu` on a GPU machine)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank = int(os.environ["RANK"])
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(rank, size, local_rank(), f"cuda:{local_rank()}" if cuda else "cpu")


def shutdown() -> None:
    """Leave the process group (torchrun warns about, and NCCL may hang on, one left open)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
        # (socket, core) pairs: core ids repeat on every socket of a multi-socket server.
        cores, socket = set(), ""
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    socket = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    cores.add((socket, line.split(":")[1].strip()))
        allowed = len(os.sched_getaffinity(0))
        return max(1, min(len(cores) or allowed, allowed))
    except (OSError, AttributeError, IndexError):
        return os.cpu_count() or 1


def set_threads(threads: int | None, device: torch.device) -> None:
    if device.type == "cpu":
        keep_freed_memory()
        # The cores are shared by the processes torchrun started on this machine; an explicit
        # --threads is taken as given, per process.
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        per_process = threads or max(1, physical_cores() // local_processes)
        torch.set_num_threads(per_process)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_allocator_tuned = False


def keep_freed_memory() -> bool:
    """Keep the memory a CPU training step frees for the next step (True: done here).

    glibc maps every large block (a batch's activations, their gradients) fresh from the kernel and
    unmaps it when freed, so each step pays a page fault per 4 KiB it touches: measured on 2 cores,
    fastnet trained at 1/1.44-1/1.49 of the speed and a third of its CPU time was the kernel's
    (BENCHMARKS.md, "CPU allocator"). With mmap off and no trimming, freed blocks stay in the heap and are reused,
    as PyTorch's CUDA caching allocator does on a GPU. Left alone where the user chose: MALLOC_*
    in the environment, or another allocator preloaded (jemalloc, tcmalloc)."""
    global _allocator_tuned
    if _allocator_tuned:
        return False
    _allocator_tuned = True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(k.startswith("MALLOC_") for k in os.environ) or os.environ.get("LD_PRELOAD"):
        return False
    try:
        libc = ctypes.CDLL(None)
        # -1 as size_t: never trim the heap's top back to the kernel
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
    except (OSError, AttributeError):
        return False
