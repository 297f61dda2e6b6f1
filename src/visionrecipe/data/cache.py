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
    images: torch.Tensor  # uint8 N×C×H×W, readable files only, listing order
    kept: torch.Tensor  # bool, one per listed file
    skipped: list[tuple[str, str]]  # (absolute path, reason) of the unreadable files
    seconds: float  # spent decoding (0 when nothing was decoded)
    decoded: int  # files decoded by this call


def cache_key(source: str, image_size: int | None) -> str:
    """Hex digest naming the cache folder; a new Pillow may decode differently, so it is part of it."""
    text = f"visionrecipe-records v{FORMAT_VERSION}\0pillow {PIL.__version__}\0{source}\0{image_size}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def free_bytes(path: Path) -> int:
    """Free disk space at path, in bytes (tests replace this to simulate a small disk)."""
    return shutil.disk_usage(path).free


def load_records(root: Path, relpaths: list[str], stats: list[tuple[int, int]], *, source: str, data_dir: Path,
                 image_size: int | None, progress: bool, workers: int | None, desc: str) -> Loaded:
    """Serve relpaths (with their (size, mtime_ns)) from the cache, decoding only what it lacks.

    With no image_size, the storage size comes from the files' headers (decode.choose_image_size:
    their own size when all are the same square, else the median shorter side, said in one line)."""
    if image_size is None:
        image_size, note = decode.choose_image_size([os.path.join(root, rel) for rel in relpaths])
        if note:
            from visionrecipe.system import warn

            warn(f"{source}: {note}")
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
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
        images = records[rows[0] : rows[-1] + 1]  # still the map: nothing read
    else:
        images = records[rows] if len(rows) else np.zeros((0, 3, image_size or 0, image_size or 0), np.uint8)
    skipped = [(os.path.join(root, rel), e) for rel, e in zip(relpaths, entries) if not isinstance(e, int)]
    return Loaded(torch.from_numpy(images), torch.from_numpy(kept), skipped, seconds, len(todo))


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
