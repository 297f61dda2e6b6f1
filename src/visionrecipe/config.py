"""Settings as dataclasses: the single source of truth for CLI flags and YAML files.

Every field becomes a flag (``epochs`` -> ``--epochs``, booleans get ``--x/--no-x``) and a key
in ``config.yaml``. A YAML file may be nested by section or flat::

    cfg = Config.from_dict({"data": "digits", "optim": {"lr": 0.1}})
    cfg = load_config("best.yaml", overrides={"epochs": 5})
    save_config(cfg, run_dir / "config.yaml")

Fields left as ``None`` are filled by the recipe (``resolve_recipe``): ``--recipe fast``
(the default when ``--model`` is not given) or ``standard``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from visionrecipe.errors import VisionRecipeError


def opt(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None,
        positive: bool = False, cli: bool = True) -> Any:
    """A dataclass field with the metadata the CLI and validation need."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "positive": positive, "cli": cli}
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    data: str = opt("digits", "dataset: digits, cifar10, cifar100, a cifar pickle folder, a folder of class subfolders, or a .csv manifest (multilabel)")
    data_dir: str = opt("~/.cache/visionrecipe", "where downloads and the decoded-tensor cache live")
    image_size: int | None = opt(None, "resize images to this square size at decode time", positive=True)
    val_fraction: float = opt(0.1, "fraction of train carved out (stratified) for validation; 0 = validate on test", minimum=0.0)
    strict: bool = opt(False, "an unreadable image is an error instead of a skipped warning")
    workers: int | None = opt(None, "processes for decoding images (default: all cores)", positive=True)
    allow_outside_paths: bool = opt(False, "let a .csv manifest name images outside its own folder (../ or absolute paths)")


@dataclass
class ModelConfig:
    model: str | None = opt(None, "model name from `visionrecipe models` or timm:<name> (default: recipe's)")
    width: float | None = opt(None, "width multiplier, for models that have one (fastnet)", positive=True)
    depth: int | None = opt(None, "number of blocks, for models that have one (fastnet)", positive=True)
    head: str = opt("linear", "task head: linear or mlp:HIDDEN")
    weights: str | None = opt(None, "initial weights: imagenet, a run directory, a .safetensors or a state-dict file")
    freeze_backbone: bool = opt(False, "train only the head (backbone BatchNorm statistics stay fixed)")
    unfreeze_after: int | None = opt(None, "unfreeze the backbone after this many epochs", minimum=0)
    backbone_lr_mult: float = opt(1.0, "learning-rate multiplier for the backbone (discriminative LR)", minimum=0.0)
    task: str = opt("multiclass", "multiclass (softmax) or multilabel (sigmoid + BCE, CSV manifest)", choices=("multiclass", "multilabel"))
    threshold: float = opt(0.5, "multilabel decision threshold", minimum=0.0)


@dataclass
class OptimConfig:
    recipe: str | None = opt(None, "fast (fastnet, the CIFAR speed-record tricks) or standard; default fast unless --model is given", choices=("fast", "standard"))
    epochs: int | None = opt(None, "training epochs (with --time-budget: an upper bound)", positive=True)
    time_budget: float | None = opt(None, "seconds of training; the schedule is planned to end exactly there", positive=True)
    batch_size: int | None = opt(None, "images per step", positive=True)
    optimizer: str | None = opt(None, "optimizer", choices=("sgd", "adam", "adamw", "adagrad"))
    lr: float | None = opt(None, "peak learning rate", positive=True)
    momentum: float | None = opt(None, "SGD momentum", minimum=0.0)
    bias_lr_mult: float | None = opt(None, "learning-rate multiplier for BatchNorm biases (airbench's bias scaler)", minimum=0.0)
    nesterov: bool | None = opt(None, "Nesterov momentum for SGD")
    weight_decay: float | None = opt(None, "weight decay", minimum=0.0)
    label_smoothing: float | None = opt(None, "label smoothing for cross-entropy", minimum=0.0)
    schedule: str | None = opt(None, "learning-rate schedule", choices=("constant", "cosine", "onecycle", "triangle"))
    warmup_epochs: float | None = opt(None, "linear warm-up length in epochs", minimum=0.0)
    ema: bool | None = opt(None, "keep an exponential moving average of the weights and evaluate with it")
    ema_decay: float = opt(0.99, "EMA decay per step", minimum=0.0)
    crop_padding: int | None = opt(None, "random-translate padding in pixels, 0 = off (default: the recipe's, scaled to the image size)", minimum=0)
    flip: bool | None = opt(None, "random horizontal flip (default on, except for digits, which a mirror changes)")
    alternate_flip: bool | None = opt(None, "flip each image on alternate epochs instead of at random")
    whiten: bool | None = opt(None, "initialise fastnet's first layer from data (patch whitening) and freeze it")
    tta: bool | None = opt(None, "test-time augmentation: average logits over the image and its mirror")
    grad_clip: float | None = opt(None, "clip gradient norm to this value", positive=True)
    on_nan: str = opt("stop", "on a NaN/Inf loss: stop (keep last checkpoint) or skip the batch", choices=("stop", "skip"))


@dataclass
class RunConfig:
    out: str | None = opt(None, "run directory (default runs/<data>-<model>-<time>)")
    overwrite: bool = opt(False, "replace an existing run directory")
    seed: int = opt(0, "random seed", minimum=0)
    device: str = opt("auto", "device", choices=("auto", "cpu", "cuda", "mps"))
    compile: str = opt("auto", "torch.compile the model (auto: on CUDA only, where it pays)", choices=("auto", "on", "off"))
    channels_last: bool = opt(True, "channels_last memory format for conv nets")
    deterministic: bool = opt(False, "deterministic algorithms (exact resume and repeat on CPU)")
    threads: int | None = opt(None, "CPU threads for PyTorch (default: physical cores)", positive=True)
    checkpoint_every: float | None = opt(None, "also checkpoint every N minutes mid-epoch (fractions too: 0.5 = 30 s)", positive=True)
    progress: bool = opt(True, "live progress bar")
    report: bool = opt(True, "write report.html at the end")
    tensorboard: bool = opt(False, "log to TensorBoard event files in the run directory")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "run": RunConfig}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> "Config":
        """Nested ({"optim": {"lr": 0.1}}) or flat ({"lr": 0.1}) keys; unknown keys are errors."""
        cfg = cls()
        apply_overrides(cfg, flatten(values or {}))
        return cfg

    def flat(self) -> dict:
        return {k: v for section in SECTIONS for k, v in dataclasses.asdict(getattr(self, section)).items()}


def _field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    index = {}
    for section, klass in SECTIONS.items():
        for f in fields(klass):
            assert f.name not in index, f"duplicate setting name {f.name}"
            index[f.name] = (section, f)
    return index


FIELDS = _field_index()


def flatten(values: dict) -> dict:
    flat: dict = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key in SECTIONS and isinstance(value, dict):
            flat.update({k.replace("-", "_"): v for k, v in value.items()})
        elif key in SECTIONS and key in FIELDS and not isinstance(value, dict):
            flat[key] = value  # `data: digits` is the data spec, `model: seedcnn` the model name
        else:
            flat[key] = value
    return flat


def _base_type(annotation: Any) -> type:
    """`int | None` -> int; annotations are strings because of `from __future__`."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"__builtins__": __builtins__})  # our own annotations only
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return args[0]
    return annotation


def coerce(name: str, value: Any) -> Any:
    """Check one setting's value and convert it to the field's type; errors name the setting."""
    _, f = FIELDS[name]
    kind = _base_type(f.type)
    if value is None:
        return None
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                    raise ValueError
                value = value.lower() in ("true", "yes", "1", "on")
            value = bool(value)
        elif kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            value = int(value)
        elif kind is float:
            value = float(value)
        else:
            value = str(value)
    except (TypeError, ValueError):
        raise VisionRecipeError(f"invalid value for {name}: {value!r} (expected {kind.__name__})") from None
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise VisionRecipeError(f"invalid value for {name}: {value!r} (choose from {', '.join(meta['choices'])})")
    if meta.get("positive") and value <= 0:
        raise VisionRecipeError(f"invalid value for {name}: {value!r} (must be positive)")
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise VisionRecipeError(f"invalid value for {name}: {value!r} (must be at least {meta['minimum']})")
    return value


def apply_overrides(cfg: Config, values: dict) -> Config:
    for name, value in values.items():
        if name not in FIELDS:
            raise VisionRecipeError(f"unknown setting '{name}'")
        section, _ = FIELDS[name]
        setattr(getattr(cfg, section), name, coerce(name, value))
    return cfg


def read_yaml_mapping(path: str | Path, what: str, expected: str) -> dict:
    """A user's YAML file that must hold a mapping; each way it can be wrong is one line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise VisionRecipeError(f"{what} not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise VisionRecipeError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise VisionRecipeError(f"{path} must {expected}")
    return values


def load_config(path: str | Path, overrides: dict | None = None) -> Config:
    values = read_yaml_mapping(path, "config file", "hold a mapping of settings")
    cfg = Config.from_dict(values)
    return apply_overrides(cfg, overrides or {})


def save_config(cfg: Config, path: str | Path) -> None:
    from visionrecipe.rundir import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def add_config_arguments(parser: argparse.ArgumentParser, sections=tuple(SECTIONS)) -> None:
    """One flag per field; defaults are SUPPRESSed so only what the user typed overrides."""
    for section in sections:
        group = parser.add_argument_group(section)
        for f in fields(SECTIONS[section]):
            if not f.metadata.get("cli", True):
                continue
            flag = "--" + f.name.replace("_", "-")
            kind = _base_type(f.type)
            default = f.default
            helptext = f.metadata["help"] + (f" (default: {default})" if default not in (None, False) else "")
            if kind is bool:
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=helptext)
            else:
                group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                   help=helptext)


def config_from_args(args: argparse.Namespace) -> Config:
    """`--config FILE` first, then every flag the user typed on top of it."""
    typed = {name: value for name, value in vars(args).items() if name in FIELDS}
    if getattr(args, "config", None):
        return load_config(args.config, typed)
    return apply_overrides(Config(), typed)


# --- recipes -----------------------------------------------------------------------------------
# Values for fields left as None. "fast" follows the CIFAR-10 speed-record line of work
# (airbench): SGD-Nesterov with a lr per 1024 examples, label smoothing, EMA, alternating flips,
# translate by 2 px, patch whitening and mirror TTA. "standard" is a plain, robust default for any
# registry model.
RECIPES: dict[str, dict[str, Any]] = {
    "fast": dict(model="fastnet", epochs=10, batch_size=512, optimizer="sgd", lr=1.5, momentum=0.85,
                 nesterov=True, weight_decay=1.33e-3, bias_lr_mult=64.0, label_smoothing=0.2, schedule="triangle", warmup_epochs=None,
                 ema=True, alternate_flip=True, whiten=True, tta=True),
    "standard": dict(epochs=10, batch_size=64, optimizer="adamw", lr=1e-3, momentum=0.9, nesterov=False, bias_lr_mult=1.0,
                     weight_decay=0.05, label_smoothing=0.1, schedule="cosine", warmup_epochs=0.5,
                     ema=False, alternate_flip=False, whiten=False, tta=False),
}
# Translate padding at 32×32, scaled to the image size (4 px would wipe out an 8×8 digit).
CROP_PADDING_AT_32 = {"fast": 2, "standard": 4}
# airbench states lr 11.5 per 1024 examples on a summed loss with momentum 0.85, i.e. 11.5 / (1 + 1/0.15)
# = 1.5 on the mean loss at batch 1024; its decoupled weight decay 0.0153 becomes 0.0153 / 11.5 here.
# lr in the fast recipe is per 1024 examples (scaled by batch_size/1024 in the trainer), as airbench
# states its hyperparameters; standard lrs are per batch as usual.
LR_PER_1024 = {"fast": True, "standard": False}


def resolve_crop_padding(cfg: Config, image_size: int) -> int:
    if cfg.optim.crop_padding is not None:
        return cfg.optim.crop_padding
    return max(1, round(CROP_PADDING_AT_32[cfg.optim.recipe] * image_size / 32))


# On a CPU the fast recipe halves fastnet's width (a quarter of the FLOPs): measured on 2 cores,
# 4× the epochs in the same minutes buys more accuracy than the wider net (BENCHMARKS.md).
CPU_FASTNET_WIDTH = 0.5


def resolve_device_defaults(cfg: Config, device_type: str) -> None:
    """Recipe values that depend on the device the run landed on (in place)."""
    if (cfg.optim.recipe == "fast" and cfg.model.model == "fastnet" and cfg.model.width is None
            and not cfg.model.weights and device_type == "cpu"):
        cfg.model.width = CPU_FASTNET_WIDTH


def resolve_recipe(cfg: Config) -> Config:
    """Fill every None field from the recipe; returns a new Config, the input is unchanged."""
    cfg = Config.from_dict(cfg.to_dict())
    if cfg.optim.recipe is None:
        cfg.optim.recipe = "fast" if cfg.model.model in (None, "fastnet") else "standard"
    for name, value in RECIPES[cfg.optim.recipe].items():
        section, _ = FIELDS[name]
        if getattr(getattr(cfg, section), name) is None:
            setattr(getattr(cfg, section), name, value)
    if cfg.model.model is None:
        cfg.model.model = "seedcnn" if cfg.optim.recipe == "standard" else "fastnet"
    if cfg.optim.flip is None:
        cfg.optim.flip = cfg.data.data != "digits"
    if not cfg.optim.flip:
        cfg.optim.alternate_flip = cfg.optim.tta = False
    if cfg.optim.warmup_epochs is None:
        cfg.optim.warmup_epochs = 0.0
    if cfg.optim.whiten and not cfg.model.model == "fastnet":
        cfg.optim.whiten = False
    if cfg.model.weights:
        cfg.optim.whiten = False  # the loaded whitening layer is what the loaded blocks expect
    if cfg.model.unfreeze_after is not None:
        cfg.model.freeze_backbone = True  # "unfreeze after N epochs" implies frozen until then
    return cfg
