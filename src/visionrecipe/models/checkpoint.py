"""Safe, atomic saving and loading of model weights and of the resume file.

A model is two files side by side: ``model.safetensors`` (tensors only, nothing to unpickle) and
``model.json`` (architecture, classes, normalisation, input size; read and written by rundir.py,
which owns the run directory's format). The resume state is ``state.pt``, written with
``torch.save`` and read back with ``weights_only=True``::

    save_model(run_dir, "model", model, meta)          # model.safetensors + model.json
    model, meta = load_model(run_dir)                   # a run dir, a .safetensors or a .json path
    write_resume_file(run_dir / "state.pt", {...}); read_resume_file(run_dir / "state.pt")

Every write goes through rundir.atomic_write_bytes (a temporary file in the same folder,
fsync'ed, then renamed over the target), so a kill at any moment leaves the previous file intact.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save as safetensors_bytes

from visionrecipe.errors import VisionRecipeError
from visionrecipe.rundir import MODEL_FORMAT, atomic_write_bytes, model_files, read_model_meta, write_model_meta


def save_model(run_dir: Path, stem: str, model: torch.nn.Module, meta: dict) -> None:
    """`stem`.safetensors + `stem`.json; the JSON is written last so it only names complete weights."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    # safetensors refuses tensors that share memory; clone makes each one its own.
    state = {k: v.clone() for k, v in state.items()}
    atomic_write_bytes(Path(run_dir) / f"{stem}.safetensors", safetensors_bytes(state))
    write_model_meta(Path(run_dir) / f"{stem}.json", meta)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def read_weights(weights_path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise VisionRecipeError(f"{weights_path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None


def build_from_meta(meta: dict) -> torch.nn.Module:
    from visionrecipe.models import create_model

    return create_model(meta["architecture"], len(meta["classes"]), in_channels=meta["input_size"][0],
                        image_size=meta["input_size"][1], head=meta.get("head", "linear"),
                        **meta.get("model_options", {}))


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a one-line error naming what did not match."""
    own = unwrap(model).state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}")
        raise VisionRecipeError(f"{source} does not match the architecture ({'; '.join(parts)})")
    unwrap(model).load_state_dict(state)


def load_model(path: str | os.PathLike, stem: str = "model") -> tuple[torch.nn.Module, dict]:
    """Rebuild the architecture named in the JSON and load the safetensors weights, in eval mode."""
    weights_path, meta_path = model_files(path, stem)
    meta = read_model_meta(meta_path)
    model = build_from_meta(meta)
    load_into(model, read_weights(weights_path), str(weights_path))
    return model.eval(), meta


def write_resume_file(path: Path, state: dict[str, Any]) -> None:
    """state.pt: the training state (train/state.py) as one torch file, tagged with the format."""
    buffer = io.BytesIO()
    torch.save({"format": MODEL_FORMAT, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_resume_file(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Resume state; `weights_only=True` so a hostile file cannot run code. `required` keys
    missing (a state from another version) are a one-line error, not a KeyError later."""
    path = Path(path)
    if not path.is_file():
        raise VisionRecipeError(f"no resume state in {path.parent} ({path.name} is missing)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise VisionRecipeError(f"{path} is not a readable visionrecipe checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
        raise VisionRecipeError(f"{path} is not a visionrecipe checkpoint")
    missing = [key for key in required if key not in state]
    if missing:
        raise VisionRecipeError(f"{path} is an incomplete or older visionrecipe checkpoint (no {', '.join(missing)})")
    return state
