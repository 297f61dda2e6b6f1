"""What a run shows and records as it goes: the progress bar, each epoch's line, metrics.jsonl,
TensorBoard, and the best and last model files.

    bar = progress_bar(steps, "Epoch 1/10", enabled=True)
    record = epoch_record(epoch=1, step=40, train_loss=0.9, val=metrics, lr=0.1, images_per_second=5e3, elapsed=3.2)
    log_epoch(record, epochs=10, eval_name="val")
    write_epoch(run_dir, record, tensorboard)             # metrics.jsonl, then TensorBoard
    save_models(run_dir, model, meta, keep=True)   # last.safetensors always, model.safetensors when kept
    keeps(0.842, 0.853, count=947, final=True)   # True: 1.1 points is within this split's noise

Plain functions the loop calls at the end of each epoch, in that order; only rank 0 writes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from visionrecipe.errors import VisionRecipeError
from visionrecipe.models import checkpoint as ckpt
from visionrecipe.rundir import append_metrics
from visionrecipe.system import log


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (a pipe, a log file): the epoch lines say it all
    return tqdm(total=total, initial=initial, desc=desc, leave=False, unit="step", dynamic_ncols=True, disable=None)


def open_tensorboard(run_dir: Path):
    """A SummaryWriter on <run_dir>/tensorboard; a one-line error when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise VisionRecipeError("--tensorboard needs the tensorboard package: "
                                "pip install 'visionrecipe[tensorboard]'") from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def epoch_record(*, epoch: int, step: int, train_loss: float, val: dict, lr: float, images_per_second: float,
                 elapsed: float, nan_skips: int = 0, stopped: str = "") -> dict:
    """One line of metrics.jsonl. val_acc is the validation score that picks the best epoch
    (accuracy, or mAP for multilabel); elapsed_s counts training and validation seconds;
    `stopped`, on the last line only, why --patience or --stop-at ended the run."""
    record = {"epoch": epoch, "train_loss": round(train_loss, 6), "val_loss": round(val["loss"], 6),
              "val_acc": val["accuracy"], "lr": lr, "img_per_s": round(images_per_second, 1),
              "elapsed_s": round(elapsed, 3), "step": step}
    if nan_skips:
        record["nan_skips"] = nan_skips
    if stopped:
        record["stopped"] = stopped
    return record


def log_epoch(record: dict, epochs: int, eval_name: str, lr_unit: str = "") -> None:
    """The epoch's line on stderr; `eval_name` is the split validated on (test when --val-fraction 0);
    the lr is in --lr's unit (recipes.lr_unit), the schedule's value at the epoch's last step."""
    unit = f" ({lr_unit})" if lr_unit else ""
    log(f"Epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.4f}  "
        f"{eval_name}_loss {record['val_loss']:.4f}  {eval_name}_acc {100 * record['val_acc']:.2f}%  "
        f"lr {record['lr']:.3g}{unit}  {record['img_per_s']:,.0f} img/s")


def write_epoch(run_dir: Path, record: dict, tensorboard=None, tracker=None) -> None:
    """Append the record to metrics.jsonl and, with --tensorboard, to the event files; with
    --mlflow, to the MLflow run (train/tracking.py)."""
    append_metrics(run_dir, record)
    if tracker is not None:
        tracker.log_epoch(record)
    if tensorboard is not None:
        for name, value in record.items():
            if isinstance(value, (int, float)):  # not the `stopped` reason
                tensorboard.add_scalar(name, value, record["epoch"])
        tensorboard.flush()


def noise_margin(accuracy: float, count: int) -> float:
    """Two binomial standard errors of an accuracy measured on `count` images: epochs whose scores
    differ by less are not told apart by that split (2.4 points at 84% of 947 images)."""
    return 2 * math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(1, count))


def keeps(score: float, best: float, count: int, final: bool) -> bool:
    """Whether an epoch scoring `score` becomes the run's model (model.safetensors), `best` being the
    best score so far: when it beats it; and at the schedule's planned end also when it is within
    the validation split's noise of it. A decayed schedule's last weights are what the plan aimed at,
    and picking an earlier epoch by a noisy score on a small split mostly picks noise (Imagenette, 947
    validation images: epoch 9 of 12 at 84.3% was kept over the last at 83.2%, and scored 82.1% on test)."""
    return score > best - (noise_margin(best, count) if final else 0.0)


def save_models(run_dir: Path, model: torch.nn.Module, meta: dict, keep: bool) -> None:
    """last.safetensors every epoch, model.safetensors as well when the epoch is kept (`keeps`)."""
    ckpt.save_model(run_dir, "last", model, meta)
    if keep:
        ckpt.save_model(run_dir, "model", model, meta)
