"""Where each step's images come from: the device-resident split, or the record cache, read ahead.

    feed = open_feed(built, order, global_batch, start=state.position, rank=rank, size=size)
    for position in range(state.position, steps):
        index = order[position * global_batch:(position + 1) * global_batch]
        images = feed.take(index)        # uint8 global batch on the device, the same as built.images[index]
    feed.close()                         # or let it go: pending reads are cancelled when it is collected

With --cache memory the train split is on the device already and `take` is `built.images[index]`.
With --cache disk (data/cache.py MappedImages, or digits/CIFAR kept in RAM) a few reader threads
gather the epoch's next batches while the device trains on the current one: each reads its
batch's records in file order (the sorted reads of MappedImages.read, straight into their rows),
into pinned memory on CUDA, and the next batch is copied to the device on a side stream as soon
as it is read, so the step waits for the disk only when the disk is slower than the step. The
order is the trainer's (a function of seed and epoch) and the feed starts at any position, so an
exact resume reads exactly the batches the interrupted run would have.

Under torchrun every process augments the whole global batch (the random draws are per global
batch) and keeps rows [rank::size]; a streamed process reads only those rows (and, with
--mixup/--cutmix, the rows they are mixed with: image i with image N-1-i) and leaves the others
zero. The augmentations act on each image alone, so its own rows come out bit for bit as on the
resident path, and over the processes every record is read once.
"""

from __future__ import annotations

import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from visionrecipe.data.cache import MappedImages

READ_AHEAD = 3  # batches read (and held) ahead of the step: enough to ride out a slow read
READERS = 2  # threads reading batches at once; preadv releases the GIL


def open_feed(built, order: torch.Tensor, batch_size: int, *, start: int = 0, rank: int = 0, size: int = 1):
    """The feed of one epoch's batches for `built` (train/build.py BuiltRun), from batch `start`."""
    if built.cfg.data.cache != "disk":
        return ResidentFeed(built.images)
    augment = built.augment
    mirror = bool(getattr(augment, "mixup", 0) or getattr(augment, "cutmix", 0))
    return StreamFeed(built.images, order, batch_size, start=start, rank=rank, size=size, device=built.device,
                      mirror=mirror)


class ResidentFeed:
    """--cache memory: the batch is an index into the split on the device."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def take(self, index: torch.Tensor) -> torch.Tensor:
        return self.images[index]

    def close(self) -> None:
        pass


class StreamFeed:
    """--cache disk: the epoch's batches from `start` on, read ahead by a few threads."""

    def __init__(self, images, order: torch.Tensor, batch_size: int, *, start: int, rank: int, size: int,
                 device: torch.device, mirror: bool = False, ahead: int = READ_AHEAD, readers: int = READERS):
        self.images, self.batch_size, self.device = images, batch_size, torch.device(device)
        self.order = order.cpu().numpy()
        self.rows = own_rows(batch_size, rank, size, mirror)
        self.next = self.position = start  # the next batch to read, the next batch to take
        self.stop = len(self.order) // batch_size
        self.ahead = ahead
        self.pin = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.pin else None
        self.copied = None  # the next batch, already on its way to the device (CUDA)
        self.pool = ThreadPoolExecutor(readers, thread_name_prefix="visionrecipe-feed")
        self.pending = deque()
        # A loop that ends early (a time budget, an error) never calls close: let go, the
        # queued reads are dropped. The reads hold no reference to the feed, only to the data.
        self._finalizer = weakref.finalize(self, self.pool.shutdown, wait=False, cancel_futures=True)
        self._fill()

    def _fill(self) -> None:
        while self.next < self.stop and len(self.pending) + (self.copied is not None) < self.ahead:
            index = self.order[self.next * self.batch_size:(self.next + 1) * self.batch_size]
            self.pending.append(self.pool.submit(read_batch, self.images, index, self.rows, self.pin))
            self.next += 1

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The batch at the feed's position, on the device; `index` is checked against it on the CPU
        (on a GPU that check would cost a synchronisation per step)."""
        if index.device.type == "cpu":
            expected = self.order[self.position * self.batch_size:(self.position + 1) * self.batch_size]
            if not np.array_equal(index.numpy(), expected):
                raise RuntimeError(f"the feed is at batch {self.position} of the epoch, asked for another batch")
        if self.position >= self.stop:
            raise RuntimeError(f"the epoch has {self.stop} batches; the feed has given them all")
        self.position += 1
        if self.copied is not None:
            batch, self.copied = self.copied, None
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)  # the copy finishes before the step's kernels read it
            batch.record_stream(current)  # and its memory is not reused before they have
        else:
            batch = self.pending.popleft().result().to(self.device, non_blocking=True)
        self._fill()
        if self.stream is not None and self.pending and self.pending[0].done():
            with torch.cuda.stream(self.stream):  # overlaps the step that is about to run
                self.copied = self.pending.popleft().result().to(self.device, non_blocking=True)
            self._fill()
        return batch

    def close(self) -> None:
        self._finalizer()


def own_rows(batch_size: int, rank: int, size: int, mirror: bool) -> np.ndarray | None:
    """The rows of a global batch this process reads (None: all of them): its slice [rank::size],
    and with `mirror` the rows those are mixed with (train/strong_augment.py mix_batch: i with N-1-i)."""
    if size == 1:
        return None
    rows = np.arange(rank, batch_size, size)
    return np.union1d(rows, batch_size - 1 - rows) if mirror else rows


def read_batch(images, index: np.ndarray, rows: np.ndarray | None, pin: bool) -> torch.Tensor:
    """uint8 images[index] (pinned for a fast copy to a GPU), only `rows` of it read, the others zero.

    numpy and system calls only: a torch op in this thread would start a second OpenMP team that
    spins against the training step's on the same cores (ten times slower on two cores)."""
    out = torch.empty((len(index), *images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
    target = out.numpy()
    if rows is None:
        rows = np.arange(len(index))
    else:
        rows = rows[rows < len(index)]
        target.fill(0)  # other processes' rows: augmented with the rest, then sliced away
    if isinstance(images, MappedImages):
        images.read(index[rows], out, rows)
    else:  # a split kept in RAM (digits, CIFAR with --cache disk)
        target[rows] = images.numpy()[index[rows]]
    return out
