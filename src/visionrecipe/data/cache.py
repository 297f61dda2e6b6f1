"""The decoded-image cache of a folder: decode only what changed, resume after a kill, map the rest.

Usage::

    from visionrecipe.data.cache import load_records

    loaded = load_records(root, relpaths, stats, source=str(root), data_dir=data_dir,
                          image_size=32, progress=True, workers=None, desc="decoding pets")
    loaded.images   # uint8 N×C×H×W of the readable files, in the order of relpaths
    loaded.kept     # bool mask over relpaths; loaded.skipped: [(path, reason)] of the others
    loaded.decoded  # how many files this call decoded (0: all served from the cache)

One cache per (source, storage size, Pillow version, format version) lives in
``<data_dir>/records/<key>/`` (layout in records.py). It is not keyed by the file list: each
file's (size, mtime_ns) is checked against the manifest, and only files that are new or
changed are decoded and appended; removed files are dropped from the manifest, and when more
than half the records are dead the live ones are rewritten in listing order. Decoding
commits every chunk, so a rerun after Ctrl-C or SIGKILL decodes only what was never
committed. Before decoding, the bytes to write are compared with the free disk space.

When the readable files' records are one contiguous run in listing order (always after a
fresh decode or a compaction) ``images`` is a tensor over the map: opening a cache reads
nothing, and ``.to(device)`` copies as for any CPU tensor. Otherwise the records are
gathered into memory in listing order.

``--cache disk`` (or ``auto`` when the data would not fit comfortably in free memory) keeps
them on disk instead: ``images`` is a ``MappedImages``, the rows of the record file that
every read fetches with positional reads (sorted, one system call per run of neighbouring
records), so a split of any size costs no memory until a batch of it is read::

    plan = CachePlan("auto", device_free=None)      # free GPU bytes too when CUDA trains
    plan.decide(n_images, (3, 64, 64))              # ("memory" | "disk", the reason), or a one-line error
    images = MappedImages(path, (3, 64, 64), rows)  # images[index] → uint8 tensor; images.subset(rows)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

from visionrecipe.data import decode
from visionrecipe.data.records import FORMAT_VERSION, RecordStore, State, next_generation
from visionrecipe.errors import VisionRecipeError

MIN_FREE = 256 * 2**20  # bytes left over after the cache: a full disk breaks everything else too


@dataclass
class Loaded:
    images: "torch.Tensor | MappedImages"  # uint8 N×C×H×W, readable files only, listing order
    kept: torch.Tensor  # bool, one per listed file
    skipped: list[tuple[str, str]]  # (absolute path, reason) of the unreadable files
    seconds: float  # spent decoding (0 when nothing was decoded)
    decoded: int  # files decoded by this call
    cache: tuple[str, str] = ("memory", "")  # CachePlan.decide's (memory | disk, why)


def cache_key(source: str, image_size: int | None) -> str:
    """Hex digest naming the cache folder; a new Pillow may decode differently, so it is part of it."""
    text = f"visionrecipe-records v{FORMAT_VERSION}\0pillow {PIL.__version__}\0{source}\0{image_size}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def free_bytes(path: Path) -> int:
    """Free disk space at path, in bytes (tests replace this to simulate a small disk)."""
    return shutil.disk_usage(path).free


def free_memory() -> int:
    """RAM this process could still take without swapping, in bytes (tests replace this to
    simulate a small machine): the kernel's MemAvailable (page cache it can drop counts as free),
    else psutil's, else the free pages; and never more than its cgroup's memory limit leaves (a
    container's limit kills at that line, whatever the host has free)."""
    return min(_machine_free(), _cgroup_room())


def _machine_free() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.virtual_memory().available)


def _cgroup_room() -> int:
    """The memory cgroup's limit less what it uses (cgroup v2 memory.max, or v1 memory.limit_in_bytes;
    its reclaimable page cache counts as room), or a huge number where there is no limit."""
    unlimited = 1 << 62
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return unlimited
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: memory.max / memory.current
            folder, limit_file, usage_file = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # v1
            folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit_file, usage_file = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        try:
            limit = (folder / limit_file).read_text().strip()
            usage = int((folder / usage_file).read_text())
            cache = _stat(folder / "memory.stat", ("inactive_file", "total_inactive_file"))
        except (OSError, ValueError):
            continue
        if limit != "max" and int(limit) < unlimited:
            return max(0, int(limit) - usage + cache)
    return unlimited


def _stat(path: Path, keys: tuple[str, ...]) -> int:
    """The first of `keys` in a cgroup memory.stat file (0 when absent)."""
    values = dict(line.split() for line in path.read_text().splitlines() if line.count(" ") == 1)
    return next((int(values[k]) for k in keys if k in values), 0)


# auto keeps the images in memory only when they take at most this share of what is free: the
# model, the float batches and the rest of the machine need the remainder.
COMFORTABLE_SHARE = 0.5


@dataclass
class CachePlan:
    """Where the decoded images live while a run trains: --cache memory, disk or auto."""

    cache: str = "auto"
    device_free: int | None = None  # free bytes of the training GPU, which holds the train split when resident

    def decide(self, images: int, shape) -> tuple[str, str]:
        """("memory" or "disk", why) for `images` records of C×H×W `shape`, before any is decoded;
        --cache memory that cannot fit is a one-line error with the numbers."""
        need = images * int(np.prod(shape))
        room = [("RAM", free_memory())] + ([("GPU memory", self.device_free)] if self.device_free is not None else [])
        size = f"{images:,} images of {'x'.join(map(str, shape))} are {_size(need)}"
        where, free = min(room, key=lambda item: item[1])
        if self.cache == "disk":
            return "disk", f"--cache disk: {size}, read batch by batch ahead of the step"
        if self.cache == "memory":
            if need > free:
                raise VisionRecipeError(f"--cache memory: {size} but only {_size(free)} of {where} is free (use "
                                        "--cache disk or auto to stream them from disk, or a smaller --image-size)")
            return "memory", f"--cache memory: {size}, {_size(free)} of {where} free"
        if self.cache != "auto":
            raise VisionRecipeError(f"--cache is memory, disk or auto, got {self.cache!r}")
        if need <= COMFORTABLE_SHARE * free:
            return "memory", f"auto: {size}, within half the {_size(free)} of {where} free"
        return "disk", f"auto: {size}, more than half the {_size(free)} of {where} free: read batch by batch"


def _size(nbytes: int) -> str:
    if nbytes >= 1e8:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.0f} kB"


class MappedImages:
    """The rows of a record file as a split's images, read on demand (--cache disk).

        images = MappedImages(path, (3, 64, 64), rows)   # rows: record numbers, in the split's order
        images.shape, len(images)                  # (N, 3, 64, 64), N: nothing read
        images[index]                              # uint8 tensor, read now (index: tensor, array, slice, int)
        images.read(index, out, at)                # into rows `at` of a preallocated (pinned) tensor
        images.subset(indices)                     # a smaller MappedImages: nothing read

    Positional reads (os.preadv), not the map: pages read through a map stay in the process's
    resident memory until the kernel is pressed, so a streamed epoch over a 30 GB cache would
    show a 30 GB RSS; read this way they sit only in the page cache, which the kernel drops
    freely. Each read sorts the records and reads each run of neighbouring ones in one call,
    straight into its rows of the result (no un-permuting copy)."""

    dtype = torch.uint8

    def __init__(self, path, shape, rows):
        self.path = str(path)
        self.record_shape = tuple(int(v) for v in shape)
        self.record_bytes = int(np.prod(self.record_shape))
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        self._fd = self._open()  # one descriptor, shared by the reader threads (preadv keeps no offset)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.record_shape))

    def __len__(self) -> int:
        return len(self.rows)

    def dim(self) -> int:
        return 4

    def numel(self) -> int:
        return len(self.rows) * self.record_bytes

    def __getstate__(self):  # another process opens the file itself
        return {k: v for k, v in self.__dict__.items() if k != "_fd"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fd = self._open()

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def subset(self, indices) -> "MappedImages":
        return MappedImages(self.path, self.record_shape, self.rows[_positions(indices, len(self.rows))])

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, (int, np.integer)):
            return self.read([int(key)])[0]
        return self.read(_positions(key, len(self.rows)))

    def __iter__(self):
        step = max(1, READ_CHUNK_BYTES // self.record_bytes)
        for start in range(0, len(self), step):
            yield from self[start:start + step]

    def to(self, *args, **kwargs) -> torch.Tensor:
        """The whole split read into memory (then moved as `Tensor.to` moves it)."""
        return self[:].to(*args, **kwargs)

    def read(self, indices, out: torch.Tensor | None = None, at=None) -> torch.Tensor:
        """Images `indices` (positions in this split) as uint8, into `out`'s rows `at` (default:
        a new tensor, rows in the order of `indices`)."""
        rows = self.rows[_positions(indices, len(self.rows))]
        if out is None:
            out = torch.empty((len(rows), *self.record_shape), dtype=torch.uint8)
        at = np.arange(len(rows)) if at is None else np.asarray(at, dtype=np.int64)
        if not len(rows):
            return out
        target = out.numpy().reshape(len(out), self.record_bytes)  # a view: reads land in `out`
        order = np.argsort(rows, kind="stable")
        rows, at = rows[order], at[order]
        # Runs of consecutive records (a repeated record starts a run of its own), at most
        # IOV_MAX buffers per call.
        starts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 2) != 1)
        bounds = np.append(starts, len(rows))
        fd = self._fd
        for first, stop in zip(bounds[:-1], bounds[1:]):
            for lo in range(first, stop, IOV_MAX):
                hi = min(stop, lo + IOV_MAX)
                _read_exact(fd, [target[i] for i in at[lo:hi]], int(rows[lo]) * self.record_bytes, self.path)
        return out

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise VisionRecipeError(f"cannot read the image cache {self.path}: {exc.strerror}") from None


def cat_images(parts: list) -> "torch.Tensor | MappedImages":
    """`parts`' images one after the other: splits of one record file stay on disk (their rows
    joined, nothing read), tensors are concatenated."""
    if all(isinstance(p, MappedImages) for p in parts) and len({(p.path, p.record_shape) for p in parts}) == 1:
        return MappedImages(parts[0].path, parts[0].record_shape, np.concatenate([p.rows for p in parts]))
    return torch.cat([p if isinstance(p, torch.Tensor) else p[:] for p in parts])


READ_CHUNK_BYTES = 16 * 2**20  # iterating a MappedImages reads this much per call
IOV_MAX = 1024  # buffers per preadv call (Linux's limit)


def _positions(key, n: int) -> np.ndarray:
    """An index (slice, tensor, array, list) as int64 positions in 0..n-1, as torch would index."""
    if isinstance(key, slice):
        return np.arange(n)[key]
    if isinstance(key, torch.Tensor):
        key = key.detach().cpu().numpy()
    positions = np.asarray(key).reshape(-1)
    if positions.dtype == bool:
        return np.flatnonzero(positions)
    positions = positions.astype(np.int64)
    return np.where(positions < 0, positions + n, positions)


def _read_exact(fd: int, buffers: list, offset: int, path: str) -> None:
    """Fill `buffers` from the file at `offset`; the kernel may return less than asked (go on
    from there), and nothing at all means the file is shorter than the manifest says."""
    views = [memoryview(buffer).cast("B") for buffer in buffers]
    while views:
        got = os.preadv(fd, views, offset)
        if got <= 0:
            raise VisionRecipeError(f"the image cache {path} is shorter than its manifest says; delete it to "
                                    "decode again")
        offset += got
        while views and got >= len(views[0]):
            got -= len(views.pop(0))
        if got:
            views[0] = views[0][got:]


def load_records(root: Path, relpaths: list[str], stats: list[tuple[int, int]], *, source: str, data_dir: Path,
                 image_size: int | None, progress: bool, workers: int | None, desc: str,
                 plan: CachePlan | None = None) -> Loaded:
    """Serve relpaths (with their (size, mtime_ns)) from the cache, decoding only what it lacks.

    With no image_size, the storage size comes from the files' headers (decode.choose_image_size:
    their own size when all are the same square, else the median shorter side, said in one line).
    `plan` (default: memory) decides, before anything is decoded, whether `images` is read into
    memory or stays on disk as MappedImages."""
    if image_size is None:
        image_size, note = decode.choose_image_size([os.path.join(root, rel) for rel in relpaths])
        if note:
            from visionrecipe.system import warn

            warn(f"{source}: {note}")
    shape = (3, image_size, image_size) if image_size else _probe_shape([os.path.join(root, r) for r in relpaths])
    cache = (plan or CachePlan("memory")).decide(len(relpaths), shape)  # before anything is decoded
    store = RecordStore(data_dir / "records" / cache_key(source, image_size))
    with store.locked():
        state = store.open(source=source, image_size=image_size)
        old_data, dirty = state.data, store.has_journal()  # dirty: an interrupted update to fold in
        fresh = [state.files.get(rel, (None, None, None))[:2] == stat for rel, stat in zip(relpaths, stats)]
        todo = list({relpaths[i]: i for i, ok in reversed(list(enumerate(fresh))) if not ok}.values())[::-1]
        reused = any(ok and isinstance(state.files[rel][2], int) for rel, ok in zip(relpaths, fresh))
        if todo and not reused and state.records:  # nothing left to reuse: a new, empty generation
            state = State(source, image_size, data=next_generation(state.data))
            store.commit(state)  # first, so that a kill during the decode below resumes in it
            store.remove(old_data)
        seconds = 0.0
        if todo:
            started = time.perf_counter()
            _check_space(store, state, [os.path.join(root, relpaths[i]) for i in todo], source)
            _decode_into(store, state, root, [(relpaths[i], *stats[i]) for i in todo], image_size, progress,
                         workers, desc)
            seconds = time.perf_counter() - started
        if todo or dirty or state.files.keys() != set(relpaths):
            state.files = {rel: state.files[rel] for rel in relpaths}  # removed files are forgotten
            store.commit(state)
            if 2 * sum(isinstance(e[2], int) for e in state.files.values()) < state.records:
                state = store.compact(state, relpaths)
        records = store.map(state)
    entries = [state.files[rel][2] for rel in relpaths]
    kept = np.array([isinstance(e, int) for e in entries], dtype=bool)
    rows = np.array([e for e in entries if isinstance(e, int)], dtype=np.int64)
    skipped = [(os.path.join(root, rel), e) for rel, e in zip(relpaths, entries) if not isinstance(e, int)]
    if cache[0] == "disk" and len(rows):
        images = MappedImages(store.dir / state.data, state.shape, rows)
        return Loaded(images, torch.from_numpy(kept), skipped, seconds, len(todo), cache)
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
        images = records[rows[0] : rows[-1] + 1]  # still the map: nothing read
    else:
        images = records[rows] if len(rows) else np.zeros((0, 3, image_size or 0, image_size or 0), np.uint8)
    return Loaded(torch.from_numpy(images), torch.from_numpy(kept), skipped, seconds, len(todo), cache)


def _decode_into(store: RecordStore, state: State, root: Path, files: list[tuple[str, int, int]],
                 image_size, progress, workers, desc) -> None:
    """Decode `files` (relpath, size, mtime_ns) chunk by chunk, appending each to the store."""
    paths = [os.path.join(root, rel) for rel, _, _ in files]
    for rows, block, failed in decode.iter_decoded(paths, image_size=image_size, workers=workers,
                                                   progress=progress, desc=desc):
        if block is not None and state.shape is not None and tuple(block.shape[1:]) != state.shape:
            cached = next(rel for rel, entry in state.files.items() if isinstance(entry[2], int))
            raise decode._size_error(os.path.join(root, cached), state.shape[1:] + (3,),
                                     paths[rows[0]], block.shape[2:] + (3,))
        reasons = dict(failed)
        chunk = sorted([*rows.tolist(), *reasons])
        store.append(state, block, [(*files[i], reasons.get(i)) for i in chunk])


def _check_space(store: RecordStore, state: State, paths: list[str], source: str) -> None:
    """A one-line error, before anything is decoded, when the new records cannot fit on the disk."""
    shape = state.shape or ((3, state.image_size, state.image_size) if state.image_size else _probe_shape(paths))
    needed = len(paths) * int(np.prod(shape))
    free = free_bytes(store.dir)
    if needed + MIN_FREE > free:
        raise VisionRecipeError(
            f"not enough disk for the decoded images of {source}: {len(paths)} images of "
            f"{shape[2]}x{shape[1]} need {needed / 1e9:.2f} GB, only {free / 1e9:.2f} GB free at {store.dir} "
            "(free some space, pass --image-size to store them smaller, or --data-dir on a larger disk)")


def _probe_shape(paths: list[str]) -> tuple[int, int, int]:
    """C×H×W from the first readable header (no decode); an EXIF turn swaps H and W, not H×W."""
    for path in paths[:100]:
        try:
            with Image.open(path) as image:
                return (3, image.height, image.width)
        except Exception:  # unreadable files are the decoder's to report
            continue
    return (3, 0, 0)
