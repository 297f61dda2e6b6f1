"""The doctor's checks on the model and its training, each a plain function of a model and tensors.

    check = check_batch_statistics(x)                       # x: the normalised batch model(x) sees
    check = check_init_loss(model, x, y, num_classes=10)
    check = check_input_dependence(make_model, x_train, y_train, x_val, y_val)
    check = check_overfit_batch(model, x_small, y_small)
    check = check_batch_independence(model, x, y)
    check = check_lr_range(lrs, losses, configured=1.5, unit="per 1024 images")   # train/lr_find.py's test
    check = check_capacity(make_model, x, y)                # make_model(width) -> fresh model
    check = check_determinism(lambda: short_run_losses())
    check.verdict, check.figure, check.advice               # "pass" | "warn" | "fail" | "skip"

Each follows a step of Karpathy's "A Recipe for Training Neural Networks": verify the loss at
init, beat an input-independent baseline, overfit one batch, check that backprop does not mix
examples, and so on. Nothing here loads data or builds models from a config (doctor.py does), so
tests can hand in a broken model or a badly normalised batch and watch the check fail.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visionrecipe.train.lr_find import smooth, suggest_lr

# Short budgets: the whole doctor must take about a minute on two CPU cores for digits.
FIT_LR = 1e-3  # Adam; "3e-4 is the best learning rate for Adam" is for long runs, short ones want more
OVERFIT_STEPS = 200
OVERFIT_LR = 3e-3  # fastnet's 1/9 logit scale needs big weights for a near-zero loss; 1e-3 takes >200 steps
OVERFIT_LOSS = 0.05  # "near zero": a memorised batch of 20 gets here in well under 200 steps


@dataclass
class Check:
    """One row of the doctor's table."""

    name: str
    verdict: str  # pass, warn, fail or skip
    figure: str  # the measured figure, one short line
    advice: str = ""  # what to do; empty when nothing is needed
    values: dict = field(default_factory=dict)  # the numbers behind the figure, for doctor.json
    seconds: float = 0.0


def timed(run: Callable[[], Check]) -> Check:
    """Run one check and record its seconds."""
    started = time.perf_counter()
    check = run()
    check.seconds = round(time.perf_counter() - started, 2)
    return check


def _fmt(values: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:+.2f}" for v in values.tolist()) + "]"


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch_size: int,
        lr: float = FIT_LR, seed: int = 0) -> list[float]:
    """Adam on random minibatches of (x, y); returns the loss of each step. The model is changed."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, foreach=True)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        index = torch.randint(0, len(y), (min(batch_size, len(y)),), generator=generator).to(x.device)
        loss = F.cross_entropy(model(x[index]).float(), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) in eval mode."""
    model.eval()
    logits = torch.cat([model(x[i:i + 500]).float() for i in range(0, len(x), 500)])
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


# --- 2. the batch as the net sees it -------------------------------------------------------------
def check_batch_statistics(x: torch.Tensor) -> Check:
    """Per-channel mean and std of the exact tensor fed to model(x): normalised data is ≈0 / ≈1."""
    x = x.detach().float()
    mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))
    values = {"mean": mean.tolist(), "std": std.tolist()}
    figure = f"mean {_fmt(mean)} std {_fmt(std)}"
    if bool((mean.abs() > 0.5).any()) or bool((std < 0.5).any()) or bool((std > 2).any()):
        return Check("batch statistics", "fail", figure, "the input is not normalised: check mean/std units "
                     "(0–1 vs 0–255) and channel order", values)
    return Check("batch statistics", "pass", figure, "", values)


# --- 3. loss at init ------------------------------------------------------------------------------
@torch.no_grad()
def check_init_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                    class_counts: torch.Tensor | None = None) -> Check:
    """Cross-entropy at init should be ln(classes): the net starts out guessing uniformly.

    `class_counts` (the whole train split's; default: the batch's) decide whether the classes are
    imbalanced enough to suggest a log-prior output bias."""
    # Train mode, as the first step sees it; a copy, so the running BatchNorm statistics stay fresh.
    logits = copy.deepcopy(model).train()(x).float()
    loss = float(F.cross_entropy(logits, y))
    expected = math.log(num_classes)
    ratio = loss / expected
    values = {"loss": loss, "expected": expected}
    figure = f"{loss:.3f} vs ln({num_classes}) = {expected:.3f}"
    counts = torch.bincount(y, minlength=num_classes) if class_counts is None else class_counts
    prior = counts.double().cpu() / counts.sum()
    advice = ""
    if float(prior.max()) > 1.5 * float(prior[prior > 0].min()):
        # Setting the output bias to log(prior) makes the first guess the class frequencies:
        # no "hockey stick" of steps spent learning the imbalance alone.
        log_prior = prior.clamp(min=1e-12).log().float().to(logits.device)
        with_prior = float(F.cross_entropy(logits + log_prior, y))
        values["loss_with_log_prior_bias"] = with_prior
        figure += f"; with log-prior bias {with_prior:.3f}"
        advice = "classes are imbalanced: consider --class-weights auto or --sampler balanced"
    if 0.9 <= ratio <= 1.15:
        return Check("loss at init", "pass", figure, advice, values)
    verdict = "warn" if 0.75 <= ratio <= 1.5 else "fail"
    return Check("loss at init", verdict, figure, "the initial logits are not small: scale down the last "
                 "layer's init (or check the loss, labels and number of classes)", values)


# --- 4. input-independent baseline ----------------------------------------------------------------
def check_input_dependence(make_model: Callable[[], nn.Module], x_train: torch.Tensor, y_train: torch.Tensor,
                           x_val: torch.Tensor, y_val: torch.Tensor, *, steps: int = 100, batch_size: int = 64,
                           lr: float = FIT_LR, seed: int = 0) -> Check:
    """Train on real inputs and on zeros with one budget: the real model must score clearly better on val."""
    results = {}
    for name, xt, xv in (("real", x_train, x_val), ("zeroed", torch.zeros_like(x_train), torch.zeros_like(x_val))):
        torch.manual_seed(seed)
        model = make_model()
        fit(model, xt, y_train, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
        results[name] = score(model, xv, y_val)
    real, zero = results["real"][1], results["zeroed"][1]
    # The zeroed model can only learn the class prior; demand a gap well beyond val noise.
    p = max(zero, 1e-3)
    margin = max(0.05, 3 * math.sqrt(p * (1 - p) / max(len(y_val), 1)))
    values = {"val_acc_real": real, "val_acc_zeroed": zero, "margin": margin, "steps": steps}
    figure = f"val acc {100 * real:.1f}% real vs {100 * zero:.1f}% zeroed inputs"
    if real - zero >= margin:
        return Check("input-independent baseline", "pass", figure, "", values)
    return Check("input-independent baseline", "fail", figure,
                 "the model is not using its input, or the labels are noise", values)


# --- 5. overfit one batch -------------------------------------------------------------------------
def check_overfit_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, max_steps: int = OVERFIT_STEPS,
                        lr: float = OVERFIT_LR) -> Check:
    """A tiny batch must be memorised: ~100% train accuracy and a loss near zero."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, foreach=True)
    loss, acc, step = float("inf"), 0.0, 0
    for step in range(1, max_steps + 1):
        logits = model(x).float()
        loss_t = F.cross_entropy(logits, y)
        loss, acc = float(loss_t.detach()), float((logits.argmax(1) == y).float().mean())
        if acc == 1.0 and loss < OVERFIT_LOSS:
            break
        optimizer.zero_grad(set_to_none=True)
        loss_t.backward()
        optimizer.step()
    values = {"loss": loss, "accuracy": acc, "steps": step, "batch": len(y)}
    figure = f"{len(y)} images: acc {100 * acc:.0f}%, loss {loss:.3f} after {step} steps"
    if acc == 1.0 and loss < OVERFIT_LOSS:
        return Check("overfit one batch", "pass", figure, "", values)
    if acc == 1.0:
        return Check("overfit one batch", "warn", figure, "memorised but the loss stays high: check the "
                     "logit scale, label smoothing or learning rate", values)
    return Check("overfit one batch", "fail", figure, "cannot memorise a few images: look for a bug in "
                 "the model, loss or optimizer (or frozen weights)", values)


# --- 6. backprop dependencies ---------------------------------------------------------------------
def check_batch_independence(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Check:
    """The gradient of example i's loss must reach input i only (BatchNorm in eval mode: in train
    mode it mixes the batch by design)."""
    model = copy.deepcopy(model).eval()
    x = x.detach().clone().requires_grad_(True)
    leaked, own = 0.0, float("inf")
    for i in sorted({0, len(x) // 2, len(x) - 1}):
        loss = F.cross_entropy(model(x).float()[i:i + 1], y[i:i + 1])
        (grad,) = torch.autograd.grad(loss, x)
        others = torch.cat([grad[:i], grad[i + 1:]])
        leaked = max(leaked, float(others.abs().max()) if len(others) else 0.0)
        own = min(own, float(grad[i].abs().max()))
    values = {"max_grad_other_samples": leaked, "min_grad_own_sample": own}
    figure = f"max |grad| on other samples {leaked:.1e}, own {own:.1e}"
    if leaked > 0:
        return Check("backprop dependencies", "fail", figure, "the model mixes examples across the batch: "
                     "look for a wrong view/reshape/transpose or a reduction over dim 0", values)
    if own == 0:
        return Check("backprop dependencies", "warn", figure, "the loss does not reach its own input", values)
    return Check("backprop dependencies", "pass", figure, "", values)


# --- 7. learning-rate range test ------------------------------------------------------------------
def check_lr_range(lrs: list[float], losses: list[float], configured: float | str, unit: str) -> Check:
    """Verdict on a range test whose lrs are in the unit of `configured` (the --lr, or "auto")."""
    if len(losses) < 10:
        return Check("learning-rate range", "fail", f"loss diverged after {len(losses)} steps",
                     "the loss is not finite even at tiny learning rates: check the data and the loss")
    found = suggest_lr(lrs, losses)
    smoothed = smooth(losses)
    lowest = int(np.argmin(smoothed[:found.stop]))
    values = {"suggested_lr": found.lr, "configured_lr": configured, "lr_unit": unit,
              "lr_at_min_loss": found.lr_at_minimum, "descending_region": list(found.region),
              "min_loss": float(smoothed[lowest]), "start_loss": float(smoothed[0])}
    shown = configured if configured == "auto" else f"{configured:.2g}"
    figure = f"suggested lr {found.lr:.2g} {unit} (configured {shown}, loss lowest at {found.lr_at_minimum:.2g})"
    if not found.falls:
        return Check("learning-rate range", "fail", figure, "the loss does not fall at any learning rate", values)
    if configured == "auto":
        return Check("learning-rate range", "pass", figure, "", values)
    if configured > found.lr_at_minimum:
        return Check("learning-rate range", "warn", figure,
                     f"--lr is past the loss minimum: try --lr {found.lr:.2g} (or --lr auto)", values)
    if configured < found.lr / 30:
        return Check("learning-rate range", "warn", figure, f"--lr looks low: try --lr {found.lr:.2g} (or --lr auto)",
                     values)
    return Check("learning-rate range", "pass", figure, "", values)


# --- 8. capacity ----------------------------------------------------------------------------------
def check_capacity(make_model: Callable[[float], nn.Module] | None, x: torch.Tensor, y: torch.Tensor, *,
                   widths: tuple[float, float] = (0.5, 1.0), steps: int = 60, batch_size: int = 64,
                   lr: float = FIT_LR, seed: int = 0) -> Check:
    """With one short budget, the wider model should reach a lower training loss."""
    if make_model is None:
        return Check("capacity", "skip", "n/a: the model has no width option")
    losses = []
    for width in widths:
        torch.manual_seed(seed)
        model = make_model(width)
        fit(model, x, y, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
        losses.append(score(model, x, y)[0])
    values = {"widths": list(widths), "train_loss": losses, "steps": steps}
    figure = f"train loss {losses[0]:.3f} at width {widths[0]:g} vs {losses[1]:.3f} at {widths[1]:g}"
    if losses[1] < losses[0]:
        return Check("capacity", "pass", figure, "", values)
    return Check("capacity", "warn", figure, "a wider model does not fit better: the optimisation or the data "
                 "limits training, not the model size", values)


# --- 9. determinism -------------------------------------------------------------------------------
def check_determinism(run: Callable[[], list[float]]) -> Check:
    """Two runs of `run` (a seeded short training returning its losses) must agree exactly."""
    first, second = run(), run()
    diff = max((abs(a - b) for a, b in zip(first, second)), default=0.0)
    if len(first) != len(second):
        diff = float("inf")
    values = {"losses": first, "max_difference": diff}
    figure = f"{len(first)} steps twice: max loss difference {diff:.1e}"
    if diff == 0:
        return Check("determinism", "pass", figure, "", values)
    scale = max(abs(v) for v in first) if first else 1.0
    if diff < 1e-4 * scale:
        return Check("determinism", "warn", figure, "tiny differences: nondeterministic kernels; use "
                     "--deterministic for exact repeats", values)
    return Check("determinism", "fail", figure, "one seed gives different runs: an unseeded random source "
                 "(data order, augmentation, dropout) is involved", values)
