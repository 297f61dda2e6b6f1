"""CIFAR-10 and CIFAR-100 from the official "python version" pickles.

Usage::

    from visionrecipe.data.cifar import find_cifar, is_cifar_folder, read_cifar_folder

    folder = find_cifar("cifar10", Path("~/.cache/visionrecipe").expanduser())  # downloads if absent
    classes, (train_x, train_y), (test_x, test_y) = read_cifar_folder(folder)

An extracted ``cifar-10-batches-py`` / ``cifar-100-python`` folder under data_dir is read
with our own reader, never through torchvision, so a folder copied by hand (or one whose
archive md5 torchvision would dispute) just works; torchvision is only the downloader.

The files are pickles, and a pickle can name any Python callable to run while loading. They are
read with an unpickler that knows only what the official files hold (dicts, lists, bytes, str,
ints and numpy's array reconstruction), so a crafted ``batches.meta`` is refused, never run.
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


# The only globals the official CIFAR pickles (and numpy arrays pickled by Python 3) refer to;
# dicts, lists, str and ints are opcodes. numpy moved core to _core in 2.0: both names occur.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2: encode(str, "latin1")
}


class _Refused(pickle.UnpicklingError):
    """The pickle names a callable outside _ALLOWED_GLOBALS."""


class _ArraysOnly(pickle.Unpickler):
    """pickle.Unpickler that builds containers and numpy arrays and refuses every other global.

        record = _ArraysOnly(f, encoding="bytes").load()
    """

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """The dict a CIFAR file holds; anything that is not plain data is a one-line error."""
    if not path.is_file():
        raise VisionRecipeError(f"missing CIFAR file {path}")
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the official files were written by Python 2; keys come back as bytes.
            record = _ArraysOnly(f, encoding="bytes").load()
    except _Refused as exc:
        raise VisionRecipeError(
            f"refusing CIFAR file {path}: it would call {exc}, which no CIFAR file does (a crafted pickle?)"
        ) from None
    except Exception as exc:
        raise VisionRecipeError(f"unreadable CIFAR file {path}: {type(exc).__name__}") from None
    if not isinstance(record, dict):
        raise VisionRecipeError(f"CIFAR file {path} holds a {type(record).__name__}, expected a dict")
    return record


def _array(value, dtype, path: Path, key: str) -> np.ndarray:
    """value as a numpy array of dtype; object arrays and non-numbers are one-line errors."""
    try:
        if isinstance(value, np.ndarray) and value.dtype == object:
            raise TypeError("object array")
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise VisionRecipeError(f"CIFAR file {path} has a '{key}' entry that is not an array of numbers") from None


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
        data = _array(_get(record, "data", path), np.uint8, path, "data")
        if data.ndim != 2 or data.shape[1] != 3072:
            raise VisionRecipeError(f"CIFAR file {path} has data of shape {data.shape}, expected N×3072")
        # Rows are 1024 red, then 1024 green, then 1024 blue values: N×3×32×32 directly.
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(_array(_get(record, labels_key, path), np.int64, path, labels_key))
        if labels[-1].shape != (len(data),):
            raise VisionRecipeError(f"CIFAR file {path} has {len(data)} images but {labels[-1].size} labels")
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def read_cifar_folder(folder: Path):
    """→ (classes, (train images, labels), (test images, labels)) from an extracted folder."""
    kind = cifar_kind(folder)
    if kind is None:
        raise VisionRecipeError(f"{folder} is not an extracted CIFAR-10/100 python folder")
    _, train_names, test_name, meta_name, names_key, labels_key, _ = _LAYOUTS[kind]
    meta_path = folder / meta_name
    names = _get(_unpickle(meta_path), names_key, meta_path)
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise VisionRecipeError(f"CIFAR file {meta_path} has a '{names_key}' entry that is not a list of names")
    classes = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
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
