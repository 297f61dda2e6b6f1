"""A CSV manifest of images and their labels: the data of a multilabel task.

Usage::

    from visionrecipe.data import load_dataset

    data = load_dataset("~/photos/labels.csv", image_size=64)   # dispatched here by the .csv suffix
    data.classes                   # every label named in the file, sorted
    data.train.labels              # float32 N×C multi-hot (1.0 where the image has the label)

Format, one row per image: ``path,labels`` with the labels separated by ``;`` (empty: none of
them), e.g. ``beach/001.jpg,sea;sky``. Paths are relative to the CSV's folder and must stay in it:
``../`` or an absolute path elsewhere is an error unless ``allow_outside_paths`` (the
``--allow-outside-paths`` flag) is set, so a manifest someone sent you reads only the files that
came with it (the check is on the path as written; a symlink inside the folder is followed).
A header row ``path,labels`` is optional, and so is a third column ``split`` (train, val or
test) that fixes the splits. Without it the test split is a random ``val_fraction`` (0.1 when
0) drawn with seed 0, so it never moves with --seed, and validation a random ``val_fraction``
of the rest drawn with --seed. Random, not stratified: there is no single label to stratify by.
Images are decoded once and cached in ``<data_dir>/tensors/`` like a folder's; the labels are
read from the CSV every time, so editing them needs no decode.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

from visionrecipe.data.cache import load_records
from visionrecipe.data.decode import warn_skipped
from visionrecipe.data.split import Dataset, Split, subset
from visionrecipe.errors import VisionRecipeError

SPLITS = ("train", "val", "test")
TEST_SEED = 0  # the test carve never depends on --seed
LABEL_SEPARATOR = ";"


def read_manifest(path: Path) -> tuple[list[str], list[list[str]], list[str] | None]:
    """(paths as written, label names per row, split per row or None) of a manifest file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise VisionRecipeError(f"cannot read manifest {path}: {exc}") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "labels"]:
        header = [c.strip().lower() for c in rows[0]]
        rows = rows[1:]
        split_column = header.index("split") if "split" in header else None
    else:
        split_column = 2 if rows and len(rows[0]) > 2 else None
    if not rows:
        raise VisionRecipeError(f"manifest {path} lists no images (expected rows of: path,label1;label2)")
    files, labels, splits = [], [], []
    for number, row in enumerate(rows, start=1):
        if len(row) < 2:
            raise VisionRecipeError(f"manifest {path}, row {number}: expected path,labels, got {','.join(row)!r}")
        files.append(row[0].strip())
        labels.append([name.strip() for name in row[1].split(LABEL_SEPARATOR) if name.strip()])
        if split_column is not None:
            split = row[split_column].strip().lower() if len(row) > split_column else ""
            if split not in SPLITS:
                raise VisionRecipeError(f"manifest {path}, row {number}: split {split!r} is not train, val or test")
            splits.append(split)
    return files, labels, splits if split_column is not None else None


def multi_hot(labels: list[list[str]], classes: list[str]) -> torch.Tensor:
    """float32 N×C with 1.0 where row n names class c."""
    index = {name: i for i, name in enumerate(classes)}
    out = torch.zeros(len(labels), len(classes), dtype=torch.float32)
    for row, names in enumerate(labels):
        out[row, [index[name] for name in names]] = 1.0
    return out


def random_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, held) sorted indices, about ``fraction`` held; at least one of each when n >= 2."""
    held_count = min(max(1, round(fraction * n)), n - 1) if fraction > 0 and n >= 2 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return torch.sort(perm[held_count:]).values, torch.sort(perm[:held_count]).values


def confined_relpaths(path: Path, files: list[str], allow_outside_paths: bool = False) -> list[str]:
    """Each manifest path relative to the manifest's folder; one that leaves it is an error unless allowed.

        confined_relpaths(Path("/d/labels.csv"), ["a/1.png", "../x.png"])   # error: row 2, '../x.png'
    """
    root = path.parent
    relpaths = [os.path.relpath(os.path.join(root, os.path.expanduser(f)), root) for f in files]
    if not allow_outside_paths:
        for number, (written, rel) in enumerate(zip(files, relpaths), start=1):
            if rel == os.pardir or rel.startswith(os.pardir + os.sep):
                raise VisionRecipeError(
                    f"manifest {path}, row {number}: {written!r} is outside the manifest's folder {root}; "
                    "pass --allow-outside-paths to read images from anywhere")
    return relpaths


def _decode(path: Path, relpaths: list[str], data_dir: Path, image_size, progress, workers, plan):
    """(images, kept mask, skipped, decode seconds, from cache), through the disk cache."""
    root = path.parent
    paths = [os.path.join(root, p) for p in relpaths]
    stats = []
    for file in paths:
        try:
            stat = os.stat(file)
            stats.append((stat.st_size, stat.st_mtime_ns))
        except OSError:  # missing file: the decoder reports it as unreadable
            stats.append((-1, -1))
    # Keyed by the manifest, not its folder: a folder dataset there lists other files.
    loaded = load_records(root, relpaths, stats, source=str(path), data_dir=data_dir, image_size=image_size,
                          progress=progress, workers=workers, desc=f"decoding {root.name}", plan=plan)
    return loaded.images, loaded.kept, loaded.skipped, loaded.seconds, loaded.decoded == 0, loaded.cache


def load_manifest(spec: str, path: Path, *, data_dir: Path, image_size, val_fraction, seed, strict,
                  progress, workers, allow_outside_paths: bool = False, plan=None) -> Dataset:
    """Read a manifest and its images into a Dataset whose labels are multi-hot.

    The keyword arguments are load_dataset's, already validated, passed straight through.
    """
    if not path.is_file():
        raise VisionRecipeError(f"no such manifest file: {path}")
    path = path.resolve()
    root = path.parent
    files, labels, splits = read_manifest(path)
    classes = sorted({name for names in labels for name in names})
    if not classes:
        raise VisionRecipeError(f"manifest {path} names no labels (the second column, ';'-separated)")
    relpaths = confined_relpaths(path, files, allow_outside_paths)
    images, kept, skipped, seconds, from_cache, cache = _decode(path, relpaths, data_dir, image_size, progress,
                                                                 workers, plan)
    if strict and skipped:
        bad, reason = skipped[0]
        raise VisionRecipeError(f"unreadable image {bad}: {reason}"
                                + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""))
    warn_skipped(skipped)
    keep = kept.tolist()
    targets = multi_hot([names for names, k in zip(labels, keep) if k], classes)
    everything = Split(images, targets, [os.path.join(root, p) for p, k in zip(relpaths, keep) if k])
    if len(everything) == 0:
        raise VisionRecipeError(f"no readable images in manifest {path}")
    train, val, test = _splits(everything, [s for s, k in zip(splits, keep) if k] if splits else None,
                               val_fraction, seed)
    if len(train) == 0 or len(test) == 0:
        raise VisionRecipeError(f"manifest {path} leaves no {'training' if len(train) == 0 else 'test'} images")
    val_source = "none" if val is None else ("folder" if splits and "val" in splits else "carved")
    return Dataset(spec=spec, classes=classes, train=train, val=val, test=test, val_source=val_source,
                   skipped=list(skipped), decode_seconds=seconds, from_cache=from_cache, cache=cache[0],
                   cache_reason=cache[1])


def _splits(everything: Split, splits: list[str] | None, val_fraction: float, seed: int):
    """(train, val or None, test): the manifest's own split column, else seeded random carves."""
    def rows(name: str) -> torch.Tensor:
        return torch.tensor([i for i, s in enumerate(splits) if s == name], dtype=torch.int64)

    if splits is not None:
        if not len(rows("test")):
            raise VisionRecipeError("the manifest's split column marks no image as test")
        train, test = subset(everything, rows("train")), subset(everything, rows("test"))
        if len(rows("val")):
            return train, subset(everything, rows("val")), test
    else:
        keep, held = random_split(len(everything), val_fraction or 0.1, TEST_SEED)
        train, test = subset(everything, keep), subset(everything, held)
    keep, held = random_split(len(train), val_fraction, seed)
    if len(held) == 0:
        return train, None, test
    return subset(train, keep), subset(train, held), test
