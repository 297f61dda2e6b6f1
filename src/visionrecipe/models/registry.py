"""Model registry: one name gives any model, in the manner of timm.

Usage::

    from visionrecipe.models import create_model, get_spec, list_models

    list_models()                          # ['fastnet', 'resnet18', 'resnet18_cifar', ...]
    spec = get_spec("resnet18_cifar")      # builder, head_path, family, default_image_size, ...
    model = create_model("fastnet", num_classes=10, width=0.5, head="mlp:256")
    model = create_model("timm:convnext_atto", num_classes=10)   # needs timm installed

A model module registers its builders with ``@register_model``; a family too large to list
(timm's) registers a prefix with ``register_prefix`` and makes its specs on the fly. A builder takes
``(num_classes, in_channels, image_size, **options)`` and returns an ``nn.Module`` whose
final classifier sits at the dotted path ``head_path``. ``create_model`` checks the
user's arguments here, at the edge, and then always swaps in a fresh head through
``replace_head``, so every model starts with the same small-logit initialisation
(loss at step 0 is about ln(num_classes)) whichever library built the backbone.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from torch import nn

from visionrecipe.errors import VisionRecipeError
from visionrecipe.models.heads import parse_head, replace_head

PREFIX_SEPARATOR = ":"  # "timm:convnext_atto": names with it belong to a family's prefix

@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one model name."""

    name: str
    builder: Callable[..., nn.Module]  # builder(num_classes, in_channels, image_size, **options)
    head_path: str  # dotted path of the final classifier, e.g. "fc", "classifier.6", "head"
    family: str  # "seedcnn", "fastnet", "resnet", "vgg", "timm"
    default_image_size: int | None  # None: any size works equally well
    description: str
    options: tuple[str, ...] = ()  # keyword options the builder accepts, e.g. ("width", "depth")


_REGISTRY: dict[str, ModelSpec] = {}
_PREFIXES: dict[str, Callable[[str], ModelSpec]] = {}  # "timm:" -> spec of the name after it


def register_model(
    name: str,
    *,
    head_path: str,
    family: str,
    default_image_size: int | None = None,
    description: str = "",
    options: tuple[str, ...] = (),
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a builder under ``name``; a second use of a name is a bug."""
    if PREFIX_SEPARATOR in name:
        raise ValueError(f"model names with '{PREFIX_SEPARATOR}' are reserved for prefixed families (timm:<name>)")

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            # A silent overwrite would make a name mean whichever module imported last.
            raise ValueError(f"model '{name}' is already registered")
        _REGISTRY[name] = ModelSpec(
            name=name,
            builder=builder,
            head_path=head_path,
            family=family,
            default_image_size=default_image_size,
            description=description,
            options=tuple(options),
        )
        return builder

    return decorator


def register_prefix(prefix: str, resolver: Callable[[str], ModelSpec]) -> None:
    """``prefix + name`` is the spec ``resolver(name)`` makes; e.g. ("timm:", timm_spec)."""
    if not prefix.endswith(PREFIX_SEPARATOR) or prefix in _PREFIXES:
        raise ValueError(f"model prefix {prefix!r} must end with '{PREFIX_SEPARATOR}' and be registered once")
    _PREFIXES[prefix] = resolver


def list_models() -> list[str]:
    """Sorted registered names; timm models are reached as ``timm:<name>`` and not listed."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec for ``name``; ``timm:<name>`` specs are built on the fly."""
    for prefix, resolver in _PREFIXES.items():
        if name.startswith(prefix):
            return resolver(name[len(prefix) :])
    if name not in _REGISTRY:
        raise VisionRecipeError(_unknown_message(name))
    return _REGISTRY[name]


def _unknown_message(name: str) -> str:
    close = difflib.get_close_matches(name, list_models(), n=3)
    if close:
        return f"unknown model '{name}'; did you mean: {', '.join(close)}?"
    families = "".join(f" or {prefix}<name>" for prefix in _PREFIXES)
    return f"unknown model '{name}'; choose one of: {', '.join(list_models())}{families}"


def _check_count(what: str, value: object) -> None:
    # bool is an int subclass; create_model("x", True) is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise VisionRecipeError(f"{what} must be a positive integer, got {value!r}")


def create_model(
    name: str,
    num_classes: int,
    *,
    in_channels: int = 3,
    image_size: int = 32,
    head: str = "linear",
    **options,
) -> nn.Module:
    """Build model ``name`` with a fresh ``head`` ("linear" or "mlp:HIDDEN") for ``num_classes``.

    ``image_size`` is the side of the square input the model will see; models whose layer
    sizes depend on it (seedcnn, fastnet) derive them from it, the others only check it.
    """
    spec = get_spec(name)
    _check_count("num_classes", num_classes)
    _check_count("in_channels", in_channels)
    _check_count("image_size", image_size)
    parse_head(head)  # fail before building: a VGG takes seconds to initialise
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        accepted = ", ".join(spec.options) or "none"
        raise VisionRecipeError(
            f"model '{name}' has no option {', '.join(unknown)} (accepted options: {accepted})"
        )
    model = spec.builder(num_classes, in_channels, image_size, **options)
    replace_head(model, spec.head_path, num_classes, head)
    return model
