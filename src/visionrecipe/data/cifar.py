"""CIFAR-10 and CIFAR-100 from the official "python version" pickles.

Usage::

    from visionrecipe.data.cifar import find_cifar, is_cifar_folder, read_cifar_folder

    folder = find_cifar("cifar10", Path("~/.cache/visionrecipe").expanduser())  # downloads if absent
    classes, (train_x, train_y), (test_x, test_y) = read_cifar_folder(folder)

An extracted ``cifar-10-batches-py`` / ``cifar-100-python`` folder under data_dir is read
with our own reader, never through torchvision, so a folder copied by hand (or one whose
archive md5 torchvision would dispute) just works; torchvision is only the downloader.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from visionrecipe.errors import VisionRecipeError

_LAYOUTS = {
    # name: (folder, train files, test file, meta file, class-names key, labels key, archive)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
        "label_names",
        "labels",
        "cifar-10-python.tar.gz",
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        "test",
        "meta",
        "fine_label_names",
        "fine_labels",
        "cifar-100-python.tar.gz",
    ),
}
_URL = "https://www.cs.toronto.edu/~kriz/"


def cifar_kind(folder: Path) -> str | None:
    """"cifar10" / "cifar100" when folder holds that format's metadata file, else None."""
    if (folder / "batches.meta").is_file() and (folder / "test_batch").is_file():
        return "cifar10"
    if (folder / "meta").is_file() and (folder / "train").is_file() and (folder / "test").is_file():
        return "cifar100"
    return None


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise VisionRecipeError(f"missing CIFAR file {path}")
    try:
        with open(path, "rb") as f:
            # Unpickling runs code from the file; acceptable only because these are the
            # official CIFAR files (distributed solely as pickles) that the user chose.
            # encoding="bytes": they were written by Python 2, so keys come back as bytes.
            return pickle.load(f, encoding="bytes")
    except Exception as exc:
        raise VisionRecipeError(f"unreadable CIFAR file {path}: {type(exc).__name__}") from None


def _get(record: dict, key: str, path: Path):
    """record[key] with str or bytes keys (Python 2 pickles have bytes keys)."""
    for candidate in (key, key.encode()):
        if candidate in record:
            return record[candidate]
    raise VisionRecipeError(f"CIFAR file {path} has no '{key}' entry")


def _read_batches(folder: Path, names: list[str], labels_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in names:
        path = folder / name
        record = _unpickle(path)
        data = np.asarray(_get(record, "data", path), dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise VisionRecipeError(f"CIFAR file {path} has data of shape {data.shape}, expected N×3072")
        # Rows are 1024 red, then 1024 green, then 1024 blue values: N×3×32×32 directly.
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(_get(record, labels_key, path), dtype=np.int64))
        if len(labels[-1]) != len(data):
            raise VisionRecipeError(f"CIFAR file {path} has {len(data)} images but {len(labels[-1])} labels")
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def read_cifar_folder(folder: Path):
    """→ (classes, (train images, labels), (test images, labels)) from an extracted folder."""
    kind = cifar_kind(folder)
    if kind is None:
        raise VisionRecipeError(f"{folder} is not an extracted CIFAR-10/100 python folder")
    _, train_names, test_name, meta_name, names_key, labels_key, _ = _LAYOUTS[kind]
    meta_path = folder / meta_name
    names = _get(_unpickle(meta_path), names_key, meta_path)
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    train = _read_batches(folder, train_names, labels_key)
    test = _read_batches(folder, [test_name], labels_key)
    for split_labels in (train[1], test[1]):
        if len(split_labels) and not 0 <= int(split_labels.min()) <= int(split_labels.max()) < len(classes):
            raise VisionRecipeError(f"CIFAR folder {folder} has labels outside its {len(classes)} classes")
    return classes, train, test


def find_cifar(name: str, data_dir: Path) -> Path:
    """The extracted folder under data_dir, downloading it with torchvision when absent."""
    folder_name, *_, archive = _LAYOUTS[name]
    folder = data_dir / folder_name
    if folder.is_dir():
        return folder
    try:
        import torchvision.datasets

        dataset_class = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        dataset_class(root=str(data_dir), download=True)
    except Exception as exc:  # offline, proxy, disk full, md5 mismatch: one message for all
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise VisionRecipeError(
            f"{name} not found in {data_dir} and the download failed ({reason}); download "
            f"{_URL}{archive} and extract it into {data_dir} (giving {folder})"
        ) from None
    if not folder.is_dir():
        raise VisionRecipeError(f"download of {name} did not produce {folder}")
    return folder
