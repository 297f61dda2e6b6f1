"""The learning-rate range test (Smith 2015; fastai's `lr_find`): `train --lr auto` and the doctor.

    test = range_test(built)              # a copy of the run's model, its batches, loss and optimizer
    test.lrs, test.losses                 # in --lr units (recipes.lr_unit: per 1024 images or per batch)
    test.suggestion.lr, test.suggestion.region   # the pick, inside the (first, last) lr of the descent
    cfg = resolve_auto_lr(built, world)   # --lr auto replaced by the pick: what config.yaml records

The lr grows exponentially from 1e-4× to 1e2× a base lr (--lr, or the recipe's for auto) over 100
steps. fastai picks the steepest descent of the smoothed loss, whose known failure is a pick on the
noisy start or at the cliff's edge; here the pick is the steepest point *inside the descending
region* (from where the smoothed loss last crossed a tenth of its fall, to its minimum), and never
above a tenth of the lr at the minimum (nor below the region's start). The model, its BatchNorm statistics and the RNG streams of the
run are left as they were: training starts from the same weights whether or not the test ran.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visionrecipe.config import Config
from visionrecipe.errors import VisionRecipeError
from visionrecipe.recipes import RECIPES, copy_config, lr_unit
from visionrecipe.system import log
from visionrecipe.train.build import BuiltRun
from visionrecipe.train.optim import build_optimizer

LR_RANGE = (1e-4, 1e2)  # multiples of the base lr swept by the range test
RANGE_STEPS = 100
DIVERGED = 4.0  # the test stops once the smoothed loss exceeds this multiple of its minimum
DESCENT_STARTED = 0.1  # the descent starts where the smoothed loss has made this share of its fall
BELOW_MINIMUM = 10.0  # the pick is at most the lr of the lowest loss divided by this
NO_FALL = 0.97  # a minimum above this share of the starting loss: the loss does not fall


def base_lr(cfg: Config) -> float:
    """The lr the range test multiplies: --lr, or the recipe's when it is auto."""
    return RECIPES[cfg.optim.recipe].lr if cfg.optim.lr == "auto" else cfg.optim.lr


def lr_range(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable, *, steps: int = RANGE_STEPS,
             span: tuple[float, float] = LR_RANGE,
             loss_fn: Callable = F.cross_entropy) -> tuple[list[float], list[float]]:
    """Multiply the optimizer's learning rates by a factor growing exponentially over `steps`;
    returns (factors, losses), stopping early once the loss diverges. `loss_fn` is the run's
    training loss (build_run's, label smoothing and class weights included)."""
    model.train()
    base = [group["lr"] for group in optimizer.param_groups]
    factors, losses = [], []
    for step, (x, y) in zip(range(steps), batches):
        factor = span[0] * (span[1] / span[0]) ** (step / max(steps - 1, 1))
        for group, lr in zip(optimizer.param_groups, base):
            group["lr"] = lr * factor
        loss = loss_fn(model(x).float(), y)
        if not torch.isfinite(loss):
            break
        factors.append(factor)
        losses.append(float(loss.detach()))
        if step > 10 and losses[-1] > DIVERGED * min(losses):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return factors, losses


def smooth(losses: list[float], beta: float = 0.9) -> np.ndarray:
    """A running median of 5 (one-step spikes vanish), then the bias-corrected exponential moving
    average fastai's LR finder plots."""
    values = np.asarray(losses, dtype=float)
    medians = [float(np.median(values[max(0, i - 2):i + 3])) for i in range(len(values))]
    out, average = [], 0.0
    for i, loss in enumerate(medians):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** (i + 1)))
    return np.array(out)


@dataclass
class Suggestion:
    lr: float
    lr_at_minimum: float
    region: tuple[float, float]  # (first, last) lr of the descending region; the pick lies inside
    falls: bool  # whether the smoothed loss falls at all (its minimum below NO_FALL × its start)
    stop: int  # index where the curve is cut: the divergence, or its end


def suggest_lr(lrs: list[float], losses: list[float]) -> Suggestion:
    """The steepest descent of the smoothed loss against log(lr), looked for only inside the
    descending region, and at most a tenth of the lr at the minimum."""
    smoothed = smooth(losses)
    diverged = np.nonzero(smoothed > DIVERGED * smoothed.min())[0]
    stop = int(diverged[0]) if len(diverged) else len(smoothed)
    lowest = int(np.argmin(smoothed[:stop]))
    fall = smoothed[0] - smoothed[lowest]
    # The descent is the stretch before the minimum that stays a tenth of the fall below the start:
    # the last crossing, so an early dip of a noisy start is not taken for it.
    above = np.nonzero(smoothed[:lowest + 1] > smoothed[0] - DESCENT_STARTED * fall)[0]
    start = int(above[-1]) + 1 if len(above) else 0
    log_lrs = np.log(np.asarray(lrs, dtype=float))
    steepest = start
    if lowest - start >= 2:
        steepest = start + int(np.argmin(np.gradient(smoothed[start:lowest + 1], log_lrs[start:lowest + 1])))
    # The largest index whose lr is at most a tenth of the minimum's (the sweep is increasing).
    tenth = int(np.searchsorted(log_lrs, log_lrs[lowest] - np.log(BELOW_MINIMUM), side="right")) - 1
    pick = min(max(min(steepest, tenth), start), lowest)
    return Suggestion(float(lrs[pick]), float(lrs[lowest]), (float(lrs[start]), float(lrs[lowest])),
                      bool(smoothed[lowest] < NO_FALL * smoothed[0]), stop)


@dataclass
class RangeTest:
    lrs: list[float]  # in --lr units
    losses: list[float]
    batch_size: int
    seconds: float

    @property
    def suggestion(self) -> Suggestion:
        return suggest_lr(self.lrs, self.losses)


def range_test(built: BuiltRun, batch_size: int | None = None, steps: int = RANGE_STEPS) -> RangeTest:
    """The range test on a copy of the run's model (its initial weights, whitening included),
    with its batches, loss and optimizer at `batch_size` (default: the run's). The global RNG
    streams are restored afterwards (dropout), so the run is the same with or without the test."""
    cfg = built.cfg
    batch_size = min(batch_size or cfg.optim.batch_size, len(built.labels))
    base = base_lr(cfg)
    started = time.perf_counter()
    devices = [built.device] if built.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model = copy.deepcopy(built.model)
        optimizer = build_optimizer(model, copy_config(cfg, lr=base), built.head_path, batch_size)
        factors, losses = lr_range(model, optimizer, built.batches(batch_size), steps=steps, loss_fn=built.loss_fn)
    return RangeTest([base * f for f in factors], losses, batch_size, time.perf_counter() - started)


def resolve_auto_lr(built: BuiltRun, world=None) -> Config:
    """`built.cfg` with --lr auto replaced by the range test's pick (rank 0 measures, every
    process takes its value); any other --lr comes back as it was. Sets built.cfg too."""
    cfg = built.cfg
    if cfg.optim.lr != "auto":
        return cfg
    is_main = world is None or world.is_main
    lr, test = None, None
    if is_main:
        test = range_test(built)
        found = test.suggestion if len(test.losses) >= 10 else None
        lr = found.lr if found is not None and found.falls else None
    if world is not None:
        lr = world.broadcast(lr)  # every process raises, or every process takes rank 0's pick
    if lr is None:
        raise VisionRecipeError("--lr auto: in the range test the loss falls at no learning rate; "
                                "check the run with `visionrecipe doctor`, or set --lr")
    if is_main:
        region = test.suggestion.region
        log(f"--lr auto: lr {lr:.3g} {lr_unit(cfg)} (range test: {len(test.losses)} steps of {test.batch_size} "
            f"images in {test.seconds:.1f}s; the loss falls from lr {region[0]:.2g} to its minimum at {region[1]:.2g})")
    built.cfg = copy_config(cfg, lr=lr)
    return built.cfg
