"""Disk cache of decoded image tensors, keyed by everything that could change the pixels.

Usage::

    from visionrecipe.data.cache import cache_key, load_cached, save_cached

    key = cache_key(root, image_size, [(relpath, size, mtime_ns), ...])
    entry = load_cached(data_dir, key, n_files)   # None when missing or unusable
    if entry is None:
        save_cached(data_dir, key, {"images": images, "kept": kept, "skipped": [...]})

Files live at ``<data_dir>/tensors/<key>.pt``. The key hashes the format version, the
Pillow version (a new libjpeg may decode differently), the folder's absolute path,
image_size and every file's relative path, size and mtime_ns, so touching, adding or
removing one image gives a new key and the folder is decoded again. Old entries are not
deleted: delete the tensors/ folder to reclaim space.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import PIL
import torch

from visionrecipe.errors import VisionRecipeError
from visionrecipe.rundir import publish

FORMAT_VERSION = 1  # bump when the stored dict or the decoding changes meaning


def cache_key(root: Path, image_size: int | None, files: list[tuple[str, int, int]]) -> str:
    """sha256 hex over the version, the folder, image_size and each (relpath, size, mtime_ns)."""
    digest = hashlib.sha256()
    header = f"visionrecipe-tensors v{FORMAT_VERSION}\0pillow {PIL.__version__}\0{root}\0{image_size}\0"
    digest.update(header.encode())
    # One joined string instead of 60,000 update() calls; \0 cannot occur in a file name.
    digest.update("".join(f"{p}\0{s}\0{m}\0" for p, s, m in files).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def cache_path(data_dir: Path, key: str) -> Path:
    return data_dir / "tensors" / f"{key}.pt"


def load_cached(data_dir: Path, key: str, n_files: int) -> dict | None:
    """The stored entry, or None when absent, unreadable or inconsistent (then rebuilt)."""
    path = cache_path(data_dir, key)
    if not path.is_file():
        return None
    try:
        # weights_only: a cache file is data, never code, even if someone swapped it.
        entry = torch.load(path, map_location="cpu", weights_only=True)
        images, kept, skipped = entry["images"], entry["kept"], entry["skipped"]
        ok = (
            entry.get("version") == FORMAT_VERSION
            and images.dtype == torch.uint8
            and images.dim() == 4
            and kept.dtype == torch.bool
            and len(kept) == n_files
            and int(kept.sum()) == len(images)
            and len(skipped) == n_files - len(images)
        )
    except Exception as exc:  # truncated zip, wrong pickle, missing key: all mean "rebuild"
        warnings.warn(f"ignoring unreadable cache file {path} ({type(exc).__name__}); decoding again")
        return None
    if not ok:
        warnings.warn(f"ignoring inconsistent cache file {path}; decoding again")
        return None
    entry["skipped"] = [(str(p), str(r)) for p, r in skipped]
    return entry


def save_cached(data_dir: Path, key: str, entry: dict) -> None:
    """Write atomically (temp file, then rundir.publish); a failure only costs the next run time."""
    path = cache_path(data_dir, key)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save({"version": FORMAT_VERSION, **entry}, f)  # streamed: a CIFAR cache is 150 MB
        publish(tmp_name, path)
        tmp_name = None
    except (OSError, VisionRecipeError) as exc:  # publish names the file in a VisionRecipeError
        warnings.warn(f"could not write tensor cache {path}: {exc}")
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)
