"""photonet: a small ResNet-D (xresnet-like) for photos, 96 px and up.

Usage::

    from visionrecipe.models import create_model

    model = create_model("photonet", num_classes=10, image_size=128)            # widths 32, 64, 128, 256
    model = create_model("photonet", num_classes=10, width=2.0, depth=2)        # 64 … 512, two blocks a stage

Layout: a stem of three 3×3 convs (the first with stride 2) and a 3×3 max pool, so a 128-px image
is 32 px before the first stage (the work of fastnet's first block at full resolution is what
made 128-px photos slow); then four stages of ``depth`` basic residual blocks, the stages after
the first halving the size, widths ``WIDTHS`` × ``width``; global average pool; Linear head.

Why these pieces (Bag of Tricks, He et al. 2019): three small stem convs see as much as one 7×7
for less work; a downsampling shortcut averages 2×2 then applies a 1×1 conv (ResNet-D) instead of
a strided 1×1 that throws away three pixels of four; each block's last BatchNorm starts at zero,
so every block starts as the identity and the net trains from the first step at a high rate.
"""

from __future__ import annotations

import torch
from torch import nn

from visionrecipe.errors import VisionRecipeError
from visionrecipe.models.registry import register_model

WIDTHS = (32, 64, 128, 256)  # channels of stages 1..4 at width 1


def _conv_bn(in_channels: int, out_channels: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
              nn.BatchNorm2d(out_channels)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3×3 convs and a shortcut (2×2 average pool + 1×1 conv when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn(in_channels, out_channels, stride)
        self.conv2 = _conv_bn(out_channels, out_channels, relu=False)
        nn.init.zeros_(self.conv2[1].weight)  # the block starts as the identity
        shortcut: list[nn.Module] = []
        if stride != 1:
            shortcut.append(nn.AvgPool2d(stride, ceil_mode=True, count_include_pad=False))
        if in_channels != out_channels:
            shortcut += [nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.shortcut = nn.Sequential(*shortcut)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class PhotoNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, widths: list[int], depth: int):
        super().__init__()
        stem = widths[0]
        self.stem = nn.Sequential(_conv_bn(in_channels, stem // 2, stride=2), _conv_bn(stem // 2, stem // 2),
                                  _conv_bn(stem // 2, stem), nn.MaxPool2d(3, stride=2, padding=1))
        stages, channels = [], stem
        for i, width in enumerate(widths):
            blocks = [BasicBlock(channels if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1)
                      for j in range(depth)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.stages(self.stem(x)))))


def photonet_widths(width: float = 1.0) -> list[int]:
    """Stage widths: ``WIDTHS`` times ``width``, multiples of 8 (at least 8)."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
        raise VisionRecipeError(f"photonet width must be a positive number, got {width!r}")
    return [max(8, round(w * width / 8) * 8) for w in WIDTHS]


@register_model(
    "photonet",
    head_path="head",
    family="resnet",
    description="small ResNet-D for photos (96 px and up): 3-conv stem + pool, 4 residual stages",
    options=("width", "depth"),
)
def photonet(num_classes: int, in_channels: int, image_size: int, width: float = 1.0, depth: int = 1) -> nn.Module:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise VisionRecipeError(f"photonet depth must be a positive integer (blocks per stage), got {depth!r}")
    return PhotoNet(num_classes, in_channels, photonet_widths(width), depth)
