"""Image decoding: one function for one file, a process pool for a whole dataset.

Usage::

    from visionrecipe.data.decode import read_image, decode_files, iter_decoded, resize_images

    image = read_image("cat.jpg", image_size=32)          # uint8 3×32×32, as in training
    images, kept, skipped = decode_files(paths, image_size=None, workers=None, progress=True)
    for rows, block, failed in iter_decoded(paths, image_size=32, workers=None, progress=True): ...
    images = resize_images(images, 64)                      # uint8 N×C×64×64 via the same PIL resize
    size, note = choose_image_size(paths)                   # the storage size of a mixed folder

Every image goes through ``data/pil.py``'s ``decode_pil`` (training, ``predict``, the ONNX path
and the server alike): EXIF orientation applied, every mode turned into RGB (or L for one
channel), then the shorter side resized and the centre square kept (never squashed).
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from visionrecipe.data.pil import decode_pil, image_shape, read_image_array, unreadable_reason
from visionrecipe.errors import VisionRecipeError

CHUNK_FILES = 500  # files per worker task: big enough to amortise IPC, small for the bar
MIN_FILES_FOR_POOL = 1000  # below this, starting workers costs more than it saves
MAX_WARNINGS = 10  # name at most this many skipped files, then summarise
SIZE_PROBES = 512  # headers read (evenly spaced over the files) to choose a mixed folder's size
# A mixed folder with no --image-size is stored at its median shorter side, but at most this:
# 160 px keeps a CPU run in minutes (photos of 4,000 px would otherwise be stored whole).
MAX_CHOSEN_SIZE = 160


class _Unreadable(Exception):
    """A file PIL could not decode; the message is the one-line reason."""


def _decode_array(path: str, image_size: int | None, channels: int) -> np.ndarray:
    """Decode one file into a uint8 H×W×C array; raise _Unreadable on bad data."""
    try:
        array = decode_pil(path, image_size, channels)
    except FileNotFoundError:
        raise
    except Exception as exc:  # the caller names the file
        raise _Unreadable(unreadable_reason(exc, path)) from exc
    return array[:, :, None] if array.ndim == 2 else array


def check_image_size(image_size: int | None) -> int | None:
    """Validate --image-size where it enters."""
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise VisionRecipeError(f"image_size must be a positive integer, got {image_size!r}")
    return image_size


def read_image(path_or_bytes, *, image_size: int | None, channels: int = 3) -> torch.Tensor:
    """Decode one image file (path or bytes) into a uint8 C×H×W tensor, as the dataset does."""
    check_image_size(image_size)
    array = read_image_array(path_or_bytes, image_size=image_size, channels=channels)
    # A copy: PIL's buffer may be read-only, and torch wants tensors it may write to.
    return torch.from_numpy(np.array(array, order="C"))


def probe_shapes(paths: list[str]) -> list[tuple[int, int]]:
    """(width, height) from the headers of up to SIZE_PROBES files evenly spaced over `paths`."""
    step = max(1, len(paths) // SIZE_PROBES)
    shapes = []
    for path in paths[::step][:SIZE_PROBES]:
        try:
            shapes.append(image_shape(path))
        except Exception:  # unreadable files are the decoder's to report
            continue
    return shapes


def median_shorter_side(paths: list[str]) -> int | None:
    """The median shorter side of the probed files' headers (None: none readable)."""
    shorter = sorted(min(shape) for shape in probe_shapes(paths))
    return shorter[len(shorter) // 2] if shorter else None


def choose_image_size(paths: list[str], limit: int = MAX_CHOSEN_SIZE) -> tuple[int | None, str | None]:
    """(storage size, a one-line note or None) for files decoded without --image-size.

        size, note = choose_image_size(paths)   # (32, None) for a folder of 32×32 images

    Headers only (no decode), of up to SIZE_PROBES files evenly spaced: when all are the same
    square, that size (nothing is resized); otherwise the median shorter side, at most `limit`,
    and the note says so. Images the sample missed are resized to it like any other.
    """
    shapes = probe_shapes(paths)
    if not shapes:
        return None, None
    if len(set(shapes)) == 1 and shapes[0][0] == shapes[0][1]:
        return shapes[0][0], None
    shorter = sorted(min(shape) for shape in shapes)
    size = max(1, min(limit, shorter[len(shorter) // 2]))
    sides = sorted({side for shape in shapes for side in shape})
    found = (f"images are {shapes[0][0]}x{shapes[0][1]}" if len(set(shapes)) == 1 else
             f"images differ in size ({sides[0]} to {sides[-1]} px, median shorter side {shorter[len(shorter) // 2]})")
    note = f"{found}: storing each at {size}x{size} (shorter side resized, centre crop); --image-size sets another"
    return size, note


def _decode_chunk(task: tuple[list[str], int | None]) -> tuple:
    """Worker: decode a list of files → (block N×C×H×W or None, failures, first good index).

    With no image_size, every image must share the first one's size; a mismatch is
    returned as ("mismatch", ...) at once so the parent can raise a clear error.
    """
    paths, image_size = task
    arrays: list[np.ndarray] = []
    failed: list[tuple[int, str]] = []
    first_good = -1
    for i, path in enumerate(paths):
        try:
            array = _decode_array(path, image_size, 3)
        except (_Unreadable, OSError) as exc:  # OSError: vanished file or dangling link
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            failed.append((i, " ".join(reason.split())))
            continue
        if arrays and array.shape != arrays[0].shape:
            return ("mismatch", paths[first_good], arrays[0].shape, path, array.shape)
        if first_good < 0:
            first_good = i
        arrays.append(array)
    block = np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)) if arrays else None
    return ("ok", block, failed, first_good)


def _size_error(path_a: str, shape_a: tuple, path_b: str, shape_b: tuple) -> VisionRecipeError:
    return VisionRecipeError(
        f"images differ in size ({path_a} is {shape_a[1]}x{shape_a[0]}, {path_b} is "
        f"{shape_b[1]}x{shape_b[0]}); pass --image-size to resize them all"
    )


def default_workers(workers: int | None) -> int:
    """None → every core this process may use; validated where it enters."""
    if workers is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise VisionRecipeError(f"workers must be a non-negative integer, got {workers!r}")
    return workers


def iter_decoded(paths: list[str], *, image_size: int | None, workers: int | None, progress: bool,
                 desc: str = "decoding"):
    """Decode files in order, one chunk of CHUNK_FILES at a time → yields (rows, block, failed).

        for rows, block, failed in iter_decoded(paths, image_size=32, workers=None, progress=False):
            out[rows] = block          # rows: indices into paths of the readable files, in order
            # failed: [(index into paths, one-line reason), ...]; block is None when all failed

    Chunks go to a process pool (all cores by default) and come back in order, so a caller
    can write each block away (the disk cache) and never hold more than a few chunks. With no
    image_size every image must share the first one's size: a mismatch is a one-line error.
    """
    workers = default_workers(workers)
    chunk = CHUNK_FILES  # read at call time: tests shrink it
    tasks = [(paths[i : i + chunk], image_size) for i in range(0, len(paths), chunk)]
    first: tuple[str, tuple] | None = None  # (path, C×H×W) of the first readable image
    pool = None
    if workers > 1 and len(paths) >= MIN_FILES_FOR_POOL:
        import multiprocessing

        pool = multiprocessing.get_context().Pool(min(workers, len(tasks)))
    try:
        results = pool.imap(_decode_chunk, tasks) if pool else map(_decode_chunk, tasks)
        # disable=None: a bar only on a terminal, never \r frames in a pipe or log file
        with tqdm(total=len(paths), desc=desc, unit="img", file=sys.stderr,
                  disable=None if progress else True) as bar:
            for task_index, result in enumerate(results):
                start, count = task_index * chunk, len(tasks[task_index][0])
                if result[0] == "mismatch":
                    raise _size_error(*result[1:])
                _, block, failed, first_good = result
                if block is not None:
                    if first is None:
                        first = (paths[start + first_good], block.shape[1:])
                    elif block.shape[1:] != first[1]:
                        shape_a, shape_b = first[1][1:] + (3,), block.shape[2:] + (3,)  # H, W, C as PIL's
                        raise _size_error(first[0], shape_a, paths[start + first_good], shape_b)
                good = np.ones(count, dtype=bool)
                good[[i for i, _ in failed]] = False
                yield start + np.flatnonzero(good), block, [(start + i, reason) for i, reason in failed]
                bar.update(count)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def decode_files(
    paths: list[str], *, image_size: int | None, workers: int | None, progress: bool, desc: str = "decoding"
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Decode every file into memory → (images of readable files, kept mask over paths, skipped).

    The in-memory form of iter_decoded (the folder loader writes to the disk cache instead).
    Unreadable files are returned in ``skipped``; the caller warns or raises.
    """
    kept = np.zeros(len(paths), dtype=bool)
    skipped: list[tuple[str, str]] = []
    out: np.ndarray | None = None
    for rows, block, failed in iter_decoded(paths, image_size=image_size, workers=workers, progress=progress,
                                            desc=desc):
        skipped += [(paths[i], reason) for i, reason in failed]
        if block is not None:
            if out is None:
                out = np.empty((len(paths), *block.shape[1:]), dtype=np.uint8)
            out[rows] = block
            kept[rows] = True
    if out is None:
        size = image_size or 0
        return torch.zeros((0, 3, size, size), dtype=torch.uint8), torch.from_numpy(kept), skipped
    images = out if kept.all() else out[kept]
    return torch.from_numpy(images), torch.from_numpy(kept), skipped


def warn_skipped(skipped: list[tuple[str, str]]) -> None:
    """One warning per unreadable file, capped so a broken folder doesn't flood stderr."""
    for path, reason in skipped[:MAX_WARNINGS]:
        warnings.warn(f"skipping unreadable image {path}: {reason}", stacklevel=2)
    if len(skipped) > 1:  # the count last, where a user reading a long log sees it (one is named above)
        more = f", {len(skipped) - MAX_WARNINGS} of them not named above" if len(skipped) > MAX_WARNINGS else ""
        warnings.warn(f"skipped {len(skipped)} unreadable image(s){more}; --strict makes them an error",
                      stacklevel=2)


def resize_images(images: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """Resize a uint8 N×C×H×W tensor to image_size² with the same PIL resize as read_image."""
    if image_size is None or tuple(images.shape[2:]) == (image_size, image_size):
        return images
    channels = images.shape[1]
    out = np.empty((len(images), channels, image_size, image_size), dtype=np.uint8)
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        pil = Image.fromarray(image[:, :, 0] if channels == 1 else image)
        resized = np.asarray(pil.resize((image_size, image_size), Image.Resampling.BILINEAR))
        out[i] = resized[None] if channels == 1 else resized.transpose(2, 0, 1)
    return torch.from_numpy(out)
