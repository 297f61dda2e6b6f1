"""Run an exported ``.onnx`` model with onnxruntime, PIL and numpy only: no torch import.

    from visionrecipe.deploy.onnx_runtime import OnnxClassifier

    model = OnnxClassifier("runs/digits/model.onnx")
    model.classes, model.input_size            # from the file's metadata_props
    image = model.decode("a.png")              # uint8 C×H×W, exactly as training decoded it
    probs = model.probabilities(np.stack([image]))   # N×classes float32

The ONNX file describes itself (see ``encode_metadata``): ``classes``, ``mean``, ``std``,
``input_size`` ([C, H, W]), ``preprocess`` ({"resize": S, "crop": C}: the shorter side resized
to S, the centre C×C kept) and ``tta`` are JSON text, ``architecture`` plain text. Its input
is float32 N×C×H×W normalised as ``(pixels / 255 - mean) / std``; its output is logits, with
the mirror average already inside the graph when ``tta`` is true.

Images are decoded by ``visionrecipe.data.pil.read_image_array``, the decode training uses
(tests/test_predict.py checks they agree pixel for pixel), so a model deployed without torch
sees the pixels it was trained on.
"""

from __future__ import annotations

import json
import os

import numpy as np

from visionrecipe.data.pil import read_image_array
from visionrecipe.errors import VisionRecipeError

JSON_KEYS = ("classes", "mean", "std", "input_size", "tta", "threshold", "preprocess")
TEXT_KEYS = ("architecture", "task", "format", "preprocessing")
PREPROCESSING = ("float32 NCHW, x = (pixels / 255 - mean) / std, pixels: the shorter side resized to "
                 "preprocess.resize, then the centre preprocess.crop square (bilinear)")


def preprocess_of(meta: dict) -> dict:
    """{"resize": S, "crop": C}, the one eval policy: model.json's, or for a model saved before it
    was recorded, the square input size (a square image is decoded as it always was)."""
    if isinstance(meta.get("preprocess"), dict):
        return {"resize": int(meta["preprocess"]["resize"]), "crop": int(meta["preprocess"]["crop"])}
    return {"resize": int(meta["input_size"][1]), "crop": int(meta["input_size"][1])}


# ---------------------------------------------------------------- metadata

def describe_model(meta: dict) -> dict:
    """The deployment description of a run's model.json: what any runtime needs to feed it."""
    extra = {"threshold": float(meta.get("threshold", 0.5))} if meta.get("task") == "multilabel" else {}
    return {
        **extra,
        "format": "visionrecipe",
        "architecture": meta["architecture"],
        "task": meta.get("task", "multiclass"),
        "classes": list(meta["classes"]),
        "mean": [float(v) for v in meta["mean"]],
        "std": [float(v) for v in meta["std"]],
        "input_size": [int(v) for v in meta["input_size"]],
        "preprocess": preprocess_of(meta),
        "tta": bool(meta.get("tta", False)),
        "preprocessing": PREPROCESSING,
    }


def encode_metadata(description: dict) -> dict[str, str]:
    """ONNX metadata_props are strings: lists and booleans as JSON, names as plain text."""
    return {key: json.dumps(value) if key in JSON_KEYS else str(value) for key, value in description.items()}


def decode_metadata(props: dict[str, str], source: str = "model") -> dict:
    missing = [key for key in ("classes", "mean", "std", "input_size") if key not in props]
    if missing:
        raise VisionRecipeError(f"{source} has no visionrecipe metadata ({', '.join(missing)} missing); "
                                f"export it with `visionrecipe export`")
    try:
        decoded = {key: json.loads(props[key]) if key in JSON_KEYS else props[key] for key in props}
    except ValueError as exc:
        raise VisionRecipeError(f"{source} has unreadable metadata ({exc})") from None
    decoded.setdefault("tta", False)
    decoded.setdefault("architecture", "unknown")
    channels = decoded["input_size"][0]
    if len(decoded["mean"]) != channels or len(decoded["std"]) != channels:
        raise VisionRecipeError(f"{source}: mean/std have {len(decoded['mean'])}/{len(decoded['std'])} "
                                f"values for {channels} channels")
    return decoded


# ---------------------------------------------------------------- preprocessing

def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 N×C×H×W → float32 (pixels / 255 - mean) / std, the exported graph's input.

    Computed as (pixels - 255·mean) · 1/(255·std) in float32, the very operations of
    evaluate.predict_logits, so both runtimes feed the network bit-identical inputs.
    """
    c = len(mean)
    mean_255 = np.asarray(mean, dtype=np.float32).reshape(1, c, 1, 1) * np.float32(255)
    inv_std = np.float32(1) / (np.asarray(std, dtype=np.float32).reshape(1, c, 1, 1) * np.float32(255))
    return (images.astype(np.float32) - mean_255) * inv_std


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def probabilities_from_logits(logits: np.ndarray, task: str | None) -> np.ndarray:
    """Softmax over the classes, or for a multilabel model an independent sigmoid per class."""
    if task == "multilabel":
        return (1 / (1 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    return softmax(logits)


# ---------------------------------------------------------------- the model

class ClassifierMeta:
    """What both runtimes read from a model's metadata (model.json or the ONNX metadata)."""

    meta: dict

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def input_size(self) -> list[int]:
        return self.meta["input_size"]

    @property
    def name(self) -> str:
        return self.meta["architecture"]

    def decode(self, source, formats=None) -> np.ndarray:
        """A path or bytes to uint8 C×H×W with the model's eval policy (model.json's "preprocess"),
        the very decode training stored its images with; `formats` limits the decoders (serve)."""
        policy = preprocess_of(self.meta)
        return read_image_array(source, image_size=policy["resize"], crop=policy["crop"],
                                channels=self.input_size[0], formats=formats)


class OnnxClassifier(ClassifierMeta):
    """An exported model and its metadata; the same interface as predict.TorchClassifier."""

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise VisionRecipeError("running .onnx models needs onnxruntime: "
                                    "pip install 'visionrecipe[export]'") from None
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise VisionRecipeError(f"model not found: {self.path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only; ORT's warnings are about graph fusions
        try:
            self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception classes for a foreign or damaged file
            raise VisionRecipeError(f"{self.path} is not a readable ONNX model ({str(exc).splitlines()[0][:200]})") from None
        self.meta = decode_metadata(self.session.get_modelmeta().custom_metadata_map, self.path)
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 N×C×H×W → float32 N×classes."""
        x = normalize(images, self.meta["mean"], self.meta["std"])
        return self.session.run(None, {self.input_name: x})[0]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return probabilities_from_logits(self.logits(images), self.meta.get("task"))
