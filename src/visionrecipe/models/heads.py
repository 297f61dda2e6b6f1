"""Classifier heads: find, build and swap the last layer of any registered model.

Usage::

    from visionrecipe.models import create_model, get_spec, replace_head, backbone_parameters

    spec = get_spec("resnet18")
    model = create_model("resnet18", num_classes=1000)
    replace_head(model, spec.head_path, num_classes=10, head="mlp:256")   # fine-tune on 10 classes
    optimizer = torch.optim.SGD([
        {"params": backbone_parameters(model, spec.head_path), "lr": 1e-3},
        {"params": get_head(model, spec.head_path).parameters(), "lr": 1e-2},
    ])

A head is addressed by a dotted attribute path ("fc", "classifier.6", "head.fc") rather
than by an attribute on the model, so that state dicts keep torchvision's keys. Heads are
either one ``Linear`` or ``Linear -> ReLU -> Dropout(0.2) -> Linear`` ("mlp:HIDDEN").
"""

from __future__ import annotations

import torch
from torch import nn

from visionrecipe.errors import VisionRecipeError

# Std of the final Linear's weights: logits start near zero, so the softmax starts near
# uniform and the first loss is about ln(num_classes) instead of a random large value.
HEAD_INIT_STD = 0.01
MLP_DROPOUT = 0.2


def parse_head(head: str) -> tuple[str, int | None]:
    """``"linear"`` -> ``("linear", None)``; ``"mlp:256"`` -> ``("mlp", 256)``."""
    text = head.strip().lower() if isinstance(head, str) else ""
    if text == "linear":
        return "linear", None
    kind, _, hidden = text.partition(":")
    if kind == "mlp" and hidden.isdigit() and int(hidden) > 0:
        return "mlp", int(hidden)
    raise VisionRecipeError(f"bad head {head!r}: use 'linear' or 'mlp:HIDDEN', e.g. 'mlp:256'")


def make_head(in_features: int, num_classes: int, head: str = "linear", bias: bool = True) -> nn.Module:
    """A freshly initialised head mapping ``in_features`` to ``num_classes`` logits."""
    kind, hidden = parse_head(head)
    final = nn.Linear(hidden or in_features, num_classes, bias=bias)
    nn.init.normal_(final.weight, std=HEAD_INIT_STD)
    if bias:
        nn.init.zeros_(final.bias)
    if kind == "linear":
        return final
    # The hidden Linear keeps PyTorch's default init: it feeds a ReLU, not the loss.
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(MLP_DROPOUT), final)


def get_head(model: nn.Module, head_path: str) -> nn.Module:
    """The module at ``head_path`` (e.g. ``"classifier.6"``)."""
    try:
        return model.get_submodule(head_path)
    except AttributeError:
        raise VisionRecipeError(
            f"{type(model).__name__} has no module at '{head_path}'"
        ) from None


def _linears(head: nn.Module) -> list[nn.Linear]:
    if isinstance(head, nn.Linear):
        return [head]
    return [m for m in head.modules() if isinstance(m, nn.Linear)]


def head_in_features(model: nn.Module, head_path: str) -> int:
    """Width of the features the head at ``head_path`` reads (its first Linear's input)."""
    linears = _linears(get_head(model, head_path))
    if not linears:
        kind = type(get_head(model, head_path)).__name__
        raise VisionRecipeError(f"head at '{head_path}' is a {kind} without a Linear layer; cannot replace it")
    return linears[0].in_features


def replace_head(model: nn.Module, head_path: str, num_classes: int, head: str = "linear") -> nn.Module:
    """Put a new ``head`` for ``num_classes`` at ``head_path``, on the old head's device; return it.

    The new final Linear has a bias only if the old one had one (fastnet's has none, like
    airbench's), so a model's state dict keys depend on its name and head kind alone.
    """
    old = get_head(model, head_path)
    in_features = head_in_features(model, head_path)
    bias = _linears(old)[-1].bias is not None
    new = make_head(in_features, num_classes, head, bias=bias)
    reference = next(old.parameters(), None)
    if reference is None:
        reference = next(model.parameters(), torch.empty(0))
    new.to(device=reference.device, dtype=reference.dtype)
    parent_path, _, attr = head_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    # setattr on a Sequential with attr "6" replaces entry 6 in place and keeps the order.
    setattr(parent, attr, new)
    return new


def backbone_parameters(model: nn.Module, head_path: str) -> list[nn.Parameter]:
    """Every parameter of ``model`` that is not in the head, in registration order."""
    in_head = {id(p) for p in get_head(model, head_path).parameters()}
    return [p for p in model.parameters() if id(p) not in in_head]
