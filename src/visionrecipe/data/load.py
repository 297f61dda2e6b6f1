"""Which loader a --data spec names, and the normalisation statistics of the images.

Usage::

    from visionrecipe.data.load import load_dataset, channel_stats

    data = load_dataset("~/pets", image_size=64, val_fraction=0.1, seed=0)
    mean, std = channel_stats(data.train.images)    # 0–1 units, for normalisation
    data = load_dataset("~/pets", cache="disk")     # splits stay on disk: data.train.images is MappedImages

A named dataset (digits, CIFAR) or an extracted CIFAR folder is read as tensors; a .csv is a
multilabel manifest (manifest.py); any other folder is a folder of class subfolders (folder.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from visionrecipe.data.cache import CachePlan, MappedImages
from visionrecipe.data.cifar import cifar_kind, find_cifar, read_cifar_folder
from visionrecipe.data.decode import check_image_size, resize_images
from visionrecipe.data.folder import load_folder
from visionrecipe.data.split import Dataset, Split, check_fraction, finish_dataset
from visionrecipe.errors import VisionRecipeError

NAMED_DATASETS = ("digits", "cifar10", "cifar100")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("~", ".")) or "/" in spec or os.sep in spec


def load_dataset(
    spec: str,
    *,
    data_dir: str | os.PathLike = "~/.cache/visionrecipe",
    image_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    strict: bool = False,
    progress: bool = True,
    workers: int | None = None,
    allow_outside_paths: bool = False,
    cache: str = "auto",
    device_free: int | None = None,
) -> Dataset:
    """Load the dataset a --data spec names; every user error is a one-line VisionRecipeError.

    allow_outside_paths: a .csv manifest may name images outside its own folder (../, absolute).
    cache: memory, disk or auto (--cache), decided before decoding from the images' size, the
    free RAM and `device_free` (the training GPU's free bytes); Dataset.cache says what was chosen.
    A folder or manifest kept on disk has MappedImages splits; digits and CIFAR are small
    tensors in RAM either way (on disk they are fed to the device batch by batch as well).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise VisionRecipeError(f"empty --data spec: expected {', '.join(NAMED_DATASETS)} or a folder")
    check_image_size(image_size)
    val_fraction = check_fraction(val_fraction)
    data_dir = Path(data_dir).expanduser()
    options = dict(val_fraction=val_fraction, seed=seed, plan=CachePlan(cache, device_free))
    if spec in NAMED_DATASETS:
        return _load_named(spec, data_dir, image_size, options)
    path = Path(spec).expanduser()
    if path.is_dir() and cifar_kind(path) is not None:
        return _load_tensors(spec, path, image_size, options)
    if path.suffix.lower() == ".csv" and not path.is_dir():
        from visionrecipe.data.manifest import load_manifest  # multilabel: path,label1;label2 rows

        return load_manifest(spec, path, data_dir=data_dir, image_size=image_size, strict=strict,
                             progress=progress, workers=workers, allow_outside_paths=allow_outside_paths, **options)
    if path.exists() or _looks_like_path(spec):
        return load_folder(
            spec, path, data_dir=data_dir, image_size=image_size, strict=strict,
            progress=progress, workers=workers, **options,
        )  # fmt: skip
    raise VisionRecipeError(
        f"unknown dataset '{spec}': expected digits, cifar10, cifar100, or a folder of class subfolders"
    )


# Training images and side of the named datasets (digits: 1,797 less the test quarter).
NAMED_SIZES = {"digits": (1347, 8), "cifar10": (50000, 32), "cifar100": (50000, 32)}


def describe_dataset(spec: str) -> tuple[int, int | None] | None:
    """(training images, median shorter side in px) of a --data spec, without decoding anything:
    what the budget policy (train/plan.py) needs to choose a resolution before the data is stored.
    None for what it cannot describe cheaply (a CSV manifest, a spec that does not exist yet:
    loading it says what is wrong)."""
    if spec in NAMED_SIZES:
        return NAMED_SIZES[spec]
    path = Path(spec).expanduser()
    if not path.is_dir():
        return None
    if cifar_kind(path) is not None:
        return NAMED_SIZES["cifar10"]
    from visionrecipe.data.folder import describe_folder

    try:
        return describe_folder(path)
    except VisionRecipeError:
        return None  # loading the folder reports the problem, in its words


def _load_named(spec: str, data_dir: Path, image_size: int | None, options: dict) -> Dataset:
    if spec == "digits":
        from visionrecipe.data.digits import load_digits_tensors

        started = time.perf_counter()
        classes, train, test = load_digits_tensors()
        return _finish_tensors(spec, classes, train, test, image_size, started, options)
    return _load_tensors(spec, find_cifar(spec, data_dir), image_size, options)


def _load_tensors(spec: str, folder: Path, image_size: int | None, options: dict) -> Dataset:
    started = time.perf_counter()
    classes, train, test = read_cifar_folder(folder)
    return _finish_tensors(spec, classes, train, test, image_size, started, options)


def _finish_tensors(spec, classes, train, test, image_size, started, options) -> Dataset:
    """Tensor datasets (digits, CIFAR): optional resize, then the shared split rules."""
    splits = [Split(resize_images(x, image_size).contiguous(), y.contiguous()) for x, y in (train, test)]
    seconds = time.perf_counter() - started
    plan = options.pop("plan")
    cache = plan.decide(len(splits[0]) + len(splits[1]), tuple(splits[0].images.shape[1:]))
    return finish_dataset(spec, classes, *splits, decode_seconds=seconds, cache=cache, **options)


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (population) of uint8 N×C×H×W images, in 0–1 units.

    Works through chunks of about 4M values so 50,000 CIFAR images never get a float
    copy all at once (and a split on disk, MappedImages, is read one chunk at a time);
    sums are float64, exact for integer pixels at this scale.
    """
    if not isinstance(images, (torch.Tensor, MappedImages)) or images.dtype != torch.uint8 or images.dim() != 4:
        raise VisionRecipeError("channel_stats expects a uint8 N×C×H×W tensor")
    if images.numel() == 0:
        raise VisionRecipeError("channel_stats needs at least one non-empty image")
    per_image = images[0].numel()
    step = max(1, 4_000_000 // per_image)
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, len(images), step):
        chunk = images[start : start + step].to(torch.float64)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp(min=0).sqrt()
    return (mean / 255).tolist(), (std / 255).tolist()
