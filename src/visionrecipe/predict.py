"""Predict classes for image files with a trained run, applying exactly its preprocessing.

    rows = predict("runs/digits", ["a.png", "photos/", "*.jpg"], topk=3)
    # [{"path": "a.png", "top": [{"class": "3", "probability": 0.97}, ...]}, {"path": ..., "error": "..."}]

Inputs may be files, folders (searched recursively for images) or glob patterns. An unreadable
file gets an "error" entry instead of predictions; it never stops the batch.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch

from .errors import VisionRecipeError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif"}


def expand_inputs(inputs) -> list[str]:
    """Files, folders and globs to a sorted-per-argument list of files; nothing found is an error."""
    files: list[str] = []
    for item in inputs:
        item = os.path.expanduser(str(item))
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise VisionRecipeError(f"no images found in folder {item}")
            files.extend(found)
        elif os.path.exists(item):
            files.append(item)
        elif glob.has_magic(item):
            found = sorted(glob.glob(item, recursive=True))
            if not found:
                raise VisionRecipeError(f"no files match {item}")
            files.extend(found)
        else:
            raise VisionRecipeError(f"input not found: {item}")
    return files


def topk_rows(probabilities: torch.Tensor, classes: list[str], k: int) -> list[list[dict]]:
    k = min(k, len(classes))
    values, indices = probabilities.topk(k, dim=1)
    return [[{"class": classes[int(i)], "probability": round(float(v), 6)} for v, i in zip(vs, ids)]
            for vs, ids in zip(values, indices)]


def predict(model_path, inputs, *, topk: int = 5, batch_size: int = 64, device: str = "auto",
            progress: bool = False) -> list[dict]:
    from .checkpoint import load_model
    from .data import read_image
    from .evaluate import predict_logits
    from .system import select_device

    if topk < 1:
        raise VisionRecipeError(f"invalid value for topk: {topk} (must be positive)")
    model, meta = load_model(model_path)
    device_t = select_device(device)
    model.to(device_t)
    channels, size = meta["input_size"][0], meta["input_size"][1]
    files = expand_inputs(inputs)
    rows: list[dict] = []
    bar = None
    if progress and len(files) > batch_size:
        from tqdm import tqdm

        bar = tqdm(total=len(files), unit="img", leave=False)
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images, good = [], []
        for path in chunk:
            try:
                images.append(read_image(path, image_size=size, channels=channels))
                good.append(path)
            except VisionRecipeError as exc:
                rows.append({"path": path, "error": str(exc)})
        if images:
            logits = predict_logits(model, torch.stack(images), meta["mean"], meta["std"],
                                    tta=meta.get("tta", False), device=device_t)
            for path, top in zip(good, topk_rows(logits.softmax(1), meta["classes"], topk)):
                rows.append({"path": path, "top": top})
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    order = {path: i for i, path in enumerate(files)}
    return sorted(rows, key=lambda row: order[row["path"]])
