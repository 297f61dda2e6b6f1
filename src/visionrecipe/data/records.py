"""The on-disk format of a decoded folder: one file of fixed-size uint8 records, mapped, not loaded.

Usage::

    from visionrecipe.data.records import RecordStore

    store = RecordStore(data_dir / "records" / key)
    with store.locked():                              # one writer at a time (fcntl.flock)
        state = store.open(source=..., image_size=32) # manifest + committed journal lines
        store.append(state, block, entries)           # one chunk: records fsync'ed, then journalled
        store.commit(state)                           # manifest rewritten atomically, journal gone
    images = store.map(state)                         # numpy memmap N×C×H×W over every record

The folder ``<data_dir>/records/<key>/`` holds:

* ``data-<generation>.u8``: record ``i`` is C×H×W uint8 bytes at offset ``i * C*H*W``; no header,
  so the first record starts on a page boundary and a record is one contiguous read.
* ``manifest.json``: ``{"version", "pillow", "source", "image_size", "shape", "data", "records",
  "files": [[relpath, size, mtime_ns, record index or the reason it is unreadable], ...]}``.
* ``journal.jsonl``: one line per chunk committed since the manifest was written, same
  ``files`` rows plus the data file and its record count. A chunk is committed when its records
  are fsync'ed and then its line is (append + fsync); a kill tears at most the last line, which
  is ignored, so a rerun reuses every committed chunk and overwrites the uncommitted tail.
* ``lock``: flock'ed while the cache is read or written.

Records that no manifest row points to any more (a file changed or removed) are dead weight
until ``compact`` rewrites the live ones into a new generation; the manifest names the data
file, so a kill mid-compaction leaves the old generation in use and the new one an orphan
that the next ``open`` deletes. No pickle anywhere: JSON and raw bytes only.
"""

from __future__ import annotations

import fcntl
import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL

from visionrecipe.errors import VisionRecipeError
from visionrecipe.rundir import append_jsonl, atomic_write_text, read_jsonl, write_error

FORMAT_VERSION = 3  # bump when the layout or the decoding changes meaning (1 was tensors/<key>.pt;
# 2 squashed non-square images to the square, 3 resizes the shorter side and crops the centre)
MANIFEST, JOURNAL, LOCK = "manifest.json", "journal.jsonl", "lock"
COPY_BYTES = 64 * 2**20  # compaction copies about this much per step


@dataclass
class State:
    """A cache as read from disk; ``files`` maps relpath → (size, mtime_ns, record or reason)."""

    source: str
    image_size: int | None
    shape: tuple[int, int, int] | None = None  # C×H×W of every record; None before the first one
    data: str = "data-0.u8"
    records: int = 0  # committed records in the data file
    files: dict[str, tuple[int, int, int | str]] = field(default_factory=dict)

    @property
    def record_bytes(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 0

    def header(self) -> dict:
        return {"version": FORMAT_VERSION, "pillow": PIL.__version__, "source": self.source,
                "image_size": self.image_size}


class RecordStore:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self._out = None  # the data file, open for appending during an update

    @contextmanager
    def locked(self):
        """Blocking exclusive lock: a second process (another torchrun rank) waits its turn."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise write_error(self.dir, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            if self._out is not None:
                self._out.close()
                self._out = None
            os.close(fd)  # releases the lock

    # --- reading --------------------------------------------------------------------------------
    def open(self, *, source: str, image_size: int | None) -> State:
        """The committed state (manifest, then journal lines); a damaged cache starts empty."""
        state = State(source, image_size)
        try:
            state = self._read_manifest(state)
            for line in read_jsonl(self.dir / JOURNAL):  # a torn last line is dropped there
                if line.get("data") != state.data:
                    continue  # journal of a generation that a compaction replaced
                state.shape = state.shape or tuple(line["shape"])
                state.records = max(state.records, int(line["records"]))
                state.files.update((row[0], (row[1], row[2], row[3])) for row in line["files"])
            size = (self.dir / state.data).stat().st_size if state.records else 0
            if size < state.records * state.record_bytes:
                raise ValueError(f"{state.data} holds {size} bytes, fewer than its {state.records} records")
        except (OSError, ValueError, KeyError, TypeError, IndexError, VisionRecipeError) as exc:
            if (self.dir / MANIFEST).exists() or (self.dir / JOURNAL).exists():
                warnings.warn(f"ignoring damaged image cache {self.dir} ({exc}); decoding again", stacklevel=2)
            state = State(source, image_size)
            (self.dir / JOURNAL).unlink(missing_ok=True)
            (self.dir / state.data).unlink(missing_ok=True)  # a new file: a reader's map of the old one stays valid
        for orphan in self.dir.glob("data-*.u8"):  # compactions or rebuilds a kill interrupted
            if orphan.name != state.data:
                orphan.unlink(missing_ok=True)
        return state

    def has_journal(self) -> bool:
        """Chunks committed since the manifest was written (an update that was interrupted)."""
        return (self.dir / JOURNAL).exists()

    def _read_manifest(self, empty: State) -> State:
        try:
            manifest = json.loads((self.dir / MANIFEST).read_text())
        except FileNotFoundError:
            return empty
        if {k: manifest.get(k) for k in empty.header()} != empty.header():
            raise ValueError("written by another version or for other settings")
        return State(empty.source, empty.image_size, tuple(manifest["shape"]) if manifest["shape"] else None,
                     str(manifest["data"]), int(manifest["records"]),
                     {row[0]: (row[1], row[2], row[3]) for row in manifest["files"]})

    def map(self, state: State) -> np.ndarray:
        """Every committed record as a copy-on-write memmap: opening costs no read, and a
        caller writing into it (an in-place op on a batch view) never changes the file."""
        if not state.records:
            return np.zeros((0, *(state.shape or (3, 0, 0))), dtype=np.uint8)
        return np.memmap(self.dir / state.data, dtype=np.uint8, mode="c", shape=(state.records, *state.shape))

    # --- writing (under locked()) ---------------------------------------------------------------
    def append(self, state: State, block: np.ndarray | None, rows: list[tuple[str, int, int, int | str]]) -> None:
        """Write a chunk: block's records go after the committed ones; `rows` are the chunk's
        files as (relpath, size, mtime_ns, reason), where the readable files' reason is None
        and they take the block's records in order. Committed when this returns."""
        first = state.records
        if block is not None:
            if state.shape is None:
                state.shape = tuple(block.shape[1:])
            out = self._output(state)
            out.seek(first * state.record_bytes)
            try:
                out.write(memoryview(np.ascontiguousarray(block)).cast("B"))
                out.flush()
                os.fsync(out.fileno())
            except OSError as exc:
                raise write_error(self.dir / state.data, exc) from None
            state.records += len(block)
        record = iter(range(first, state.records))
        files = [[rel, size, mtime, next(record) if reason is None else reason] for rel, size, mtime, reason in rows]
        append_jsonl(self.dir / JOURNAL, {"data": state.data, "shape": state.shape, "records": state.records,
                                          "files": files})
        state.files.update((row[0], (row[1], row[2], row[3])) for row in files)

    def _output(self, state: State):
        if self._out is None or os.path.basename(self._out.name) != state.data:
            if self._out is not None:
                self._out.close()
            path = self.dir / state.data
            try:
                self._out = open(path, "r+b" if path.exists() else "w+b")
                self._out.truncate(state.records * state.record_bytes)  # an uncommitted tail from a kill
            except OSError as exc:
                raise write_error(path, exc) from None
        return self._out

    def commit(self, state: State) -> None:
        """Rewrite the manifest from `state` (atomically), then drop the journal it absorbed."""
        files = [[rel, *entry] for rel, entry in state.files.items()]
        manifest = {**state.header(), "shape": state.shape, "data": state.data, "records": state.records,
                    "files": files}
        atomic_write_text(self.dir / MANIFEST, json.dumps(manifest, separators=(",", ":")))
        (self.dir / JOURNAL).unlink(missing_ok=True)

    def compact(self, state: State, order: list[str]) -> State:
        """A new generation holding only the records of `order` (relpaths), in that order."""
        order = list(dict.fromkeys(order))
        source = self.map(state)
        new = State(state.source, state.image_size, state.shape, next_generation(state.data))
        live = [rel for rel in order if isinstance(state.files[rel][2], int)]
        step = max(1, COPY_BYTES // max(1, state.record_bytes))
        path = self.dir / new.data
        try:
            with open(path, "wb") as out:
                for start in range(0, len(live), step):
                    rows = [state.files[rel][2] for rel in live[start : start + step]]
                    out.write(memoryview(np.ascontiguousarray(source[rows])).cast("B"))
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            raise write_error(path, exc) from None
        new.records = len(live)
        record = iter(range(new.records))
        for rel in order:
            size, mtime, entry = state.files[rel]
            new.files[rel] = (size, mtime, next(record) if isinstance(entry, int) else entry)
        self.commit(new)
        self.remove(state.data)
        return new

    def remove(self, data: str) -> None:
        """Delete a replaced data file; processes that mapped it keep their pages (never truncate it)."""
        (self.dir / data).unlink(missing_ok=True)


def next_generation(name: str) -> str:
    return f"data-{int(name[len('data-'):-len('.u8')]) + 1}.u8"
