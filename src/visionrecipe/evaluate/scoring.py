"""Metrics on a split: accuracy, top-5, loss, per-class precision/recall/F1, confusion matrix.

    logits = predict_logits(model, images_uint8, mean, std, tta=True, device="cpu")
    recalibrate_batchnorm(model, train_images_uint8, mean, std)  # precise BatchNorm statistics, in place
    metrics = compute_metrics(logits, labels)                  # accuracy, top5_accuracy, loss, ...
    class_balanced_metrics(logits, labels)                     # balanced_accuracy, f1_macro (scikit-learn's)
    result = evaluate_run("runs/digits", split="test")          # also writes eval.json

Evaluation always runs in fixed-size batches in eval mode, so `evaluate` in a new process
reproduces, image for image, what training reported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from visionrecipe.train.tasks import compute_multilabel_metrics  # noqa: F401  (evaluate's multilabel scores)

# Images scored at once: 500 at 32 px, fewer for larger images, by pixels (500 photos at 160 px keep
# 1.6 GB per feature map of a 32-channel layer, and a streamed run in a 2 GiB container was killed).
EVAL_BATCH = 500
EVAL_PIXELS = 256 * 64 * 64  # 20 images at 224 px: at most ~0.5 GB for two 64-channel maps
MIN_EVAL_BATCH = 16


def eval_batch(images) -> int:
    """How many of `images` (N×C×H×W: a tensor, or the record cache's MappedImages) are scored at once."""
    height, width = tuple(images.shape)[-2:]
    return max(MIN_EVAL_BATCH, min(EVAL_BATCH, EVAL_PIXELS // max(1, height * width)))


def recalibrate_batchnorm(model: torch.nn.Module, images: torch.Tensor, mean, std, *,
                          device: torch.device | str = "cpu", channels_last: bool = True) -> bool:
    """Re-estimate every BatchNorm layer's running mean and variance from `images` (uint8 N×C×H×W,
    un-augmented, at the side evaluation sees): the plain average over the batches, forward passes
    in train mode without gradients; momenta and the train/eval mode are restored. False when the
    model has no BatchNorm (nothing changed)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms or not len(images):
        return False
    device = torch.device(device)
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: every batch counts alike
    model.train()
    batches = max(1, math.ceil(len(images) / eval_batch(images)))
    size = math.ceil(len(images) / batches)  # equal batches, so the average weighs every image alike
    with torch.no_grad():
        for start in range(0, len(images), size):
            x = normalise(images[start:start + size].to(device), mean, std, channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                model(x)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.train(was_training)
    return True


def normalise(images: torch.Tensor, mean, std, channels_last: bool = True) -> torch.Tensor:
    """uint8 N×C×H×W on its device → float, (x/255 - mean) / std per channel, as every model input."""
    c = len(mean)
    mean_t = torch.tensor(mean, device=images.device).view(1, c, 1, 1) * 255
    inv_std = 1 / (torch.tensor(std, device=images.device).view(1, c, 1, 1) * 255)
    x = (images.float() - mean_t) * inv_std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, mean, std, *, tta: bool = False,
                   device: torch.device | str = "cpu", channels_last: bool = True,
                   batch_size: int | None = None) -> torch.Tensor:
    """Logits (float32, CPU) for uint8 N×C×H×W images; with tta, the mean over the image and its mirror.
    `batch_size`: images scored at once, default eval_batch's."""
    device = torch.device(device)
    batch_size = batch_size or eval_batch(images)
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        x = normalise(images[start:start + batch_size].to(device), mean, std, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x).float()
            if tta:
                logits = 0.5 * (logits + model(x.flip(3)).float())
        outputs.append(logits.cpu())
    model.train(was_training)
    if not outputs:
        return torch.zeros(0, 0)
    return torch.cat(outputs)


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str] | None = None) -> dict:
    labels = labels.cpu().long()
    n, num_classes = logits.shape
    predictions = logits.argmax(1)
    k = min(5, num_classes)
    top5 = (logits.topk(k, dim=1).indices == labels[:, None]).any(1)
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes ** 2)
    confusion = confusion.view(num_classes, num_classes)
    result = {
        "accuracy": float((predictions == labels).float().mean()) if n else 0.0,
        "top5_accuracy": float(top5.float().mean()) if n else 0.0,
        "loss": float(F.cross_entropy(logits, labels)) if n else 0.0,
        "num_images": int(n),
        "num_correct": int((predictions == labels).sum()),
        "confusion_matrix": confusion.tolist(),
    }
    if classes is not None:
        result["per_class"] = per_class_metrics(confusion, classes)
    return result


def per_class_metrics(confusion: torch.Tensor, classes: list[str]) -> list[dict]:
    """Precision, recall, F1 and support per class from a confusion matrix (rows = truth)."""
    confusion = confusion.double()
    true_pos = confusion.diag()
    support = confusion.sum(1)
    predicted = confusion.sum(0)
    rows = []
    for i, name in enumerate(classes):
        precision = float(true_pos[i] / predicted[i]) if predicted[i] else 0.0
        recall = float(true_pos[i] / support[i]) if support[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1, "support": int(support[i])})
    return rows


def class_balanced_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Balanced accuracy (the mean recall over the classes present) and macro-F1 (the mean F1 over
    the classes present or predicted): on imbalanced data, what accuracy hides. scikit-learn's own
    functions, as the reference for both."""
    if len(labels) == 0:
        return {"balanced_accuracy": 0.0, "f1_macro": 0.0}
    import warnings

    from sklearn.metrics import balanced_accuracy_score, f1_score

    truth, predicted = labels.cpu().numpy(), logits.argmax(1).cpu().numpy()
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": those are left out, as documented
        warnings.simplefilter("ignore")
        return {"balanced_accuracy": float(balanced_accuracy_score(truth, predicted)),
                "f1_macro": float(f1_score(truth, predicted, average="macro", zero_division=0))}


def evaluate_run(run_dir: str | Path, *, data: str | None = None, split: str = "test", device: str = "auto",
                 dataset=None, write: bool = True, data_dir: str | None = None, return_logits: bool = False,
                 tta: bool | None = None):
    """Score a run's kept model on a split of its data (or of `data`); eval.json is written only for
    the run's own scoring (its test split, its data, its TTA), never replaced by a variant's.

    `tta`: score with (True) or without (False) the mirror test-time augmentation; None: as the run
    was trained (model.json). With return_logits, returns (result, logits) so a report can show the
    very predictions scored."""
    from visionrecipe.models.checkpoint import load_model
    from visionrecipe.errors import VisionRecipeError
    from visionrecipe.system import select_device

    run_dir = Path(run_dir).expanduser()
    model, meta = load_model(run_dir)
    device_t = select_device(device)
    if dataset is None:
        dataset = load_run_dataset(run_dir, meta, data=data, data_dir=data_dir)
    if list(dataset.classes) != list(meta["classes"]):
        raise VisionRecipeError(f"the data's classes ({len(dataset.classes)}) do not match the model's "
                                f"({len(meta['classes'])}): {dataset.classes[:5]} vs {meta['classes'][:5]}")
    chosen = getattr(dataset, split, None) if split in ("train", "val", "test") else None
    if chosen is None:
        raise VisionRecipeError(f"split '{split}' is not available for this data (choose train, val or test)")
    if tuple(chosen.images.shape[1:]) != tuple(meta["input_size"]):
        raise VisionRecipeError(f"images are {list(chosen.images.shape[1:])} but the model expects {meta['input_size']}")
    model.to(device_t)
    tta = meta.get("tta", False) if tta is None else tta
    logits = predict_logits(model, chosen.images, meta["mean"], meta["std"], tta=tta, device=device_t)
    if meta.get("task") == "multilabel":  # sigmoid per class: mAP and F1, no softmax calibration
        scores = compute_multilabel_metrics(logits, chosen.labels, meta.get("threshold", 0.5), meta["classes"])
    else:
        scores = {**compute_metrics(logits, chosen.labels, meta["classes"]),
                  **class_balanced_metrics(logits, chosen.labels), **calibration(logits, chosen.labels)}
    result = {"split": split, "data": dataset.spec, "model": meta["architecture"], "tta": bool(tta), **scores,
              "classes": meta["classes"]}
    own = split == "test" and data is None and tta == meta.get("tta", False)
    if write and own:  # eval.json holds the run's own scoring (report, card): a variant only prints
        from visionrecipe.rundir import atomic_write_text, locked

        with locked(run_dir):  # a training run writes eval.json too: one writer at a time
            atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
    return (result, logits) if return_logits else result


def load_run_dataset(run_dir: Path, meta: dict, *, data: str | None = None, data_dir: str | None = None):
    """The dataset a run was trained on (or `data`), loaded as training loaded it (train.build.load_data)."""
    from visionrecipe.recipes import copy_config
    from visionrecipe.train.build import load_data

    config = _run_config(Path(run_dir))
    return load_data(copy_config(config, data=data or meta.get("data") or config.data.data,
                                 data_dir=data_dir or config.data.data_dir, image_size=meta["input_size"][1]))


def calibration(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict:
    """Expected calibration error over equal-width confidence bins, and the bins for a reliability diagram."""
    if len(labels) == 0:
        return {"ece": 0.0, "calibration": []}
    confidence, predictions = F.softmax(logits.float(), 1).max(1)
    correct = (predictions == labels.cpu()).double()
    which = (confidence.double() * bins).long().clamp(max=bins - 1)  # bin b: [b/bins, (b+1)/bins)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        count = int(mask.sum())
        conf = float(confidence[mask].double().mean()) if count else 0.0
        acc = float(correct[mask].mean()) if count else 0.0
        ece += count / max(len(labels), 1) * abs(acc - conf)
        rows.append({"lower": b / bins, "upper": (b + 1) / bins, "count": count, "confidence": conf, "accuracy": acc})
    return {"ece": ece, "calibration": rows}


def _run_config(run_dir: Path):
    from visionrecipe.config import Config, load_config

    path = run_dir / "config.yaml"
    return load_config(path) if path.is_file() else Config()
