"""Image classifiers by name: a registry of builders, swappable heads, and layer tables.

Usage::

    from visionrecipe import models

    models.list_models()        # ['fastnet', 'resnet18', 'resnet18_cifar', 'resnet50', ...]
    model = models.create_model("resnet18_cifar", num_classes=10, head="mlp:256")
    spec = models.get_spec("resnet18_cifar")
    head = models.get_head(model, spec.head_path)
    print(models.format_layer_table(models.layer_table("seedcnn", image_size=32)))
    weights = models.pretrained_weights("resnet18")   # a torchvision enum; nothing downloaded

Importing this package registers every built-in model (seedcnn, fastnet, the torchvision
ResNets and VGGs); ``timm:<name>`` reaches any timm model when timm is installed.
"""

from visionrecipe.models.registry import (
    ModelSpec,
    create_model,
    get_spec,
    list_models,
    register_model,
)
from visionrecipe.models.heads import (
    backbone_parameters,
    get_head,
    head_in_features,
    make_head,
    parse_head,
    replace_head,
)
from visionrecipe.models.summary import (
    count_parameters,
    format_layer_table,
    layer_table,
    module_layer_table,
    parameter_count,
)

# Imported for their @register_model (and timm's register_prefix) side effects.
from visionrecipe.models import fastnet, photonet, seedcnn, timm_models  # noqa: F401
from visionrecipe.models.torchvision_models import pretrained_weights

__all__ = [
    "ModelSpec",
    "backbone_parameters",
    "count_parameters",
    "create_model",
    "format_layer_table",
    "get_head",
    "get_spec",
    "head_in_features",
    "layer_table",
    "list_models",
    "make_head",
    "module_layer_table",
    "parameter_count",
    "parse_head",
    "pretrained_weights",
    "register_model",
    "replace_head",
]
