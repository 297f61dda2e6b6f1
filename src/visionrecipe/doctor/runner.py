"""`visionrecipe doctor`: Karpathy's training recipe as automated checks, run before training.

    from visionrecipe.config import Config
    from visionrecipe.doctor.runner import run_doctor, format_table

    report = run_doctor(Config.from_dict({"data": "digits"}), out="runs/doctor-digits")
    report["passed"], [c["verdict"] for c in report["checks"]]
    print(format_table(report["checks"]))

The data, model, normalisation, augmentation and optimizer are resolved exactly as `train` resolves
them (resolve_recipe, the trainer's BatchAugment and build_optimizer), so a check speaks about the
run you are about to start. The checks themselves live in doctor_data.py (the data) and
doctor_checks.py (the model and its training); this module feeds them and writes doctor.json plus
three pictures: samples.png (a few images per class), batch.png (the augmented, normalised batch
decoded back to pixels) and lr_range.png (loss against learning rate).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from visionrecipe.train.augment import BatchAugment
from visionrecipe.rundir import atomic_write_text
from visionrecipe.config import Config, resolve_crop_padding, resolve_recipe, resolve_device_defaults
from visionrecipe.data import Dataset, channel_stats, load_dataset
from visionrecipe.doctor.checks import (Check, check_batch_independence, check_batch_statistics, check_capacity,
                            check_determinism, check_init_loss, check_input_dependence, check_lr_range,
                            check_overfit_batch, lr_range, smooth, suggest_lr, timed)
from visionrecipe.doctor.data_checks import class_samples, data_checks
from visionrecipe.errors import VisionRecipeError
from visionrecipe.models import create_model, get_spec
from visionrecipe.system import select_device, set_threads
from visionrecipe.train.optim import build_optimizer
from visionrecipe.train.augment import epoch_order

# Budgets, sized so digits takes about a minute on two CPU cores.
TRAIN_SUBSET = 1024  # images for the short trainings (baseline, capacity)
VAL_SUBSET = 500
BASELINE_STEPS = 60  # Adam steps of 64 images, for each of the real and zeroed runs
CAPACITY_STEPS = 60
LR_RANGE_STEPS = 100
LR_RANGE_BATCH = 64  # at most; the recipe's lr units (per 1024 images for fast) keep the suggestion valid
DETERMINISM_STEPS = 5
SAMPLES_PER_CLASS = 8
SMALL_IMAGE = 3 * 32 * 32  # values per image up to which the doctor runs on one CPU thread
MAX_CLASS_ROWS = 20  # rows of the class picture; more classes are left out of it (not of the checks)
FIGURES = ("samples.png", "batch.png", "lr_range.png")


@dataclass
class Setup:
    """Everything the checks share, resolved once as the trainer would."""

    cfg: Config
    data: Dataset
    device: torch.device
    images: torch.Tensor  # train images, uint8 on the device
    labels: torch.Tensor
    mean: list[float]
    std: list[float]
    augment: BatchAugment | None  # set once the normalisation is known
    head_path: str
    has_width: bool


def prepare(cfg: Config, device: str = "auto", progress: bool = False) -> Setup:
    cfg = resolve_recipe(cfg)
    if cfg.model.task != "multiclass":
        raise VisionRecipeError("doctor checks single-label (multiclass) training; --task multilabel is not supported")
    device_t = select_device(device)
    resolve_device_defaults(cfg, device_t.type)
    spec = get_spec(cfg.model.model)  # an unknown model fails before any data is decoded
    if cfg.model.weights and cfg.data.image_size is None:
        from visionrecipe.train.finetune import pretrained_image_size

        cfg.data.image_size = pretrained_image_size(cfg, spec)  # as the trainer: the weights' own size
    data = load_dataset(cfg.data.data, data_dir=cfg.data.data_dir, image_size=cfg.data.image_size,
                        val_fraction=cfg.data.val_fraction, seed=cfg.run.seed, strict=cfg.data.strict,
                        progress=progress, workers=cfg.data.workers,
                        allow_outside_paths=cfg.data.allow_outside_paths)
    # Small images make each op too small to split: on two busy cores a second thread made the
    # doctor ten times slower (spinning at barriers). Large images get the trainer's default.
    small = data.train.images[0].numel() <= SMALL_IMAGE
    set_threads(cfg.run.threads or (1 if small and device_t.type == "cpu" else None), device_t)
    mean, std = channel_stats(data.train.images)
    cfg.optim.crop_padding = resolve_crop_padding(cfg, data.train.images.shape[2])
    images, labels = data.train.images.to(device_t), data.train.labels.to(device_t)
    setup = Setup(cfg, data, device_t, images, labels, mean, std, None, spec.head_path,
                  "width" in spec.options and not cfg.model.weights)
    if cfg.model.weights:
        # Fine-tuning normalises with the pretrained weights' statistics, as the trainer does.
        setup.mean, setup.std = _pretrained_preprocessing(setup)
    setup.augment = BatchAugment(setup.mean, setup.std, crop_padding=cfg.optim.crop_padding, flip=cfg.optim.flip,
                                 alternate_flip=cfg.optim.alternate_flip, n_train=len(labels), seed=cfg.run.seed,
                                 device=device_t)
    return setup


def _pretrained_preprocessing(setup: Setup) -> tuple[list[float], list[float]]:
    found = _load_weights(_create(setup, 1.0), setup)
    return found.get("mean", setup.mean), found.get("std", setup.std)


def _load_weights(model: torch.nn.Module, setup: Setup) -> dict:
    from visionrecipe.train.finetune import load_initial_weights

    classes = list(setup.data.classes)
    spec = get_spec(setup.cfg.model.model)
    return load_initial_weights(model, setup.cfg, spec, len(classes), classes=classes) or {}


def _create(setup: Setup, width: float) -> torch.nn.Module:
    cfg = setup.cfg
    options = {k: v for k, v in (("width", cfg.model.width), ("depth", cfg.model.depth)) if v is not None}
    if width != 1.0:
        options["width"] = options.get("width", 1.0) * width
    c, h = setup.images.shape[1:3]
    return create_model(cfg.model.model, len(setup.data.classes), in_channels=c, image_size=h,
                        head=cfg.model.head, **options)


def build_model(setup: Setup, width: float = 1.0) -> torch.nn.Module:
    """A fresh model as Trainer.setup builds it: registry, initial weights, whitening from data."""
    cfg = setup.cfg
    model = _create(setup, width)
    if cfg.model.weights:
        _load_weights(model, setup)
    if cfg.optim.whiten:
        from visionrecipe.models.fastnet import init_whitening

        init_whitening(model, setup.augment.normalise(setup.images[:5000]).float())
    return model.to(setup.device)


def recipe_batches(setup: Setup, batch_size: int):
    """Endless training batches exactly as the trainer draws them: epoch order, then BatchAugment."""
    seed, n = setup.cfg.run.seed, len(setup.labels)
    generator = torch.Generator(device=setup.device)
    step, epoch = 0, 0
    while True:
        order = epoch_order(n, seed, epoch, setup.device)
        for position in range(max(1, n // batch_size)):
            index = order[position * batch_size:(position + 1) * batch_size]
            generator.manual_seed(seed * 1_000_003 + step)
            yield setup.augment(setup.images[index], index, epoch, generator), setup.labels[index]
            step += 1
        epoch += 1


def decode(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """A normalised float batch back to uint8 pixels: x * std + mean."""
    c = x.shape[1]
    mean_t = torch.tensor(mean, device=x.device).view(1, c, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, c, 1, 1)
    return ((x.detach().float() * std_t + mean_t) * 255).round().clamp(0, 255).to(torch.uint8).cpu()


def _subset(setup: Setup, split, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(setup.cfg.run.seed)
    index = torch.randperm(len(split.labels), generator=generator)[:limit]
    x = setup.augment.normalise(split.images[index].to(setup.device))
    return x, split.labels[index].to(setup.device)


def model_checks(setup: Setup, out: Path, emit: Callable[[Check], None]) -> list[Check]:
    """Checks 2–9, each timed and passed to `emit` as it finishes."""
    from visionrecipe.evaluate.report import image_grid, save_figure

    cfg, classes, seed = setup.cfg, setup.data.classes, setup.cfg.run.seed
    batch_size = min(cfg.optim.batch_size, len(setup.labels))
    checks: list[Check] = []

    def add(run: Callable[[], Check]) -> None:
        checks.append(timed(run))
        emit(checks[-1])

    x, y = next(recipe_batches(setup, batch_size))
    shown = min(32, len(y))
    titles = [classes[i] for i in y[:shown].tolist()]
    save_figure(image_grid(list(decode(x[:shown], setup.mean, setup.std)), 8, titles=titles), out / "batch.png")
    add(lambda: check_batch_statistics(x))
    torch.manual_seed(seed)
    model = build_model(setup)
    counts = torch.bincount(setup.labels.cpu(), minlength=len(classes))
    add(lambda: check_init_loss(model, x, y, len(classes), counts))

    x_train, y_train = _subset(setup, setup.data.train, TRAIN_SUBSET)
    x_val, y_val = _subset(setup, setup.data.val or setup.data.test, VAL_SUBSET)
    add(lambda: check_input_dependence(lambda: build_model(setup), x_train, y_train, x_val, y_val,
                                       steps=BASELINE_STEPS, seed=seed))
    rows = [i for row in class_samples(setup.labels.cpu(), len(classes), per_class=2, seed=seed) for i in row]
    small = torch.tensor(rows, device=setup.device)
    torch.manual_seed(seed)
    add(lambda: check_overfit_batch(build_model(setup), setup.augment.normalise(setup.images[small]),
                                    setup.labels[small]))
    add(lambda: check_batch_independence(model, x[:16], y[:16]))
    add(lambda: _lr_range_check(setup, out))
    widen = (lambda width: build_model(setup, width)) if setup.has_width else None
    add(lambda: check_capacity(widen, x_train, y_train, steps=CAPACITY_STEPS, seed=seed))
    add(lambda: check_determinism(lambda: _short_run(setup, batch_size)))
    return checks


def _lr_range_check(setup: Setup, out: Path) -> Check:
    from visionrecipe.evaluate.report import new_figure, save_figure

    cfg = setup.cfg
    torch.manual_seed(cfg.run.seed)
    model = build_model(setup)
    batch_size = min(cfg.optim.batch_size, LR_RANGE_BATCH, len(setup.labels))
    optimizer = build_optimizer(model, cfg, setup.head_path, batch_size)
    factors, losses = lr_range(model, optimizer, recipe_batches(setup, batch_size), steps=LR_RANGE_STEPS,
                               label_smoothing=cfg.optim.label_smoothing)
    lrs = [cfg.optim.lr * f for f in factors]  # in --lr units
    check = check_lr_range(lrs, losses, cfg.optim.lr)
    if len(losses) >= 10:
        suggested, _ = suggest_lr(lrs, losses)
        fig = new_figure(6, 3.6)
        ax = fig.subplots()
        ax.plot(lrs, losses, color="#cbd5e1", lw=1, label="loss")
        ax.plot(lrs, smooth(losses), color="#2563eb", lw=2, label="smoothed")
        ax.axvline(suggested, color="#16a34a", ls="--", label=f"suggested {suggested:.2g}")
        ax.axvline(cfg.optim.lr, color="#f59e0b", ls=":", label=f"configured {cfg.optim.lr:.2g}")
        ax.set_xscale("log")
        ax.set_ylim(top=min(max(losses), 3 * smooth(losses).max()))
        ax.set_xlabel("learning rate (--lr units)")
        ax.set_ylabel("training loss")
        ax.set_title(f"learning-rate range test ({cfg.model.model}, {cfg.optim.optimizer})")
        ax.legend(frameon=False, fontsize=8)
        save_figure(fig, out / "lr_range.png")
    return check


def _short_run(setup: Setup, batch_size: int) -> list[float]:
    """A few seeded training steps through the trainer's own optimizer and batches."""
    cfg = setup.cfg
    torch.manual_seed(cfg.run.seed)
    model = build_model(setup).train()
    optimizer = build_optimizer(model, cfg, setup.head_path, batch_size)
    losses = []
    for _, (x, y) in zip(range(DETERMINISM_STEPS), recipe_batches(setup, batch_size)):
        loss = F.cross_entropy(model(x).float(), y, label_smoothing=cfg.optim.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def run_doctor(cfg: Config, out: str | Path | None = None, *, device: str = "auto",
               emit: Callable[[Check], None] | None = None, progress: bool = False) -> dict:
    """Run every check, write doctor.json and the pictures into `out`; returns doctor.json's content."""
    try:
        from visionrecipe.evaluate.report import image_grid, save_figure
    except ImportError:
        raise VisionRecipeError("the doctor's pictures need matplotlib: pip install 'visionrecipe[report]'") from None

    started = time.perf_counter()
    emit = emit or (lambda check: None)
    setup = prepare(cfg, device, progress)
    cfg, data = setup.cfg, setup.data
    out = Path(out or Path("runs") / f"doctor-{Path(cfg.data.data.rstrip('/')).name or 'data'}").expanduser()
    out.mkdir(parents=True, exist_ok=True)

    checks = data_checks(data)
    for check in checks:
        emit(check)
    rows = class_samples(data.train.labels, len(data.classes), SAMPLES_PER_CLASS, cfg.run.seed)[:MAX_CLASS_ROWS]
    images = [data.train.images[row[i]] if i < len(row) else None for row in rows for i in range(SAMPLES_PER_CLASS)]
    save_figure(image_grid(images, SAMPLES_PER_CLASS, row_labels=data.classes[:len(rows)]), out / "samples.png")
    checks += model_checks(setup, out, emit)

    report = {
        "data": cfg.data.data, "model": cfg.model.model, "recipe": cfg.optim.recipe, "device": str(setup.device),
        "passed": not any(c.verdict == "fail" for c in checks), "seconds": round(time.perf_counter() - started, 1),
        "checks": [asdict(c) for c in checks],
        "figures": [name for name in FIGURES if (out / name).is_file()],
        "config": cfg.to_dict(),
    }
    atomic_write_text(out / "doctor.json", json.dumps(report, indent=2, default=float))
    report["out"] = str(out)
    return report


HEADER = f"{'check':<28} {'verdict':<7}  {'measured':<62} what to do"


def format_row(check: Check | dict) -> str:
    c = check if isinstance(check, dict) else asdict(check)
    return f"{c['name']:<28} {c['verdict']:<7}  {c['figure']:<62} {c['advice']}".rstrip()


def format_table(checks: list) -> str:
    return "\n".join([HEADER, *map(format_row, checks)])
