"""Datasets as whole uint8 tensors: digits, CIFAR-10/100, a folder of class subfolders, a CSV manifest.

Usage::

    from visionrecipe.data import load_dataset, channel_stats, read_image

    data = load_dataset("~/pets", image_size=64, val_fraction=0.1, seed=0)
    data.classes, data.train.images.shape    # ['cat', 'dog'], (N, 3, 64, 64) uint8 on CPU
    data.val_source                          # "folder", "carved" or "none"
    mean, std = channel_stats(data.train.images)    # 0–1 units, for normalisation
    x = read_image("new.jpg", image_size=64)        # same preprocessing as training

Everything stays on the CPU; the trainer moves the tensors to its device. A folder is
decoded once into ``<data_dir>/records/`` (data/cache.py) and mapped from there; only files
added or changed since are decoded again.

The modules: load.py (which loader a spec names), folder.py, manifest.py, cifar.py, digits.py
(the loaders), split.py (Dataset, Split, the validation rules), decode.py (files to tensors,
a process pool), pil.py (the one PIL decode, torch-free), cache.py (the decoded-folder cache).
The names below are imported on first use, so `visionrecipe.data.pil` can be imported without
torch (`predict model.onnx` runs on onnxruntime alone).
"""

import importlib

_HOMES = {
    "Dataset": "split",
    "Split": "split",
    "stratified_split": "split",
    "channel_stats": "load",
    "load_dataset": "load",
    "read_image": "decode",
}
__all__ = sorted(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(f"visionrecipe.data.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'visionrecipe.data' has no attribute {name!r}")
