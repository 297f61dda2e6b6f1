"""A folder of class subfolders, read the way torchvision's ImageFolder reads it.

Usage::

    from visionrecipe.data.folder import load_folder

    dataset = load_folder("~/pets", "~/pets", data_dir=Path("~/.cache/visionrecipe").expanduser(),
                          image_size=None, val_fraction=0.1, seed=0, strict=False,
                          progress=True, workers=None)

Layouts:

* ``root/train/<class>/...`` with ``root/test/`` and/or ``root/val/``: those are the
  splits (``val/`` is the test split when there is no ``test/``; with both, ``val/`` is
  the validation split). ``root/train/`` alone is pooled and split like a flat folder.
* ``root/<class>/...``: pooled, a stratified ``val_fraction`` (0.1 when 0) becomes the
  test split with seed 0, whatever --seed says, so the test set never moves.

Classes are ``sorted`` subfolder names of train and labels follow ImageFolder's file
order (classes in order, ``os.walk`` sorted, files sorted), so both agree exactly.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from visionrecipe.data.cache import load_records
from visionrecipe.data.decode import median_shorter_side, warn_skipped
from visionrecipe.data.split import Dataset, Split, finish_dataset, stratified_split, subset
from visionrecipe.errors import VisionRecipeError

# The image types of torchvision's IMG_EXTENSIONS that matter for photos; lower-cased match.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TEST_SEED = 0  # the flat-layout test carve never depends on --seed


@dataclass
class _Listing:
    """Every image file of the folder, in ImageFolder order, before decoding."""

    classes: list[str] = field(default_factory=list)
    relpaths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)  # "train", "val", "test" or "pool"
    stats: list[tuple[int, int]] = field(default_factory=list)  # (size, mtime_ns)


def _class_dirs(base: Path) -> list[str]:
    # Exactly torchvision's find_classes, so label indices agree with ImageFolder.
    return sorted(entry.name for entry in os.scandir(base) if entry.is_dir())


def _walk(top: str):
    """(dirpath, filenames) of top and every folder below it, like os.walk(top, followlinks=True),
    but entering each folder once and never following a link back into an ancestor.

        for dirpath, filenames in sorted(_walk("pets/cat")): ...

    ImageFolder follows symlinks, so we do too (a class folder may link to images elsewhere); but
    a link such as ``cat/loop -> ..`` made os.walk list the whole tree again under cat (wrong
    labels, train images in test) and two such links never finished. Folders are told apart by
    (st_dev, st_ino), which a link shares with its target.
    """
    seen: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) → the path it was listed under
    pending = [top]
    while pending:
        dirpath = pending.pop()
        try:
            stat = os.stat(dirpath)
            entries = sorted(os.scandir(dirpath), key=lambda entry: entry.name, reverse=True)
        except OSError:  # unreadable or vanished: skipped, as os.walk does
            continue
        first = seen.setdefault((stat.st_dev, stat.st_ino), dirpath)
        if first != dirpath:
            warnings.warn(f"skipping {dirpath}: the same folder as {first}, already listed", stacklevel=2)
            continue
        filenames = []
        for entry in entries:  # reversed, so the stack pops them in name order
            try:
                is_dir = entry.is_dir()  # follows links, as ImageFolder does
            except OSError:
                is_dir = False
            if not is_dir:
                filenames.append(entry.name)
            elif entry.is_symlink() and _is_ancestor(os.path.realpath(entry.path), os.path.realpath(dirpath)):
                warnings.warn(f"not following symlink {entry.path}: it points back to {os.path.realpath(entry.path)}, "
                              "which would list those images again", stacklevel=2)
            else:
                pending.append(entry.path)
        yield dirpath, filenames


def _is_ancestor(folder: str, path: str) -> bool:
    """True when real path `folder` is `path` or one of the folders above it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _scan_part(root: Path, part_dir: Path, part: str, classes: list[str], listing: _Listing) -> None:
    """Add every image of part_dir/<class>/ (recursively, ImageFolder order) to listing."""
    index = {name: i for i, name in enumerate(classes)}
    prefix_len = len(str(root)) + 1
    names = _class_dirs(part_dir)
    if not names:
        raise VisionRecipeError(f"folder {part_dir} has no class subfolders")
    for name in names:
        if name not in index:
            raise VisionRecipeError(f"class folder {part_dir / name} is not among the training classes")
        class_dir = part_dir / name
        target = os.path.realpath(class_dir)
        if _is_ancestor(target, os.path.realpath(part_dir)):
            raise VisionRecipeError(f"class folder {class_dir} is a link to {target}, which holds it: remove the link")
        found = 0
        for dirpath, filenames in sorted(_walk(str(class_dir))):
            for filename in sorted(filenames):
                if not filename.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = os.path.join(dirpath, filename)
                try:
                    stat = os.stat(path)
                except OSError:  # dangling symlink: let the decoder report it as unreadable
                    stat = None
                listing.relpaths.append(path[prefix_len:])
                listing.labels.append(index[name])
                listing.parts.append(part)
                listing.stats.append((stat.st_size, stat.st_mtime_ns) if stat else (-1, -1))
                found += 1
        if not found:
            raise VisionRecipeError(
                f"class folder {class_dir} has no images ({', '.join(IMAGE_EXTENSIONS)})"
            )


def _scan(root: Path) -> _Listing:
    """Find the layout and list every image file; all folder errors are raised here."""
    subdirs = _class_dirs(root)
    if not subdirs:
        has_files = any(entry.is_file() for entry in os.scandir(root))
        if has_files:
            raise VisionRecipeError(
                f"folder {root} has no class subfolders: put each class's images in a subfolder named after it"
            )
        raise VisionRecipeError(f"folder {root} is empty")
    if "train" in subdirs:
        parts = {p: root / p for p in ("train", "val", "test") if p in subdirs}
        if "test" not in parts and "val" in parts:
            parts = {"train": parts["train"], "test": parts["val"]}  # val/ serves as test
        if len(parts) == 1:
            parts = {"pool": parts["train"]}  # train/ alone: split it like a flat folder
    elif "test" in subdirs or "val" in subdirs:
        raise VisionRecipeError(f"folder {root} has test/ or val/ but no train/ subfolder")
    else:
        parts = {"pool": root}
    first = parts.get("train", parts.get("pool"))
    listing = _Listing(classes=_class_dirs(first))
    for part, part_dir in parts.items():
        _scan_part(root, part_dir, part, listing.classes, listing)
    return listing


def describe_folder(root: Path) -> tuple[int, int | None]:
    """(training images, median shorter side in px) of a folder, from its listing and up to
    SIZE_PROBES image headers: what a budget plan needs before anything is decoded. A folder
    without train/ counts all its images (the test share carved later is small)."""
    root = root.expanduser().resolve()
    listing = _scan(root)
    train = [rel for rel, part in zip(listing.relpaths, listing.parts) if part in ("train", "pool")]
    return len(train), median_shorter_side([os.path.join(root, rel) for rel in train])


def _absolute(root: Path, relpaths: list[str]) -> list[str]:
    prefix = str(root) + os.sep  # plain strings: Path joins cost 5 µs each, 0.3 s for CIFAR
    return [prefix + p for p in relpaths]


def _decode_or_load(root: Path, listing: _Listing, data_dir: Path, image_size, progress, workers, plan):
    """(images of readable files, kept mask, skipped, decode_seconds, from_cache, cache), through
    the disk cache: only files new or changed since the last call are decoded."""
    loaded = load_records(root, listing.relpaths, listing.stats, source=str(root), data_dir=data_dir,
                          image_size=image_size, progress=progress, workers=workers, desc=f"decoding {root.name}",
                          plan=plan)
    return loaded.images, loaded.kept, loaded.skipped, loaded.seconds, loaded.decoded == 0, loaded.cache


def load_folder(
    spec: str, root: Path, *, data_dir: Path, image_size, val_fraction, seed, strict, progress, workers, plan=None
) -> Dataset:
    """Read (or fetch from cache) a folder dataset and divide it into splits.

    The keyword arguments are load_dataset's, already validated, passed straight through.
    """
    if not root.exists():
        raise VisionRecipeError(f"no such folder: {root.absolute()}")
    if not root.is_dir():
        raise VisionRecipeError(f"expected a folder of class subfolders, got a file: {root}")
    root = root.resolve()
    listing = _scan(root)
    images, kept, skipped, seconds, from_cache, cache = _decode_or_load(
        root, listing, data_dir, image_size, progress, workers, plan
    )
    if strict and skipped:
        path, reason = skipped[0]
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise VisionRecipeError(f"unreadable image {path}: {reason}{more}")
    warn_skipped(skipped)  # also when served from cache: the folder is still broken

    labels = torch.tensor(listing.labels, dtype=torch.int64)[kept]
    paths = _absolute(root, [p for p, k in zip(listing.relpaths, kept.tolist()) if k])
    parts = [p for p, k in zip(listing.parts, kept.tolist()) if k]
    everything = Split(images, labels, paths)

    def part(name: str) -> Split | None:
        rows = torch.tensor([i for i, p in enumerate(parts) if p == name], dtype=torch.int64)
        return subset(everything, rows) if len(rows) else None

    if "pool" in listing.parts:
        if len(everything) == 0:
            raise VisionRecipeError(f"no readable images in {root}")
        keep, held = stratified_split(labels, val_fraction or 0.1, TEST_SEED)
        if len(held) == 0:
            raise VisionRecipeError(f"too few images in {root} to carve a test split: need 2 per class")
        train, test, own_val = subset(everything, keep), subset(everything, held), None
    else:
        empty = Split(torch.zeros((0, *images.shape[1:]), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), [])
        train, test, own_val = part("train") or empty, part("test") or empty, part("val")
        if own_val is None and "val" in listing.parts:
            own_val = empty  # val/ exists but nothing in it was readable
    return finish_dataset(
        spec,
        listing.classes,
        train,
        test,
        own_val=own_val,
        val_fraction=val_fraction,
        seed=seed,
        skipped=skipped,
        decode_seconds=seconds,
        from_cache=from_cache,
        cache=cache,
    )
