"""Multilabel classification: one sigmoid per class, binary cross-entropy, mAP and F1.

    loss_fn = task_loss(cfg)                    # cross-entropy or BCE, as --task says
    loss_fn = task_loss(cfg, class_weights(labels, num_classes))   # --class-weights auto
    loss = loss_fn(logits, targets)             # targets: int64 N (multiclass) or float N×C multi-hot
    loss = loss_fn(logits, soft)                # float N×C class probabilities (--mixup, --cutmix)
    m = compute_multilabel_metrics(logits, targets, threshold=0.5, classes=names)
    m["mAP"], m["f1_micro"], m["f1_macro"], m["per_class"][0]["ap"]
    rows = labels_above(logits.sigmoid(), names, threshold=0.5)   # predict's answer per image

Definitions follow scikit-learn, so its functions are the reference: a class's average precision
is ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds (``average_precision_score``);
mAP is its mean over the classes that have at least one positive (AP is undefined without one).
F1 counts a label as predicted when its probability is above the threshold; micro F1 pools the
counts of all classes, macro F1 averages the per-class F1 with 0 for a class never predicted nor
present (``f1_score(zero_division=0)``).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visionrecipe.errors import VisionRecipeError

PRIOR_CLAMP = 1e-4  # keeps the initial bias finite for a class that is never or always present


def task_loss(cfg, weight: torch.Tensor | None = None):
    """The training loss for ``cfg.model.task``: ``loss_fn(float logits, targets) -> scalar``;
    `weight`: one per class for the cross-entropy (a weighted mean: sum w_y·loss / sum w_y)."""
    if cfg.model.task == "multilabel":
        # No label smoothing: a smoothed multi-hot target has no agreed meaning, and BCE on rare
        # labels is already gentle. Mixed multi-hot rows (--mixup) are soft targets BCE takes as they are.
        return F.binary_cross_entropy_with_logits
    return partial(cross_entropy, weight=weight, label_smoothing=cfg.optim.label_smoothing or 0.0)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """F.cross_entropy for class indices; for N×C class probabilities (MixUp/CutMix) the same loss
    generalised, so that one-hot rows give exactly the class-index loss: the targets smoothed
    toward uniform, and with `weight` the mean weighted by each row's unsmoothed target weight
    (PyTorch divides a probability-target loss by N instead, which changes its scale)."""
    if not targets.is_floating_point():
        return F.cross_entropy(logits, targets, weight=weight, label_smoothing=label_smoothing)
    num_classes = logits.shape[1]
    smoothed = targets * (1 - label_smoothing) + label_smoothing / num_classes
    log_probs = F.log_softmax(logits, 1)
    if weight is None:
        return -(smoothed * log_probs).sum(1).mean()
    return -(smoothed * weight * log_probs).sum() / (targets * weight).sum()


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, n / (classes × count), 1 for every class of a balanced split
    (scikit-learn's compute_class_weight("balanced")); a class without images gets 0 and is not
    counted among the classes."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes).double()
    weights = len(labels) / (int((counts > 0).sum()) * counts.clamp(min=1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights)).float()


def check_task(cfg, dataset) -> None:
    """--task must agree with the data: multi-hot labels come only from a CSV manifest."""
    multi_hot = dataset.train.labels.dim() == 2
    if cfg.model.task == "multilabel" and not multi_hot:
        raise VisionRecipeError("--task multilabel needs a CSV manifest as --data (rows: path,label1;label2)")
    if cfg.model.task != "multilabel" and multi_hot:
        raise VisionRecipeError(f"{dataset.spec} is a multilabel manifest: pass --task multilabel")
    if multi_hot and (cfg.optim.class_weights != "none" or cfg.optim.sampler != "shuffle"):
        raise VisionRecipeError("--class-weights and --sampler balanced are for single-label data (not --task multilabel)")
    if not 0 <= cfg.optim.mix_prob <= 1:
        raise VisionRecipeError(f"invalid value for mix_prob: {cfg.optim.mix_prob:g} (must be in [0, 1])")
    if not 0 <= cfg.model.threshold < 1:
        raise VisionRecipeError(f"invalid value for threshold: {cfg.model.threshold} (must be in [0, 1))")


@torch.no_grad()
def init_prior_bias(model: nn.Module, head_path: str, targets: torch.Tensor) -> None:
    """Start each sigmoid at its class's frequency: bias = log(p / (1 - p)).

    With zero logits every label starts at probability 0.5 and the first steps only learn that
    most labels are absent; a bias at the prior removes that "hockey stick" from the loss.
    """
    head = model.get_submodule(head_path)
    final = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    if final.bias is None:
        return
    prior = targets.float().mean(0).clamp(PRIOR_CLAMP, 1 - PRIOR_CLAMP)
    final.bias.copy_(torch.log(prior / (1 - prior)).to(final.bias))


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP of one class, as scikit-learn's average_precision_score; NaN without positives."""
    total = positives.sum()
    if total == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    scores, positives = scores[order], positives[order]
    # Tied scores are one threshold: keep the last index of each run of equal scores.
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_pos = np.cumsum(positives)[last]
    precision = true_pos / (last + 1)
    recall = true_pos / total
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1(true_pos: float, false_pos: float, false_neg: float) -> float:
    denominator = 2 * true_pos + false_pos + false_neg
    return 2 * true_pos / denominator if denominator else 0.0


def compute_multilabel_metrics(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5,
                               classes: list[str] | None = None) -> dict:
    """mAP, micro/macro F1 at ``threshold``, subset accuracy, BCE loss and (with classes) per class."""
    logits, targets = logits.float().cpu(), targets.float().cpu()
    n, num_classes = targets.shape
    probabilities = logits.sigmoid()
    predicted = probabilities > threshold
    truth = targets > 0.5
    true_pos = (predicted & truth).sum(0).double()
    false_pos = (predicted & ~truth).sum(0).double()
    false_neg = (~predicted & truth).sum(0).double()
    scores, positives = probabilities.double().numpy(), truth.numpy()
    ap = [average_precision(scores[:, c], positives[:, c]) for c in range(num_classes)]
    scored = [a for a in ap if not np.isnan(a)]
    per_class_f1 = [_f1(*map(float, t)) for t in zip(true_pos, false_pos, false_neg)]
    tp, fp, fn = float(true_pos.sum()), float(false_pos.sum()), float(false_neg.sum())
    result = {
        "task": "multilabel",
        "mAP": float(np.mean(scored)) if scored else 0.0,
        "f1_micro": _f1(tp, fp, fn),
        "f1_macro": float(np.mean(per_class_f1)) if per_class_f1 else 0.0,
        "precision_micro": tp / (tp + fp) if tp + fp else 0.0,
        "recall_micro": tp / (tp + fn) if tp + fn else 0.0,
        # Every label of the image right; "accuracy" so generic readers of eval.json find a score.
        "accuracy": float((predicted == truth).all(1).float().mean()) if n else 0.0,
        "loss": float(F.binary_cross_entropy_with_logits(logits, targets)) if n else 0.0,
        "threshold": float(threshold),
        "num_images": int(n),
        "num_classes_scored": len(scored),
    }
    if classes is not None:
        result["per_class"] = [
            {"class": name, "ap": None if np.isnan(ap[c]) else ap[c],
             "precision": float(true_pos[c] / (true_pos[c] + false_pos[c])) if true_pos[c] + false_pos[c] else 0.0,
             "recall": float(true_pos[c] / (true_pos[c] + false_neg[c])) if true_pos[c] + false_neg[c] else 0.0,
             "f1": per_class_f1[c], "support": int(truth[:, c].sum())}
            for c, name in enumerate(classes)]
    return result


def labels_above(probabilities: torch.Tensor, classes: list[str], threshold: float) -> list[list[dict]]:
    """Per image, every class whose probability is above ``threshold``, most probable first."""
    rows = []
    for probs in probabilities.tolist():
        picked = sorted(((p, c) for c, p in zip(classes, probs) if p > threshold), reverse=True)
        rows.append([{"class": c, "probability": round(p, 6)} for p, c in picked])
    return rows
