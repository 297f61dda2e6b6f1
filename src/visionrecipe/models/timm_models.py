"""Any timm model as ``timm:<name>``, when timm is installed (``pip install 'visionrecipe[timm]'``).

Usage::

    from visionrecipe.models import create_model, get_spec

    spec = get_spec("timm:convnext_atto")   # head_path "head.fc", default_image_size 224
    model = create_model("timm:convnext_atto", num_classes=10, in_channels=1, drop_path_rate=0.1)

timm is imported only when such a name is used, so the rest of visionrecipe neither needs
it nor pays its import time. The spec is made on the fly from timm's pretrained config:
its ``classifier`` entry is the head path and its ``input_size`` the default image size.
timm models are not in ``list_models()``: there are over a thousand of them.
"""

from __future__ import annotations

import difflib
import functools

from torch import nn

from visionrecipe.errors import VisionRecipeError
from visionrecipe.models.registry import ModelSpec, register_prefix

TIMM_PREFIX = "timm:"
# Keyword options passed through to timm.create_model; every timm model accepts them.
TIMM_OPTIONS = ("drop_rate", "drop_path_rate")


def _import_timm():
    try:
        import timm
    except ImportError:
        raise VisionRecipeError("timm is not installed: pip install 'visionrecipe[timm]'") from None
    return timm


def timm_spec(timm_name: str) -> ModelSpec:
    """A ModelSpec for timm model ``timm_name`` (an architecture, optionally with a ``.tag``)."""
    timm = _import_timm()
    if not timm_name or not timm.is_model(timm_name):
        close = difflib.get_close_matches(timm_name, timm.list_models(), n=3)
        hint = f"; did you mean: {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise VisionRecipeError(f"unknown timm model '{timm_name}'{hint}")
    cfg = timm.models.get_pretrained_cfg(timm_name)
    head_path, image_size = "head", None  # timm's usual names when a model has no config
    if cfg is not None:
        head_path = cfg.classifier or head_path
        image_size = cfg.input_size[-1] if cfg.input_size else None
    if isinstance(head_path, (tuple, list)):
        # Distilled models have two heads ("head", "head_dist"); the first is the classifier.
        head_path = head_path[0]
    return ModelSpec(
        name=TIMM_PREFIX + timm_name,
        builder=functools.partial(_build, timm_name),
        head_path=head_path,
        family="timm",
        default_image_size=image_size,
        description=f"timm model {timm_name}",
        options=TIMM_OPTIONS,
    )


def _build(timm_name: str, num_classes: int, in_channels: int, image_size: int, **options) -> nn.Module:
    timm = _import_timm()
    # image_size is not passed: most timm models adapt to it, and the rest (ViTs) need
    # img_size only when it differs from their default, which is the caller's concern.
    return timm.create_model(
        timm_name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **options
    )


register_prefix(TIMM_PREFIX, timm_spec)
