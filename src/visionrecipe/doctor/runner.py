"""`visionrecipe doctor`: Karpathy's training recipe as automated checks, run before training.

    from visionrecipe.config import Config
    from visionrecipe.doctor.runner import run_doctor, format_table

    report = run_doctor(Config.from_dict({"data": "digits"}), out="runs/doctor-digits")
    report["passed"], [c["verdict"] for c in report["checks"]]
    print(format_table(report["checks"]))

The data, model, normalisation, augmentation, batch size, loss and optimizer are built by the
trainer's own train/build.py (resolve, build_run) and build_optimizer, so a check speaks about the
run you are about to start. The checks themselves live in data_checks.py (the data) and
checks.py (the model and its training); this module feeds them and writes doctor.json plus
three pictures: samples.png (a few images per class), batch.png (the augmented, normalised batch
decoded back to pixels) and lr_range.png (loss against learning rate).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from visionrecipe.config import Config
from visionrecipe.doctor.checks import (Check, check_batch_independence, check_batch_statistics, check_capacity,
                                        check_determinism, check_init_loss, check_input_dependence, check_lr_range,
                                        check_overfit_batch, timed)
from visionrecipe.doctor.data_checks import class_samples, data_checks
from visionrecipe.errors import VisionRecipeError
from visionrecipe.models import get_spec
from visionrecipe.rundir import atomic_write_text
from visionrecipe.recipes import copy_config, lr_per_1024, lr_unit
from visionrecipe.system import select_device, set_threads
from visionrecipe.train.build import BuiltRun, build_run, load_data, resolve
from visionrecipe.train.lr_find import base_lr, range_test, smooth
from visionrecipe.train.optim import build_optimizer

# Budgets, sized so digits takes about a minute on two CPU cores.
TRAIN_SUBSET = 1024  # images for the short trainings (baseline, capacity)
VAL_SUBSET = 500
BASELINE_STEPS = 60  # Adam steps of 64 images, for each of the real and zeroed runs
CAPACITY_STEPS = 60
LR_RANGE_BATCH = 64  # at most, when --lr is per 1024 images (fast): that unit carries the pick to the run's batch
DETERMINISM_STEPS = 5
SAMPLES_PER_CLASS = 8
SMALL_IMAGE = 3 * 32 * 32  # values per image up to which the doctor runs on one CPU thread
MAX_CLASS_ROWS = 20  # rows of the class picture; more classes are left out of it (not of the checks)
FIGURES = ("samples.png", "batch.png", "lr_range.png")


def prepare(cfg: Config, device: str = "auto", progress: bool = False) -> BuiltRun:
    """The run `train` would start from these settings (train/build.py): the same resolved config
    (small-data batch included), data, normalisation, augmentation, loss and first model."""
    if cfg.model.task != "multiclass":
        raise VisionRecipeError("doctor checks single-label (multiclass) training; --task multilabel is not supported")
    device_t = select_device(device)
    data = load_data(resolve(cfg, device_t.type), progress=progress, device=device_t)
    # Small images make each op too small to split: on two busy cores a second thread made the
    # doctor ten times slower (spinning at barriers). Large images get the trainer's default.
    # run_doctor gives the process its threads back when it is done.
    small = data.train.images[0].numel() <= SMALL_IMAGE
    set_threads(cfg.run.threads or (1 if small and device_t.type == "cpu" else None), device_t)
    cfg = resolve(cfg, device_t.type, data)
    torch.manual_seed(cfg.run.seed)  # the first model is the one training starts from
    return build_run(cfg, data, device_t)


def has_width(run: BuiltRun) -> bool:
    """Whether the capacity check can widen the model (a registry --width, not fixed by --weights)."""
    return "width" in get_spec(run.cfg.model.model).options and not run.cfg.model.weights


def decode(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """A normalised float batch back to uint8 pixels: x * std + mean."""
    c = x.shape[1]
    mean_t = torch.tensor(mean, device=x.device).view(1, c, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, c, 1, 1)
    return ((x.detach().float() * std_t + mean_t) * 255).round().clamp(0, 255).to(torch.uint8).cpu()


def _subset(run: BuiltRun, split, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(run.cfg.run.seed)
    index = torch.randperm(len(split.labels), generator=generator)[:limit]
    x = run.augment.normalise(split.images[index].to(run.device))
    return x, split.labels[index].to(run.device)


def model_checks(run: BuiltRun, out: Path, emit: Callable[[Check], None]) -> list[Check]:
    """Checks 2–9, each timed and passed to `emit` as it finishes."""
    from visionrecipe.evaluate.report import image_grid, save_figure

    cfg, classes, seed = run.cfg, run.data.classes, run.cfg.run.seed
    batch_size = min(cfg.optim.batch_size, len(run.labels))
    checks: list[Check] = []

    def add(check: Callable[[], Check]) -> None:
        checks.append(timed(check))
        emit(checks[-1])

    def fresh_model(width_scale: float = 1.0) -> torch.nn.Module:
        return run.new_model(width_scale)

    x, y = next(run.batches(batch_size))
    shown = min(32, len(y))
    titles = [classes[i] for i in y[:shown].tolist()]
    save_figure(image_grid(list(decode(x[:shown], run.mean, run.std)), 8, titles=titles), out / "batch.png")
    add(lambda: check_batch_statistics(x))
    model = run.model  # built by prepare from the seed, as training starts
    counts = torch.bincount(run.labels.cpu(), minlength=len(classes))
    add(lambda: check_init_loss(model, x, y, len(classes), counts))

    x_train, y_train = _subset(run, run.data.train, TRAIN_SUBSET)
    x_val, y_val = _subset(run, run.data.val or run.data.test, VAL_SUBSET)
    add(lambda: check_input_dependence(fresh_model, x_train, y_train, x_val, y_val, steps=BASELINE_STEPS, seed=seed))
    rows = [i for row in class_samples(run.labels.cpu(), len(classes), per_class=2, seed=seed) for i in row]
    small = torch.tensor(rows, device=run.device)
    torch.manual_seed(seed)
    add(lambda: check_overfit_batch(fresh_model(), run.augment.normalise(run.gather(small)), run.labels[small]))
    add(lambda: check_batch_independence(model, x[:16], y[:16]))
    add(lambda: _lr_range_check(run, out))
    add(lambda: check_capacity(fresh_model if has_width(run) else None, x_train, y_train, steps=CAPACITY_STEPS,
                               seed=seed))
    add(lambda: check_determinism(lambda: _short_run(run, batch_size)))
    return checks


def _lr_range_check(run: BuiltRun, out: Path) -> Check:
    """train/lr_find.py's range test, as `train --lr auto` runs it; a per-1024 lr is measured on
    smaller batches (the unit carries it to the run's batch), a per-batch lr at the run's batch."""
    from visionrecipe.evaluate.report import new_figure, save_figure

    cfg = run.cfg
    unit = lr_unit(cfg)
    test = range_test(run, min(cfg.optim.batch_size, LR_RANGE_BATCH) if lr_per_1024(cfg) else None)
    lrs, losses = test.lrs, test.losses
    check = check_lr_range(lrs, losses, cfg.optim.lr, unit)
    if len(losses) >= 10:
        found = test.suggestion
        fig = new_figure(6, 3.6)
        ax = fig.subplots()
        ax.plot(lrs, losses, color="#cbd5e1", lw=1, label="loss")
        ax.plot(lrs, smooth(losses), color="#2563eb", lw=2, label="smoothed")
        ax.axvspan(*found.region, color="#16a34a", alpha=0.08, label="descending")
        ax.axvline(found.lr, color="#16a34a", ls="--", label=f"suggested {found.lr:.2g}")
        if cfg.optim.lr != "auto":
            ax.axvline(cfg.optim.lr, color="#f59e0b", ls=":", label=f"configured {cfg.optim.lr:.2g}")
        ax.set_xscale("log")
        ax.set_ylim(top=min(max(losses), 3 * smooth(losses).max()))
        ax.set_xlabel(f"learning rate ({unit}, as --lr)")
        ax.set_ylabel("training loss")
        ax.set_title(f"learning-rate range test ({cfg.model.model}, {cfg.optim.optimizer}, batch {test.batch_size})")
        ax.legend(frameon=False, fontsize=8)
        save_figure(fig, out / "lr_range.png")
    return check


def _short_run(run: BuiltRun, batch_size: int) -> list[float]:
    """A few seeded training steps through the trainer's own optimizer, batches and loss."""
    cfg = run.cfg
    torch.manual_seed(cfg.run.seed)
    model = run.new_model().train()
    optimizer = build_optimizer(model, copy_config(cfg, lr=base_lr(cfg)), run.head_path, batch_size)
    losses = []
    for _, (x, y) in zip(range(DETERMINISM_STEPS), run.batches(batch_size)):
        loss = run.loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def run_doctor(cfg: Config, out: str | Path | None = None, *, device: str = "auto",
               emit: Callable[[Check], None] | None = None, progress: bool = False) -> dict:
    """Run every check, write doctor.json and the pictures into `out`; returns doctor.json's content.
    The process's CPU threads are as they were when it returns."""
    try:
        import visionrecipe.evaluate.report  # noqa: F401  (the pictures are drawn with matplotlib)
    except ImportError:
        raise VisionRecipeError("the doctor's pictures need matplotlib: pip install 'visionrecipe[report]'") from None

    threads = torch.get_num_threads()
    try:
        return _run_doctor(cfg, out, device, emit or (lambda check: None), progress)
    finally:
        torch.set_num_threads(threads)  # prepare may have set one thread for small images


def _run_doctor(cfg: Config, out: str | Path | None, device: str, emit: Callable[[Check], None],
                progress: bool) -> dict:
    from visionrecipe.evaluate.report import image_grid, save_figure

    started = time.perf_counter()
    run = prepare(cfg, device, progress)
    cfg, data = run.cfg, run.data
    out = Path(out or Path("runs") / f"doctor-{Path(cfg.data.data.rstrip('/')).name or 'data'}").expanduser()
    out.mkdir(parents=True, exist_ok=True)

    checks = data_checks(data)
    for check in checks:
        emit(check)
    rows = class_samples(data.train.labels, len(data.classes), SAMPLES_PER_CLASS, cfg.run.seed)[:MAX_CLASS_ROWS]
    images = [data.train.images[row[i]] if i < len(row) else None for row in rows for i in range(SAMPLES_PER_CLASS)]
    save_figure(image_grid(images, SAMPLES_PER_CLASS, row_labels=data.classes[:len(rows)]), out / "samples.png")
    checks += model_checks(run, out, emit)

    report = {
        "data": cfg.data.data, "model": cfg.model.model, "recipe": cfg.optim.recipe, "device": str(run.device),
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
