"""The dataset records and how a dataset is divided into train, validation and test.

Usage::

    from visionrecipe.data.split import Split, stratified_split, subset, finish_dataset

    keep, held_out = stratified_split(labels, 0.1, seed=0)   # ~10% of every class held out
    val = subset(train, held_out)

Every loader (digits, CIFAR, folders) ends in ``finish_dataset``, so the validation rules
live in one place: the data's own val split wins, else a stratified carve from train
when ``val_fraction > 0``, else no validation split.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from visionrecipe.data.cache import MappedImages
from visionrecipe.errors import VisionRecipeError


@dataclass
class Split:
    """One split as tensors, ready to move to a device as a whole."""

    images: torch.Tensor  # uint8, N×C×H×W, contiguous, CPU; a cache.MappedImages when streamed (--cache disk)
    labels: torch.Tensor  # int64, N
    paths: list[str] | None = None  # source file of each image when read from files

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    """A loaded dataset: class names, the three splits, and where they came from."""

    spec: str  # the --data spec as given
    classes: list[str]  # class names, index = label
    train: Split
    val: Split | None
    test: Split
    val_source: str  # "folder" (data's own val/), "carved" (from train) or "none"
    skipped: list[tuple[str, str]]  # (path, reason) for unreadable image files
    decode_seconds: float  # time spent decoding (0 when served from cache)
    from_cache: bool
    cache: str = "memory"  # where the images live while training: "memory" or "disk" (--cache, resolved)
    cache_reason: str = ""  # why (cache.CachePlan.decide), for the run's first log line


def check_fraction(fraction: float, name: str = "val_fraction") -> float:
    """Validate a held-out fraction where it enters; 1.0 would leave nothing to train on."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or math.isnan(fraction):
        raise VisionRecipeError(f"{name} must be a number in [0, 1), got {fraction!r}")
    if not 0 <= fraction < 1:
        raise VisionRecipeError(f"{name} must be in [0, 1), got {fraction}")
    return float(fraction)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep_indices, held_out_indices): about ``fraction`` of each class held out.

    A class with at least two members gives at least one to the held-out side when
    fraction > 0 and always keeps at least one; a singleton class stays on the keep side.
    Both index tensors are sorted, so the original order (and thus ImageFolder's
    order) survives. Deterministic for a seed: one CPU randperm decides everything.
    """
    fraction = check_fraction(fraction, "fraction")
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    n = len(labels)
    if n == 0 or fraction == 0:
        return torch.arange(n), torch.zeros(0, dtype=torch.int64)
    generator = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=generator)
    # Group the shuffled indices by class (stable sort keeps the shuffle inside a class),
    # then each class holds out the first members of its group.
    # numpy's stable argsort: torch's is ~20x slower on CPU for 50,000 int64 labels.
    order = np.argsort(labels[perm].numpy(), kind="stable")
    grouped = perm[torch.from_numpy(order)]
    counts = torch.bincount(labels).tolist()
    held = []
    start = 0
    for count in counts:
        if count >= 2:
            # floor(x + 0.5) rather than round(): no banker's rounding surprises at .5
            n_held = min(max(1, math.floor(fraction * count + 0.5)), count - 1)
            held.append(grouped[start : start + n_held])
        start += count
    held_out = torch.sort(torch.cat(held)).values if held else torch.zeros(0, dtype=torch.int64)
    mask = torch.ones(n, dtype=torch.bool)
    mask[held_out] = False
    return torch.nonzero(mask).reshape(-1), held_out


def subset(split: Split, indices: torch.Tensor) -> Split:
    """The rows ``indices`` of a split; a contiguous range stays a view (no copy), and rows of
    a split on disk stay on disk (nothing is read)."""
    indices = torch.as_tensor(indices, dtype=torch.int64)
    n = len(indices)
    if isinstance(split.images, MappedImages):
        images, labels = split.images.subset(indices), split.labels[indices]
    elif n and int(indices[-1]) - int(indices[0]) == n - 1 and bool((indices.diff() == 1).all()):
        start, stop = int(indices[0]), int(indices[-1]) + 1
        images, labels = split.images[start:stop], split.labels[start:stop]
    else:
        images, labels = split.images[indices], split.labels[indices]
    paths = [split.paths[i] for i in indices.tolist()] if split.paths is not None else None
    return Split(images if isinstance(images, MappedImages) else images.contiguous(), labels.contiguous(), paths)


def finish_dataset(
    spec: str,
    classes: list[str],
    train: Split,
    test: Split,
    *,
    own_val: Split | None = None,
    val_fraction: float,
    seed: int,
    skipped: list[tuple[str, str]] | None = None,
    decode_seconds: float = 0.0,
    from_cache: bool = False,
    cache: tuple[str, str] = ("memory", ""),
) -> Dataset:
    """Apply the validation rules and wrap everything into a Dataset."""
    if len(train) == 0:
        raise VisionRecipeError(f"no readable training images in {spec}")
    if len(test) == 0:
        raise VisionRecipeError(f"no readable test images in {spec}")
    if own_val is not None:
        val, val_source = own_val, "folder"
    elif val_fraction > 0:
        keep, held = stratified_split(train.labels, val_fraction, seed)
        if len(held) == 0:
            # Only singleton classes: carving would take whole classes out of training.
            warnings.warn(f"{spec}: too few training images per class to carve a validation split")
            val, val_source = None, "none"
        else:
            train, val, val_source = subset(train, keep), subset(train, held), "carved"
    else:
        val, val_source = None, "none"
    return Dataset(
        spec=spec,
        classes=list(classes),
        train=train,
        val=val,
        test=test,
        val_source=val_source,
        skipped=list(skipped or []),
        decode_seconds=float(decode_seconds),
        from_cache=from_cache,
        cache=cache[0],
        cache_reason=cache[1],
    )
