"""The search space of `visionrecipe tune`: what is searched, in which range, and how to read a file.

    space = default_space(image_size=8, recipe="standard", max_epochs=10)
    space = load_space("space.yaml", base=space)      # replace or narrow entries
    settings = suggest(trial, space, base_model="seedcnn")   # {"lr": 0.003, "model": "fastnet", ...}

A space is a dict `setting -> Param` (or a plain value, which fixes the setting). Setting names are
the flat config names (`visionrecipe train --help`), so a trial's settings go straight into a Config.

The YAML file maps a setting to a range, a list of choices or a fixed value::

    lr:           {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    epochs:       {type: int, low: 2, high: 6}
    model:        {type: categorical, choices: [seedcnn, fastnet]}
    width:        {type: float, low: 0.5, high: 1.0}    # only sampled for models that have it
    batch_size:   64                                     # fixed: not searched
    weight_decay: null                                   # removed: the base config's value is used
    include_defaults: false                              # search only what this file lists

With `include_defaults: true` (the default) the file's entries replace the default entries of the
same name and the other defaults stay; `false` searches only the file's entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


from visionrecipe.config import FIELDS, MODEL_OPTIONS, coerce, read_yaml_mapping
from visionrecipe.errors import VisionRecipeError

TYPES = ("float", "int", "categorical")
# config.MODEL_OPTIONS, the settings that only some models accept, are sampled only when the trial's
# model lists them in get_spec(name).options, so a seedcnn trial has no meaningless `width` parameter.
DEFAULT_MODELS = ["fastnet", "seedcnn", "resnet18_cifar"]


@dataclass(frozen=True)
class Param:
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None


def default_space(image_size: int, recipe: str, max_epochs: int) -> dict[str, Any]:
    """Sensible ranges for a small image classifier trained from scratch.

    The lr range depends on the recipe because the fast recipe states lr per 1024 examples
    (airbench's convention) and the standard recipe per batch.
    """
    lr = Param("float", 0.2, 10.0, log=True) if recipe == "fast" else Param("float", 3e-4, 0.1, log=True)
    # Translate padding scales with the image: 4 px at 32x32 (the CIFAR standard), 1 px at 8x8.
    max_pad = max(1, round(4 * image_size / 32))
    return {
        "model": Param("categorical", choices=tuple(DEFAULT_MODELS)),
        "width": Param("float", 0.25, 1.0),
        "depth": Param("int", 2, 4),
        "optimizer": Param("categorical", choices=("sgd", "adamw")),
        "lr": lr,
        "weight_decay": Param("float", 1e-5, 0.1, log=True),
        "batch_size": Param("categorical", choices=(32, 64, 128, 256)),
        "label_smoothing": Param("float", 0.0, 0.2),
        "crop_padding": Param("int", 0, max_pad),
        "epochs": Param("int", max(1, max_epochs // 3), max_epochs) if max_epochs > 1 else 1,
    }


def parse_entry(name: str, spec: Any, where: str) -> Any:
    """One YAML entry -> Param, a fixed value, or None (removed); errors name the file and setting."""
    if name not in FIELDS:
        raise VisionRecipeError(f"{where}: unknown setting '{name}' (see `visionrecipe train --help`)")
    if spec is None:
        return None
    if not isinstance(spec, dict):
        return coerce(name, spec)
    unknown = set(spec) - {"type", "low", "high", "log", "choices"}
    if unknown:
        raise VisionRecipeError(f"{where}: {name}: unknown key(s) {', '.join(sorted(unknown))} "
                                "(use type, low, high, log, choices)")
    kind = spec.get("type", "categorical" if "choices" in spec else "float")
    if kind not in TYPES:
        raise VisionRecipeError(f"{where}: {name}: type must be one of {', '.join(TYPES)}, got {kind!r}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise VisionRecipeError(f"{where}: {name}: categorical needs a non-empty list `choices`")
        choices = tuple(coerce(name, c) for c in choices)  # a typo in a model name fails here
        if name == "model":
            from visionrecipe.models import get_spec

            for choice in choices:
                get_spec(choice)
        return Param("categorical", choices=choices)
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError):
        raise VisionRecipeError(f"{where}: {name}: {kind} needs numbers `low` and `high`") from None
    log = bool(spec.get("log", False))
    if not low < high or (log and low <= 0):
        raise VisionRecipeError(f"{where}: {name}: need low < high{' and low > 0 for log' if log else ''}, "
                                f"got low={low:g} high={high:g}")
    coerce(name, low if kind == "float" else int(low))  # the range must hold valid values
    if kind == "int":
        if not (low.is_integer() and high.is_integer()):
            raise VisionRecipeError(f"{where}: {name}: int needs whole numbers for low and high")
        low, high = int(low), int(high)
    return Param(kind, low, high, log=log)


def load_space(path: str | Path, base: dict[str, Any]) -> dict[str, Any]:
    """Read a space file and apply it to `base` (see the module docstring for the format)."""
    entries = read_yaml_mapping(path, "search space file",
                                "map settings to ranges, e.g. `lr: {type: float, low: 1e-4, high: 0.1}`")
    include = entries.pop("include_defaults", True)
    space = dict(base) if include else {}
    for name, spec in entries.items():
        value = parse_entry(str(name).replace("-", "_"), spec, str(path))
        if value is None:
            space.pop(name, None)
        else:
            space[name] = value
    return space


def suggest(trial, space: dict[str, Any], base_model: str) -> dict[str, Any]:
    """Ask the trial for a value of each searched setting; fixed values pass through."""
    from visionrecipe.models import get_spec

    settings: dict[str, Any] = {}

    def value(name: str, spec: Any) -> Any:
        if not isinstance(spec, Param):
            return spec
        if spec.type == "categorical":
            return trial.suggest_categorical(name, list(spec.choices))
        if spec.type == "int":
            return trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log)
        return trial.suggest_float(name, spec.low, spec.high, log=spec.log)

    # The model first: which of width/depth exist depends on it.
    model = value("model", space["model"]) if "model" in space else base_model
    if "model" in space:
        settings["model"] = model
    accepted = get_spec(model).options if model else ()
    for name, spec in space.items():
        if name == "model" or (name in MODEL_OPTIONS and name not in accepted):
            continue
        settings[name] = value(name, spec)
    return settings


def recipe_trial(space: dict[str, Any], recipe_settings: dict[str, Any]) -> dict[str, Any]:
    """The recipe's own values for the searched settings that have one inside the space: the first
    trial of a study, so a tune is never worse (on validation) than not tuning."""
    params = {}
    for name, spec in space.items():
        value = recipe_settings.get(name)
        if not isinstance(spec, Param) or value is None or name in MODEL_OPTIONS:
            continue
        if spec.choices is not None and value in spec.choices:
            params[name] = value
        elif spec.choices is None and spec.low <= value <= spec.high:
            params[name] = value
    return params


def space_to_dict(space: dict[str, Any]) -> dict[str, Any]:
    """JSON/YAML-friendly form (stored in the study so a continued tune searches the same space)."""
    out = {}
    for name, spec in space.items():
        if not isinstance(spec, Param):
            out[name] = spec
        elif spec.type == "categorical":
            out[name] = {"type": "categorical", "choices": list(spec.choices)}
        else:
            # Every field, written out: a bound of 0 is a bound (0 == False once dropped it).
            out[name] = {"type": spec.type, "low": spec.low, "high": spec.high, "log": spec.log}
    return out


def space_from_dict(values: dict[str, Any]) -> dict[str, Any]:
    """The inverse of space_to_dict: `space_from_dict(space_to_dict(space)) == space`."""
    return {name: parse_entry(name, spec, "stored search space") for name, spec in values.items()}
