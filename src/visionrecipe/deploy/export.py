"""Export a run's model to ONNX or TorchScript, verified against PyTorch before the file is kept.

    result = export_model("runs/digits")                              # runs/digits/model.onnx
    result = export_model("runs/digits", format="torchscript")        # runs/digits/model.torchscript.pt
    result = export_model("runs/digits", quantize="dynamic")          # runs/digits/model.int8.onnx
    result["max_abs_diff"], result["top1_agreement"], result["verified_on"]

The exported graph takes float32 N×C×H×W (any N) normalised as (pixels / 255 - mean) / std and
returns logits; when the run used TTA the mirror average is inside the graph, so the exported
logits are the ones `evaluate` scores. The file describes itself: ONNX metadata_props, or a
``meta.json`` extra file in TorchScript, carry classes, mean, std, input_size, tta and
architecture (see onnx_runtime.describe_model).

Every export is written to a temporary file, run (onnxruntime / torch.jit.load) beside the
PyTorch model on real images (the run's test split, else random pixels) and renamed into place
only if the logits agree within ``tolerance`` × max(1, largest |logit|); otherwise a
VisionRecipeError is raised and nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visionrecipe.errors import VisionRecipeError
from visionrecipe.deploy.onnx_runtime import describe_model, encode_metadata, normalize
from visionrecipe.rundir import locked, publish, write_error

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
DEFAULT_OPSET = 17
OPSETS = range(11, 21)  # 11: Slice with negative steps (the mirror); 20: the TorchScript exporter's last
TOLERANCE = 1e-4  # on logits, scaled by max(1, largest |logit|)
VERIFY_IMAGES = 2000  # at most this many test images, evenly spaced, to keep big splits quick
RANDOM_IMAGES = 64
BATCH = 256


class DeployModule(nn.Module):
    """The network plus TTA as one graph; mirrors evaluate.predict_logits after normalisation."""

    def __init__(self, model: nn.Module, tta: bool):
        super().__init__()
        self.model = model
        self.tta = tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if self.tta:
            logits = 0.5 * (logits + self.model(x.flip(3)))
        return logits


# ---------------------------------------------------------------- verification data

def verification_images(run_dir: Path, meta: dict, data: str | None = None,
                        limit: int = VERIFY_IMAGES) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(uint8 images, labels or None, description): the test split of `data` (default the run's).

    An explicit `data` that cannot be loaded is an error; the run's own data falling back to
    random pixels is not (a run can outlive its dataset).
    """
    from visionrecipe.data import load_dataset
    from visionrecipe.evaluate.scoring import _run_config

    config = _run_config(run_dir) if run_dir.is_dir() else None
    spec = data or meta.get("data") or (config.data.data if config else None)
    try:
        if not spec:
            raise VisionRecipeError("the run names no data")
        dataset = load_dataset(spec, data_dir=config.data.data_dir if config else "~/.cache/visionrecipe",
                               image_size=meta["input_size"][1],
                               val_fraction=config.data.val_fraction if config else 0.1,
                               seed=config.run.seed if config else 0, progress=False,
                               allow_outside_paths=bool(config and config.data.allow_outside_paths))
        if list(dataset.classes) != list(meta["classes"]):
            raise VisionRecipeError(f"the classes of {spec} do not match the model's")
        split = dataset.test
        if split is None or len(split.labels) == 0:
            raise VisionRecipeError(f"{spec} has no test split")
        if tuple(split.images.shape[1:]) != tuple(meta["input_size"]):
            raise VisionRecipeError(f"{spec} images are {list(split.images.shape[1:])}, "
                                    f"the model expects {meta['input_size']}")
    except VisionRecipeError as exc:
        if data:
            raise
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (RANDOM_IMAGES, *meta["input_size"]), dtype=torch.uint8,
                               generator=generator)
        return images, None, f"{RANDOM_IMAGES} random images (test split not loadable: {exc})"
    total = len(split.labels)
    keep = torch.linspace(0, total - 1, min(limit, total)).round().long().unique()
    return split.images[keep], split.labels[keep], f"{len(keep)} of {total} test images of {spec}"


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict:
    diff = float(np.abs(reference - candidate).max()) if reference.size else 0.0
    agreement = float((reference.argmax(1) == candidate.argmax(1)).mean()) if reference.size else 1.0
    scale = max(1.0, float(np.abs(reference).max())) if reference.size else 1.0
    return {"max_abs_diff": diff, "top1_agreement": agreement, "logit_scale": scale}


def _accuracy(logits: np.ndarray, labels: torch.Tensor | None) -> float | None:
    return None if labels is None else float((logits.argmax(1) == labels.numpy()).mean())


# ---------------------------------------------------------------- writers and runners

def _write_onnx(module: nn.Module, example: torch.Tensor, path: Path, opset: int, metadata: dict) -> None:
    with warnings.catch_warnings():
        # The TorchScript-based exporter warns that it is legacy; it needs no onnxscript and
        # handles every model in the registry, so it stays the one we use.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=True)
    _set_onnx_metadata(path, metadata)


def _set_onnx_metadata(path: Path, metadata: dict) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in encode_metadata(metadata).items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"visionrecipe {metadata['architecture']}: {metadata['preprocessing']}; output logits"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    from visionrecipe.deploy.onnx_runtime import OnnxClassifier

    session = OnnxClassifier(path).session
    return np.concatenate([session.run(None, {"input": x[i:i + BATCH]})[0] for i in range(0, len(x), BATCH)])


def _write_torchscript(module: nn.Module, example: torch.Tensor, path: Path, metadata: dict) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        # torch 2.9+ flags TorchScript as deprecated; it is still the format C++ and mobile load.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"meta.json": json.dumps(metadata)})


def _run_torchscript(path: Path, x: np.ndarray) -> np.ndarray:
    from visionrecipe.deploy.predict import read_torchscript

    loaded, _ = read_torchscript(path)  # the loader predict uses: the metadata must survive the round trip
    with torch.no_grad():
        return torch.cat([loaded(torch.from_numpy(x[i:i + BATCH])) for i in range(0, len(x), BATCH)]).numpy()


def _quantize(source: Path, target: Path, metadata: dict) -> None:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic logs advice about pre-processing through the root logger; mute it.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    _set_onnx_metadata(target, {**metadata, "quantization": "dynamic int8 weights"})


# ---------------------------------------------------------------- the export

def default_output(model_path: Path, format: str, quantize: str | None) -> Path:
    suffix = ".int8.onnx" if quantize else SUFFIXES[format]
    return model_path / f"model{suffix}" if model_path.is_dir() else model_path.with_suffix(suffix)


def export_model(run_dir, *, format: str = "onnx", out=None, opset: int = DEFAULT_OPSET,
                 quantize: str | None = None, data: str | None = None, tolerance: float = TOLERANCE) -> dict:
    """Write, verify and keep (or reject) an exported model; returns what was checked and found."""
    from visionrecipe.models.checkpoint import load_model
    from visionrecipe.evaluate.scoring import predict_logits

    if format not in FORMATS:
        raise VisionRecipeError(f"unknown export format {format!r} (choose {', '.join(FORMATS)})")
    if quantize not in (None, "dynamic"):
        raise VisionRecipeError(f"unknown quantization {quantize!r} (only 'dynamic' is supported)")
    if quantize and format != "onnx":
        raise VisionRecipeError("--quantize dynamic needs --format onnx")
    if format == "onnx" and opset not in OPSETS:
        raise VisionRecipeError(f"unsupported ONNX opset {opset} (choose {OPSETS.start}–{OPSETS.stop - 1})")
    if not tolerance > 0:
        raise VisionRecipeError(f"tolerance must be positive, got {tolerance}")
    run_dir = Path(run_dir).expanduser()
    model, meta = load_model(run_dir)
    out = Path(out).expanduser() if out else default_output(run_dir, format, quantize)
    if out.is_dir():
        raise VisionRecipeError(f"output path {out} is a folder; name a file")
    if out.parent.exists() and not out.parent.is_dir():
        raise VisionRecipeError(f"output folder {out.parent} is a file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # --out exports/model.onnx creates exports/
    except OSError as exc:
        raise VisionRecipeError(f"cannot create output folder {out.parent}: {exc.strerror}") from None
    # Written into the run: not while another process writes there.
    inside = run_dir.is_dir() and out.parent.resolve() == run_dir.resolve()
    with locked(run_dir) if inside else contextlib.nullcontext():
        description = describe_model(meta)
        images, labels, verified_on = verification_images(run_dir, meta, data)
        reference = predict_logits(model, images, meta["mean"], meta["std"], tta=description["tta"],
                                   device="cpu").numpy()
        x = normalize(images.numpy(), meta["mean"], meta["std"])
        module = DeployModule(model.cpu().eval(), description["tta"]).eval()
        example = torch.from_numpy(x[:2].copy())

        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp_q = out.with_name(f".{out.name}.{os.getpid()}.int8.tmp")
        try:
            exported = _write_and_run(format, module, example, tmp, opset, description, x)
            result = {"path": str(out), "format": format, "architecture": meta["architecture"],
                      "verified_on": verified_on, "num_images": len(images), "tolerance": tolerance,
                      "opset": opset if format == "onnx" else None, "tta": description["tta"],
                      **compare_logits(reference, exported), "accuracy_pytorch": _accuracy(reference, labels),
                      "accuracy_exported": _accuracy(exported, labels)}
            allowed = tolerance * result["logit_scale"]
            if result["max_abs_diff"] > allowed:
                raise VisionRecipeError(
                    f"the {format} export disagrees with PyTorch on {verified_on}: largest logit difference "
                    f"{result['max_abs_diff']:.3g} > {allowed:.3g} (top-1 agreement "
                    f"{100 * result['top1_agreement']:.2f}%); nothing written")
            if quantize:
                _quantize(tmp, tmp_q, description)
                quantized = _run_onnx(tmp_q, x)
                accuracy = _accuracy(quantized, labels)
                result["quantized"] = {"method": "dynamic int8 (onnxruntime quantize_dynamic)",
                                       **compare_logits(exported, quantized), "accuracy": accuracy,
                                       "accuracy_change": None if accuracy is None else
                                       accuracy - result["accuracy_exported"],
                                       "bytes_fp32": tmp.stat().st_size, "bytes_int8": tmp_q.stat().st_size}
            publish(tmp_q if quantize else tmp, out)  # fsync'ed, renamed, the rename flushed
            result["bytes"] = out.stat().st_size
            return result
        except OSError as exc:  # disk full or a file-size limit while writing the temporary files
            raise write_error(out, exc) from None
        finally:
            tmp.unlink(missing_ok=True)
            tmp_q.unlink(missing_ok=True)


def _write_and_run(format: str, module: nn.Module, example: torch.Tensor, path: Path, opset: int,
                   description: dict, x: np.ndarray) -> np.ndarray:
    """Write the file, load it back with its own runtime, and return its logits for x."""
    try:
        if format == "onnx":
            _write_onnx(module, example, path, opset, description)
            return _run_onnx(path, x)
        _write_torchscript(module, example, path, description)
        return _run_torchscript(path, x)
    except (VisionRecipeError, OSError):  # a failed write is the caller's to name
        raise
    except Exception as exc:  # exporters raise many types for unsupported layers or opsets
        # First line only: the TorchScript exporter appends the whole IR graph to its messages.
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise VisionRecipeError(f"{format} export of {description['architecture']} failed: {reason}") from None
