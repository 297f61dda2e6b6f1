"""Settings as dataclasses: the single source of truth for CLI flags and YAML files.

Every field becomes a flag (``epochs`` -> ``--epochs``, booleans get ``--x/--no-x``; cli.py
generates them for every command) and, for a run's four sections, a key in ``config.yaml``.
A YAML file may be nested by section or flat::

    cfg = Config.from_dict({"data": "digits", "optim": {"lr": 0.1}})
    cfg = load_config("best.yaml", overrides={"epochs": 5})
    save_config(cfg, run_dir / "config.yaml")

Fields left as ``None`` are filled by the recipe (recipes.py, ``resolve_recipe``): ``--recipe fast``
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
from urllib.parse import urlsplit

import yaml

from visionrecipe.errors import VisionRecipeError


REQUIRED: Any = dataclasses.MISSING  # opt(REQUIRED, ...): no default, so the flag must be given


def opt(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None,
        positive: bool = False, cli: bool = True, positional: bool = False, flag: str | None = None,
        metavar: str | None = None, shortcut: tuple[str, Any] | None = None, words: tuple[str, ...] = (),
        bare: str | None = None) -> Any:
    """A dataclass field with the metadata the CLI and validation need.

    positional: an argument rather than a flag (a list takes one or more, a None default makes it
    optional); flag: the flag when it is not named after the field (`workers` keeps its YAML key);
    shortcut: (flag, value), a second flag that sets this one to value (`--json` = `--format json`);
    words: values taken as they are besides the field's type (`--lr auto`); bare: the value of the
    flag given without one (`--mlflow` alone).
    """
    meta = {"help": help, "choices": choices, "minimum": minimum, "positive": positive, "cli": cli,
            "positional": positional, "flag": flag, "metavar": metavar, "shortcut": shortcut, "words": words,
            "bare": bare}
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    data: str = opt("digits", "dataset: digits, cifar10, cifar100, a cifar pickle folder, a folder of class subfolders, or a .csv manifest (multilabel)")
    data_dir: str = opt("~/.cache/visionrecipe", "where downloads and the decoded-tensor cache live")
    image_size: int | None = opt(None, "resize images to this square size at decode time", positive=True)
    val_fraction: float = opt(0.1, "fraction of train carved out (stratified) for validation; 0 = validate on test", minimum=0.0)
    strict: bool = opt(False, "an unreadable image is an error instead of a skipped warning")
    # The flag says what the processes do (tune's --trial-workers are others); the key stays `workers`
    # so the config.yaml of earlier runs still loads.
    workers: int | None = opt(None, "processes for decoding images (default: all cores)", positive=True,
                              flag="--decode-workers")
    allow_outside_paths: bool = opt(False, "let a .csv manifest name images outside its own folder (../ or absolute paths)")
    cache: str = opt("auto", "where the train images live while training: memory (copied to the device whole), disk "
                             "(streamed from the record cache, batch by batch), auto (memory when they fit in half "
                             "the free RAM and GPU memory)", choices=("memory", "disk", "auto"))


# The settings that only some registry models accept (ModelSpec.options): create_model's keywords,
# model.json's `model_options`, the budget policy's tier fields, the search space's per-model parameters.
MODEL_OPTIONS = ("width", "depth", "stem")


@dataclass
class ModelConfig:
    model: str | None = opt(None, "model name from `visionrecipe models` or timm:<name> (default: recipe's)")
    width: float | None = opt(None, "width multiplier, for models that have one (fastnet)", positive=True)
    depth: int | None = opt(None, "number of blocks, for models that have one (fastnet)", positive=True)
    stem: int | None = opt(None, "fastnet's first-layer stride: 2 reads disjoint 2×2 patches, halving the side "
                                 "before the first block (photos; the budget policy sets it)", positive=True)
    head: str = opt("linear", "task head: linear or mlp:HIDDEN")
    weights: str | None = opt(None, "initial weights: imagenet, a run directory, a .safetensors or a state-dict file")
    freeze_backbone: bool = opt(False, "train only the head (backbone BatchNorm statistics stay fixed)")
    unfreeze_after: int | None = opt(None, "unfreeze the backbone after this many epochs (default with --weights "
                                           "imagenet: 1, the head trains alone first; 0: never frozen)", minimum=0)
    backbone_lr_mult: float | None = opt(None, "learning-rate multiplier for the backbone (discriminative LR; default "
                                               "0.1 with --weights imagenet, else 1)", minimum=0.0)
    task: str = opt("multiclass", "multiclass (softmax) or multilabel (sigmoid + BCE, CSV manifest)", choices=("multiclass", "multilabel"))
    threshold: float = opt(0.5, "multilabel decision threshold", minimum=0.0)

    def options(self) -> dict:
        """The registry options the user set (MODEL_OPTIONS: --width, --depth, --stem): create_model's
        keywords, model.json's `model_options`."""
        return {k: getattr(self, k) for k in MODEL_OPTIONS if getattr(self, k) is not None}


@dataclass
class OptimConfig:
    recipe: str | None = opt(None, "fast (fastnet, the CIFAR speed-record tricks) or standard; default fast unless --model is given", choices=("fast", "standard"))
    epochs: int | None = opt(None, "training epochs (with --time-budget: an upper bound)", positive=True)
    time_budget: float | None = opt(None, "seconds of training; the schedule is planned to end exactly there", positive=True)
    batch_size: int | None = opt(None, "images per step", positive=True)
    optimizer: str | None = opt(None, "optimizer", choices=("sgd", "adam", "adamw", "adagrad"))
    # One unit wherever an lr is shown (help, epoch line, doctor): the recipe's, recipes.lr_unit.
    lr: float | str | None = opt(None, "peak learning rate in the recipe's unit (fast: per 1024 images, standard: "
                                       "per batch); auto: the LR range test's suggestion, run before training",
                                 positive=True, words=("auto",))
    momentum: float | None = opt(None, "SGD momentum", minimum=0.0)
    bias_lr_mult: float | None = opt(None, "learning-rate multiplier for BatchNorm biases (airbench's bias scaler)", minimum=0.0)
    nesterov: bool | None = opt(None, "Nesterov momentum for SGD")
    weight_decay: float | None = opt(None, "weight decay", minimum=0.0)
    label_smoothing: float | None = opt(None, "label smoothing for cross-entropy", minimum=0.0)
    schedule: str | None = opt(None, "learning-rate schedule", choices=("constant", "cosine", "onecycle", "triangle"))
    warmup_epochs: float | None = opt(None, "linear warm-up length in epochs", minimum=0.0)
    ema: bool | None = opt(None, "keep an exponential moving average of the weights and evaluate with it")
    ema_decay: float = opt(0.99, "EMA decay per step", minimum=0.0)
    recalibrate_bn: int | None = opt(None, "train images (un-augmented, at the evaluation side) run through the "
                                           "evaluated model before each validation to re-estimate its BatchNorm "
                                           "statistics; 0: off (default: 1024 with the fast recipe, 0 with standard)",
                                     minimum=0)
    crop_padding: int | None = opt(None, "random-translate padding in pixels, 0 = off (default: the recipe's, scaled to the image size)", minimum=0)
    crop_scale: float | None = opt(None, "random-resized crops: the smallest share of an image's area a crop keeps "
                                         "(the largest is all of it); 0 = off (default: 0.35 for images of 96 px and "
                                         "more, off below, where --crop-padding translates)", minimum=0.0)
    crop_ratio: float = opt(4 / 3, "random-resized crops: the widest aspect ratio drawn (the narrowest is its "
                                   "inverse)", minimum=1.0)
    train_size: int | None = opt(None, "the side (px) training crops are resampled to at the end of training; "
                                       "evaluation stays at --image-size (default: the budget policy's, else the "
                                       "stored side)", positive=True)
    train_size_start: int | None = opt(None, "progressive resizing: the training side at the first step, growing "
                                             "to --train-size over the first 3/4 of the steps (default: the budget "
                                             "policy's; equal to --train-size: no ramp)", positive=True)
    auto_augment: str | None = opt(None, "trivial: TrivialAugment, one random op of torchvision's TrivialAugmentWide "
                                         "per image (rotate, shear, colour, ...) at a random strength, on the device; "
                                         "none: off (default: the recipe's, none)", choices=("none", "trivial"))
    mixup: float = opt(0.0, "MixUp alpha: blend each batch with itself reversed, share ~ Beta(alpha, alpha), and "
                            "the targets alike (e.g. 0.2); 0 = off", minimum=0.0)
    cutmix: float = opt(0.0, "CutMix alpha: paste a box of the reversed batch, area ~ Beta(alpha, alpha), targets "
                             "by the pasted area (e.g. 1.0); 0 = off; with --mixup each batch picks one", minimum=0.0)
    mix_prob: float = opt(1.0, "share of the batches that --mixup/--cutmix mix, in [0, 1]", minimum=0.0)
    flip: bool | None = opt(None, "random horizontal flip (default on, except for digits, which a mirror changes)")
    alternate_flip: bool | None = opt(None, "flip each image on alternate epochs instead of at random")
    whiten: bool | None = opt(None, "initialise fastnet's first layer from data (patch whitening) and freeze it")
    tta: bool | None = opt(None, "test-time augmentation: average logits over the image and its mirror")
    grad_clip: float | None = opt(None, "clip gradient norm to this value", positive=True)
    on_nan: str = opt("stop", "on a NaN/Inf loss: stop (keep last checkpoint) or skip the batch", choices=("stop", "skip"))
    class_weights: str = opt("none", "weight the cross-entropy by inverse class frequency (auto) or not (none)",
                             choices=("none", "auto"))
    sampler: str = opt("shuffle", "each epoch's order: shuffle every image once, or balanced (each class drawn "
                                  "equally often, small classes repeated)", choices=("shuffle", "balanced"))
    patience: int | None = opt(None, "stop after this many epochs without a better val_acc (the best epoch is kept)", positive=True)
    stop_at: float | None = opt(None, "stop once val_acc reaches this value, e.g. 0.95 (mAP for multilabel)", positive=True)
    # --batch-size stays the batch of one optimizer step; accumulation only bounds the memory.
    grad_accum: int = opt(1, "split each batch into this many micro-batches (same step, less memory; "
                             "must divide the batch)", positive=True)


@dataclass
class RunConfig:
    out: str | None = opt(None, "run directory (default runs/<data>-<model>-<time>)")
    overwrite: bool = opt(False, "replace an existing run directory")
    seed: int = opt(0, "random seed", minimum=0)
    device: str = opt("auto", "device", choices=("auto", "cpu", "cuda", "mps"))
    compile: str = opt("auto", "torch.compile the model (auto: on CUDA only, where it pays)", choices=("auto", "on", "off"))
    channels_last: bool = opt(True, "channels_last memory format for conv nets")
    precision: str | None = opt(None, "autocast precision of training steps (default: bf16 on CUDA, fp32 elsewhere); "
                                      "fp16 uses a gradient scaler", choices=("fp32", "bf16", "fp16"))
    deterministic: bool = opt(False, "deterministic algorithms (exact resume and repeat on CPU)")
    threads: int | None = opt(None, "CPU threads for PyTorch (default: physical cores)", positive=True)
    checkpoint_every: float | None = opt(None, "also checkpoint every N minutes mid-epoch (fractions too: 0.5 = 30 s)", positive=True)
    progress: bool = opt(True, "live progress bar")
    report: bool = opt(True, "write report.html at the end")
    tensorboard: bool = opt(False, "log to TensorBoard event files in the run directory")
    mlflow: str | None = opt(None, "track the run in MLflow (params, metrics per epoch, model and report): a "
                                   "tracking URI (http://host:5000, sqlite:///mlflow.db, a folder); alone: "
                                   "$MLFLOW_TRACKING_URI, else ./mlruns", metavar="URI", bare="default")


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


# --- the other commands' settings ----------------------------------------------------------------
# Not part of config.yaml: how a command is started, what it reads and where it writes. cli.py
# takes each command's flags from these (and from the sections above: `--device` is RunConfig's).

@dataclass
class LaunchOptions:
    """How `train` starts (also `--config` of doctor and tune)."""

    config: str | None = opt(None, "YAML file of settings (flags override it)")
    resume: str | None = opt(None, "continue an interrupted run exactly where it stopped", metavar="RUN_DIR")
    nproc: int | None = opt(None, "launch this many processes with torchrun (DDP)")


@dataclass
class EvaluateOptions:
    run: str = opt(REQUIRED, "run directory", positional=True)
    data: str | None = opt(None, "data spec (default: the run's)")
    split: str = opt("test", "the split to score", choices=("train", "val", "test"))
    json: bool = opt(False, "print one JSON object")
    per_class: bool = opt(False, "precision, recall, F1 and support per class")
    tta: bool | None = opt(None, "score with the mirror test-time augmentation (default: as the run was trained; "
                                 "--no-tta: the image alone, as leaderboards score)")


@dataclass
class PredictOptions:
    model: str = opt(REQUIRED, "run directory, an exported .onnx file (runs on onnxruntime) or a TorchScript "
                               "export (.pt)", positional=True)
    inputs: list[str] = opt(REQUIRED, "image files, folders or globs", positional=True)
    topk: int = opt(5, "classes shown per image, most probable first")
    batch_size: int = opt(64, "images per forward pass")
    format: str = opt("text", "output format", choices=("text", "json", "csv"), shortcut=("--json", "json"))
    out: str | None = opt(None, "write the predictions here instead of stdout", metavar="FILE")
    threshold: float | None = opt(None, "multilabel runs: answer the labels above this probability (default: the run's)")


@dataclass
class ModelsOptions:
    name: str | None = opt(None, "a model whose layer table to show (default: list all models)", positional=True)
    image_size: int | None = opt(None, "input size of the layer table (default: the model's, else 32)")
    in_channels: int = opt(3, "input channels of the layer table")
    num_classes: int = opt(10, "classes of the layer table's head")


@dataclass
class DoctorOptions:
    out: str | None = opt(None, "folder for doctor.json and the pictures (default runs/doctor-<data>)")
    json: bool = opt(False, "print doctor.json instead of the table")


@dataclass
class ReportOptions:
    run: str = opt(REQUIRED, "run directory", positional=True)


@dataclass
class TuneOptions:
    """A study's own settings; the trials' training settings are a dict of Config settings beside it."""

    out: str | Path = opt(REQUIRED, "folder of the study: trials, best.yaml, tune_report.html")
    trials: int = opt(20, "number of finished (complete or pruned) trials the study should hold")
    search_budget: float | None = opt(None, "seconds for this whole tune; no trial starts after it, a running one "
                                            "stops at its epoch end")
    trial_workers: int = opt(1, "parallel trial processes on this machine, one study")
    pruner: str = opt("median", "stop weak trials early on their per-epoch val_acc", choices=("median", "halving", "none"))
    space: str | Path | None = opt(None, "YAML search space: setting -> {type, low, high, log, choices} "
                                         "(README: Search and automate)")
    storage: str | None = opt(None, "Optuna storage: an RDB URL (postgresql://, mysql://, sqlite:///) or a "
                                    "FILE.journal (default: sqlite out/study.db)")
    study: str = opt("visionrecipe", "study name inside the storage")
    overwrite: bool = opt(False, "start the study afresh, deleting its trials")


@dataclass
class AutoOptions:
    """auto's own settings; the data settings, seed and device are a dict of Config settings beside it."""

    out: str | Path = opt(REQUIRED, "output directory")
    search_budget: float = opt(REQUIRED, "seconds for the whole job: doctor, tune, train, evaluate, export, report")
    force: bool = opt(False, "go on when a doctor check fails")
    # full when the budget is at least auto.FULL_DOCTOR_MIN_BUDGET
    doctor: str = opt("auto", "doctor checks: full, data (the data checks only), auto (full when the budget is "
                              "at least 600 s)", choices=("auto", "full", "data"))
    tune_share: float = opt(0.5, "share of the budget left after the doctor that goes to tune")
    overwrite: bool = opt(False, "replace an earlier auto's output directory")
    space: str | Path | None = opt(None, "tune's YAML search space (default: tune's)")
    trials: int = opt(200, "at most this many tune trials (the budget usually ends the tune first)")


@dataclass
class ExportOptions:
    run: str = opt(REQUIRED, "run directory", positional=True)
    format: str = opt("onnx", "file format", choices=("onnx", "torchscript"))
    out: str | None = opt(None, "output file (default RUN/model.onnx or RUN/model.torchscript.pt)", metavar="FILE")
    opset: int = opt(17, "ONNX opset version")
    quantize: str | None = opt(None, "int8 weights with onnxruntime (ONNX only)", choices=("dynamic",))
    data: str | None = opt(None, "data whose test split verifies the export (default the run's)", metavar="SPEC")
    tolerance: float = opt(1e-4, "largest allowed logit difference, times max(1, largest |logit|)")
    json: bool = opt(False, "print the verification result as JSON")


@dataclass
class PushOptions:
    run: str = opt(REQUIRED, "run directory", positional=True)
    repo_id: str = opt(REQUIRED, "Hugging Face Hub model repository, OWNER/NAME (created when missing)",
                       positional=True)
    private: bool = opt(False, "create the repository private (an existing one keeps its visibility)")
    onnx: bool = opt(True, "also upload model.onnx, exported and verified as `export` does")


@dataclass
class ServeOptions:
    """How `serve` starts; what the service itself does is ServeSettings."""

    model: str = opt(REQUIRED, "run directory, or an exported .onnx file (runs on onnxruntime)", positional=True)
    port: int = opt(8000, "TCP port to listen on")
    log_level: str = opt("warning", "uvicorn's log level", choices=("critical", "error", "warning", "info", "debug"))
    access_log: bool = opt(False, "log every request")


@dataclass
class ServeSettings:
    """The HTTP service (deploy/serve.py create_app): batching, limits per request, who may call it.
    Checked here, where the values enter; each error is one line naming the setting."""

    max_batch: int = opt(32, "images per forward pass")
    max_wait_ms: float = opt(5.0, "how long the first image of a batch waits for others to share it")
    max_upload_mb: float = opt(10.0, "largest request body in MiB")
    max_megapixels: float = opt(40.0, "largest image, refused from its header before decoding")
    max_files: int = opt(100, "most images in one request")
    max_request_megapixels: float | None = opt(None, "most pixels in one request, all images together "
                                                     "(default: 100 or --max-megapixels)")
    # uploads decoded at once over all requests: memory ~ this × the largest image
    decode_threads: int = opt(2, "images decoded at once over all requests; bounds decoding memory")
    batching: bool = opt(True, "share forward passes between concurrent requests (--no-batching: one per request)")
    # on loopback only local Host names are answered
    host: str = opt("127.0.0.1", "address to bind (127.0.0.1: this machine only; 0.0.0.0: the network)")
    allow_origins: tuple[str, ...] = opt((), "a site whose pages may post here, e.g. http://localhost:3000 "
                                             "(repeatable)", flag="--allow-origin", metavar="ORIGIN")

    def __post_init__(self):
        if self.max_request_megapixels is None:
            self.max_request_megapixels = max(100.0, self.max_megapixels)
        for name in ("max_batch", "max_files", "decode_threads"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise VisionRecipeError(f"{name} must be a positive integer, got {value!r}")
        checks = {"max_wait_ms": (self.max_wait_ms >= 0, "non-negative"),  # NaN fails every comparison
                  "max_upload_mb": (self.max_upload_mb > 0, "positive"),
                  "max_megapixels": (self.max_megapixels > 0, "positive"),
                  "max_request_megapixels": (self.max_request_megapixels >= self.max_megapixels,
                                             f"at least max_megapixels ({self.max_megapixels:g})")}
        for name, (ok, what) in checks.items():
            if not ok:
                raise VisionRecipeError(f"{name} must be {what}, got {getattr(self, name)!r}")
        self.allow_origins = tuple(normalize_origin(origin) for origin in self.allow_origins)


def normalize_origin(origin: str) -> str:
    """An --allow-origin value as browsers send it: normalize_origin("HTTP://Example.com:3000/") == "http://example.com:3000"."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") \
            or parts.query or parts.fragment or "@" in parts.netloc:
        raise VisionRecipeError(f"--allow-origin needs an origin such as http://localhost:3000, got {origin!r}")
    return f"{parts.scheme}://{parts.netloc.lower()}"


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


def setting_type(annotation: Any) -> type:
    """`int | None` -> int, `tuple[str, ...]` -> tuple; annotations are strings (`from __future__`)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, globals())  # our own annotations only
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return setting_type(args[0])
    return typing.get_origin(annotation) or annotation


def coerce(name: str, value: Any) -> Any:
    """Check one setting's value and convert it to the field's type; errors name the setting."""
    return check_value(FIELDS[name][1], value)


def check_value(f: dataclasses.Field, value: Any) -> Any:
    """`value` converted to field `f`'s type (or, for a list or tuple, to str) and checked against
    its choices and bounds; the error names the setting."""
    name = f.name
    kind = setting_type(f.type)
    if kind in (list, tuple, Path):
        kind = str
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in f.metadata.get("words", ()):
        return value.lower()
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


def config_from_args(args: argparse.Namespace, own: tuple[str, ...] = ()) -> Config:
    """`--config FILE` first, then every flag the user typed on top of it. `own`: the command's
    options named like a setting (doctor's --out), which are not the run's."""
    typed = {name: value for name, value in vars(args).items() if name in FIELDS and name not in own}
    if getattr(args, "config", None):
        return load_config(args.config, typed)
    return apply_overrides(Config(), typed)
