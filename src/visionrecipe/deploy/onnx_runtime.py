"""Run an exported ``.onnx`` model with onnxruntime, PIL and numpy only: no torch import.

    from visionrecipe.deploy.onnx_runtime import OnnxClassifier

    model = OnnxClassifier("runs/digits/model.onnx")
    model.classes, model.input_size            # from the file's metadata_props
    image = model.decode("a.png")              # uint8 C×H×W, exactly as training decoded it
    probs = model.probabilities(np.stack([image]))   # N×classes float32

The ONNX file describes itself (see ``encode_metadata``): ``classes``, ``mean``, ``std``,
``input_size`` ([C, H, W]) and ``tta`` are JSON text, ``architecture`` plain text. Its input
is float32 N×C×H×W normalised as ``(pixels / 255 - mean) / std``; its output is logits, with
the mirror average already inside the graph when ``tta`` is true.

``read_image_array`` mirrors ``visionrecipe.data.read_image`` step for step (EXIF orientation,
mode to RGB or L, square bilinear resize); tests/test_predict.py checks they agree pixel for
pixel, so a model deployed without torch sees the pixels it was trained on.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from visionrecipe.errors import VisionRecipeError

# A half-downloaded file must fail, not be padded with grey (same rule as the training decoder).
ImageFile.LOAD_TRUNCATED_IMAGES = False

JSON_KEYS = ("classes", "mean", "std", "input_size", "tta", "threshold")
TEXT_KEYS = ("architecture", "task", "format", "preprocessing")
PREPROCESSING = "float32 NCHW, x = (pixels / 255 - mean) / std, pixels resized to input_size (bilinear)"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


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


# ---------------------------------------------------------------- decoding (mirror of data/decode.py)

def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    if img.mode in _SIXTEEN_BIT_MODES:
        # Scale 0–65535 to 0–255 rather than PIL's clip at 255 (which turns 16-bit scans white).
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img = Image.fromarray(((wide + 128) // 257).astype(np.uint8), mode="L")
    target = "RGB" if channels == 3 else "L"
    return img if img.mode == target else img.convert(target)


def decode_pil(opened, image_size: int | None, channels: int, formats=None) -> np.ndarray:
    """The one PIL decode both runtimes use (the training decoder in data/decode.py too): a path or
    file object to uint8 H×W or H×W×C; formats (e.g. ("PNG", "JPEG")) limits the PIL plugins
    tried, None tries all. PIL's own exceptions propagate; callers word them."""
    with Image.open(opened, formats=formats) as img:
        img.load()  # decode now: truncated data raises here, not later
        ImageOps.exif_transpose(img, in_place=True)
        img = _to_mode(img, channels)
        if image_size is not None and img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(img)


def read_image_array(source, *, image_size: int | None, channels: int = 3, formats=None) -> np.ndarray:
    """Decode a path or bytes to uint8 C×H×W, as ``visionrecipe.data.read_image`` does
    (that decodes any format PIL knows; ``formats`` may limit this one, as the server does)."""
    if channels not in (1, 3):
        raise VisionRecipeError(f"channels must be 1 or 3, got {channels!r}")
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    name = "image bytes" if is_bytes else os.fspath(source)
    opened = io.BytesIO(bytes(source)) if is_bytes else source
    try:
        array = decode_pil(opened, image_size, channels, formats)
    except FileNotFoundError:
        raise VisionRecipeError(f"no such image file: {name}") from None
    except IsADirectoryError:
        raise VisionRecipeError(f"expected an image file, got a folder: {name}") from None
    except UnidentifiedImageError:
        empty = not is_bytes and os.path.getsize(source) == 0
        reason = "empty file (0 bytes)" if empty else "not an image PIL can read"
        raise VisionRecipeError(f"unreadable image {name}: {reason}") from None
    except Exception as exc:  # PIL raises many types on malformed input
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise VisionRecipeError(f"unreadable image {name}: {reason}") from None
    array = array[:, :, None] if array.ndim == 2 else array
    return np.ascontiguousarray(array.transpose(2, 0, 1))


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

    def decode(self, source) -> np.ndarray:
        channels, size = self.input_size[0], self.input_size[1]
        return read_image_array(source, image_size=size, channels=channels)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 N×C×H×W → float32 N×classes."""
        x = normalize(images, self.meta["mean"], self.meta["std"])
        return self.session.run(None, {self.input_name: x})[0]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return probabilities_from_logits(self.logits(images), self.meta.get("task"))
