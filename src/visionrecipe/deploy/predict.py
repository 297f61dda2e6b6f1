"""Predict classes for image files with a run directory or an exported ``.onnx`` file.

    rows = predict("runs/digits", ["a.png", "photos/", "*.jpg"], topk=3)
    rows = predict("runs/digits/model.onnx", ["a.png"])        # onnxruntime; never imports torch
    rows = predict("runs/digits/model.torchscript.pt", ["a.png"])   # a TorchScript export
    # [{"path": "a.png", "top": [{"class": "3", "probability": 0.97}, ...]}, {"path": ..., "error": "..."}]
    print(format_rows(rows, "csv"))                             # or "json", "text"

    model = load_classifier("runs/digits")      # TorchClassifier; OnnxClassifier (.onnx), TorchScriptClassifier (.pt)
    model.probabilities(np.stack([model.decode("a.png")]))

Inputs may be files, folders (searched recursively for images) or glob patterns. An unreadable
file gets an "error" entry instead of predictions; it never stops the batch. Both model kinds
share one interface (classes, input_size, name, decode, logits, probabilities), which the
HTTP service (serve.py) uses too; torch is imported only for a run directory or a TorchScript file.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from visionrecipe.errors import VisionRecipeError
from visionrecipe.deploy.onnx_runtime import ClassifierMeta, OnnxClassifier, normalize, probabilities_from_logits

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif"}
FORMATS = ("text", "json", "csv")


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


class TorchClassifier(ClassifierMeta):
    """A run directory's best model in PyTorch, preprocessing exactly as `evaluate` does."""

    backend = "pytorch"

    def __init__(self, path: str | os.PathLike, device: str = "auto"):
        from visionrecipe.models.checkpoint import load_model
        from visionrecipe.system import select_device

        self.path = os.fspath(path)
        self.model, self.meta = load_model(path)
        self.device = select_device(device)
        self.model.to(self.device)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 N×C×H×W → float32 N×classes (mirror-averaged when the run used TTA)."""
        import torch

        from visionrecipe.evaluate.scoring import predict_logits

        return predict_logits(self.model, torch.from_numpy(np.ascontiguousarray(images)), self.meta["mean"],
                              self.meta["std"], tta=self.meta.get("tta", False), device=self.device).numpy()

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return probabilities_from_logits(self.logits(images), self.meta.get("task"))


def read_torchscript(path: str | os.PathLike):
    """(module, description) of a `visionrecipe export --format torchscript` file; the description
    (classes, mean, std, input_size, ...) is the meta.json saved inside it."""
    import torch

    from visionrecipe.deploy.onnx_runtime import decode_metadata, encode_metadata

    extra = {"meta.json": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.9+ calls TorchScript deprecated
            module = torch.jit.load(os.fspath(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError) as exc:
        raise VisionRecipeError(f"{path} is not a readable TorchScript model "
                                f"({(str(exc).strip().splitlines() or ['?'])[0][:200]})") from None
    if not extra["meta.json"]:
        raise VisionRecipeError(f"{path} has no visionrecipe metadata; export it with "
                                "`visionrecipe export --format torchscript`")
    try:
        props = json.loads(extra["meta.json"])
    except ValueError as exc:
        raise VisionRecipeError(f"{path} has unreadable metadata ({exc})") from None
    return module.eval(), decode_metadata(encode_metadata(props), os.fspath(path))  # the ONNX file's checks


class TorchScriptClassifier(ClassifierMeta):
    """A TorchScript export (TTA already inside the graph), fed as the ONNX file is."""

    backend = "torchscript"

    def __init__(self, path: str | os.PathLike, device: str = "auto"):
        from visionrecipe.system import select_device

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise VisionRecipeError(f"model not found: {self.path}")
        self.module, self.meta = read_torchscript(self.path)
        self.device = select_device(device)
        self.module.to(self.device)

    def logits(self, images: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(normalize(images, self.meta["mean"], self.meta["std"])).to(self.device)
        with torch.no_grad():
            return self.module(x).float().cpu().numpy()

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return probabilities_from_logits(self.logits(images), self.meta.get("task"))


def load_classifier(model_path, device: str = "auto"):
    """A `.onnx` file runs on onnxruntime, a `.pt` TorchScript export on torch.jit; anything else
    is a run directory (or .safetensors) for PyTorch."""
    path = os.path.expanduser(str(model_path))
    if path.lower().endswith(".onnx"):
        return OnnxClassifier(path)
    if path.lower().endswith(".pt") and not os.path.isdir(path):
        return TorchScriptClassifier(path, device=device)
    return TorchClassifier(model_path, device=device)


def topk_rows(probabilities: np.ndarray, classes: list[str], k: int) -> list[list[dict]]:
    """The k most probable classes per row, most probable first."""
    k = min(k, len(classes))
    # argsort is stable on the negated values, so ties keep class order (as torch.topk does on CPU).
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[{"class": classes[int(i)], "probability": round(float(row[i]), 6)} for i in ids]
            for row, ids in zip(probabilities, order)]


def answers(model, probabilities: np.ndarray, topk: int, threshold: float | None = None) -> list[list[dict]]:
    """Per image: the top-k classes, or for a multilabel run every label above its threshold."""
    if model.meta.get("task") != "multilabel":
        return topk_rows(probabilities, model.classes, topk)
    from visionrecipe.train.tasks import labels_above

    return labels_above(probabilities, model.classes, model.meta.get("threshold", 0.5) if threshold is None else threshold)


def predict(model_path, inputs, *, topk: int = 5, batch_size: int = 64, device: str = "auto",
            progress: bool = False, threshold: float | None = None) -> list[dict]:
    """Top-k classes for every input file, in input order; unreadable files get {"path", "error"}.

    A multilabel run answers every label above ``threshold`` (default: the run's) instead of the
    top k, and names them in a "labels" list too."""
    if topk < 1:
        raise VisionRecipeError(f"invalid value for topk: {topk} (must be positive)")
    if batch_size < 1:
        raise VisionRecipeError(f"invalid value for batch_size: {batch_size} (must be positive)")
    model = load_classifier(model_path, device=device)
    files = expand_inputs(inputs)
    rows: list[dict] = []
    bar = None
    if progress and len(files) > batch_size:
        from tqdm import tqdm

        bar = tqdm(total=len(files), unit="img", leave=False, file=sys.stderr, disable=None)  # a terminal only
    for start in range(0, len(files), batch_size):
        images, good = [], []
        for path in files[start:start + batch_size]:
            try:
                images.append(model.decode(path))
                good.append(path)
            except VisionRecipeError as exc:
                rows.append({"path": path, "error": str(exc)})
            if bar is not None:
                bar.update(1)
        if images:
            for path, top in zip(good, answers(model, model.probabilities(np.stack(images)), topk, threshold)):
                rows.append({"path": path, "top": top})
                if model.meta.get("task") == "multilabel":
                    rows[-1]["labels"] = [t["class"] for t in top]
    if bar is not None:
        bar.close()
    order = {path: i for i, path in enumerate(files)}
    return sorted(rows, key=lambda row: order[row["path"]])


def format_rows(rows: list[dict], fmt: str = "text") -> str:
    """Predictions as text lines, a JSON list, or CSV (one row per image: path, class_1, probability_1, ...)."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "text":
        lines = []
        for row in rows:
            if "error" in row:
                lines.append(f"{row['path']}: error: {row['error']}")
            else:
                lines.append(f"{row['path']}: " + ", ".join(f"{t['class']} {100 * t['probability']:.1f}%"
                                                           for t in row["top"]))
        return "\n".join(lines)
    if fmt != "csv":
        raise VisionRecipeError(f"unknown output format {fmt!r} (choose {', '.join(FORMATS)})")
    k = max((len(row.get("top", ())) for row in rows), default=0)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", *[f"{name}_{i}" for i in range(1, k + 1) for name in ("class", "probability")],
                     "error"])
    for row in rows:
        cells = [value for t in row.get("top", ()) for value in (t["class"], t["probability"])]
        writer.writerow([row["path"], *cells, *[""] * (2 * k - len(cells)), row.get("error", "")])
    return buffer.getvalue().rstrip("\n")
