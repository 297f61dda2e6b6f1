"""torchvision ResNets and VGGs, plus CIFAR-size variants, under registry names.

Usage::

    from visionrecipe.models import create_model, pretrained_weights

    model = create_model("resnet18", num_classes=10, image_size=224)
    weights = pretrained_weights("resnet18")          # ResNet18_Weights.IMAGENET1K_V1
    state = weights.get_state_dict()                  # downloads: the caller's choice
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    model.load_state_dict(state, strict=False)

Every model keeps torchvision's module names, so torchvision's state dict keys load
unchanged apart from the head (and, for the CIFAR variants, the first conv):

- ``resnet18``, ``resnet50``: head "fc"; ``vgg11_bn``, ``vgg16``, ``vgg16_bn``: head
  "classifier.6". With ``in_channels != 3`` the first conv (``conv1`` / ``features.0``) is
  rebuilt for that many channels, so its ImageNet weights no longer fit.
- ``resnet18_cifar``: 3x3 stride-1 ``conv1`` and no stem max pool, so a 32x32 image
  reaches layer4 as 4x4 instead of 1x1; adaptive pooling lets it run even on 8x8.
- ``vgg16_cifar``: vgg16's ``features``, a global average pool, and
  ``classifier = Sequential(Linear(512, classes))`` (head "classifier.0"): the
  120M-parameter ImageNet classifier is pointless on 1x1 CIFAR feature maps.
"""

from __future__ import annotations

from typing import Callable

import torchvision
from torch import nn
from torchvision.models import resnet, vgg

from visionrecipe.errors import VisionRecipeError
from visionrecipe.models.registry import get_spec, register_model

IMAGENET_SIZE = 224
CIFAR_SIZE = 32
# Five stride-2 max pools take 32 pixels down to 1; anything smaller reaches 0.
VGG_MIN_SIZE = 32

# Registry name -> torchvision architecture whose published weights fit it.
TORCHVISION_ARCH = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "vgg11_bn": "vgg11_bn",
    "vgg16": "vgg16",
    "vgg16_bn": "vgg16_bn",
    "resnet18_cifar": "resnet18",
    "vgg16_cifar": "vgg16",
}


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, bias: bool) -> nn.Conv2d:
    """A first conv initialised as torchvision initialises ResNet and VGG convs."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def _resnet(arch: Callable[..., resnet.ResNet], num_classes: int, in_channels: int) -> nn.Module:
    model = arch(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = _conv(in_channels, 64, 7, 2, 3, bias=False)
    return model


def _vgg(arch: Callable[..., vgg.VGG], num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    if image_size < VGG_MIN_SIZE:
        raise VisionRecipeError(f"VGG models need images of at least {VGG_MIN_SIZE}x{VGG_MIN_SIZE}, got {image_size}")
    model = arch(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.features[0] = _conv(in_channels, 64, 3, 1, 1, bias=True)
    return model


@register_model("resnet18", head_path="fc", family="resnet", default_image_size=IMAGENET_SIZE,
                description="torchvision ResNet-18 (11.7M params at 1000 classes)")
def resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _resnet(torchvision.models.resnet18, num_classes, in_channels)


@register_model("resnet50", head_path="fc", family="resnet", default_image_size=IMAGENET_SIZE,
                description="torchvision ResNet-50 (25.6M params at 1000 classes)")
def resnet50(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _resnet(torchvision.models.resnet50, num_classes, in_channels)


@register_model("vgg11_bn", head_path="classifier.6", family="vgg", default_image_size=IMAGENET_SIZE,
                description="torchvision VGG-11 with batch norm")
def vgg11_bn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _vgg(torchvision.models.vgg11_bn, num_classes, in_channels, image_size)


@register_model("vgg16", head_path="classifier.6", family="vgg", default_image_size=IMAGENET_SIZE,
                description="torchvision VGG-16")
def vgg16(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _vgg(torchvision.models.vgg16, num_classes, in_channels, image_size)


@register_model("vgg16_bn", head_path="classifier.6", family="vgg", default_image_size=IMAGENET_SIZE,
                description="torchvision VGG-16 with batch norm")
def vgg16_bn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _vgg(torchvision.models.vgg16_bn, num_classes, in_channels, image_size)


@register_model("resnet18_cifar", head_path="fc", family="resnet", default_image_size=CIFAR_SIZE,
                description="ResNet-18 with a 3x3 stride-1 stem and no stem pool, for 32x32 images")
def resnet18_cifar(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = _conv(in_channels, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()  # no parameters, so the state dict keys are unchanged
    return model


class VGGCifar(nn.Module):
    """vgg16's ``features`` (same keys), global average pool, one Linear at ``classifier.0``."""

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.features = vgg.make_layers(vgg.cfgs["D"], batch_norm=False)
        self.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
        for module in self.features.modules():
            if isinstance(module, nn.Conv2d):  # torchvision's VGG init
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(512, num_classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


@register_model("vgg16_cifar", head_path="classifier.0", family="vgg", default_image_size=CIFAR_SIZE,
                description="VGG-16 features with global pooling and a 512->classes head, for 32x32 images")
def vgg16_cifar(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    if image_size < VGG_MIN_SIZE:
        raise VisionRecipeError(f"VGG models need images of at least {VGG_MIN_SIZE}x{VGG_MIN_SIZE}, got {image_size}")
    return VGGCifar(num_classes, in_channels)


def pretrained_weights(name: str):
    """torchvision's DEFAULT weights enum for model ``name``, or None if none are published.

    Nothing is downloaded; call ``.get_state_dict()`` on the result for that.
    """
    spec = get_spec(name)  # unknown names get the usual error with suggestions
    arch = TORCHVISION_ARCH.get(spec.name)
    if arch is None:
        return None
    return torchvision.models.get_model_weights(arch).DEFAULT
