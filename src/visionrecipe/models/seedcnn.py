"""The seed article's two-conv network, with its flatten size derived instead of hard-coded.

Usage::

    from visionrecipe.models import create_model, layer_table, format_layer_table

    model = create_model("seedcnn", num_classes=10, image_size=32)   # fc1 reads 128*8*8
    model = create_model("seedcnn", num_classes=10, in_channels=1, image_size=8)  # 128*2*2
    print(format_layer_table(layer_table("seedcnn")))  # the article's sizes, worked out

Layout: Conv(in, 64, 3, p=1) -> ReLU -> MaxPool(2) -> Conv(64, 128, 3, p=1) -> ReLU ->
MaxPool(2) -> flatten -> Linear(., 1024) -> ReLU -> head Linear(1024, classes).

The article hard-coded ``128 * 14 * 14`` for fc1's input, which is right only for 56x56
images: each padded 3x3 conv keeps the side ((n + 2*1 - 3)/1 + 1 = n) and each pool
halves it, so a side of n ends as n // 4 and fc1 reads 128 * (n // 4)**2 features.
"""

from __future__ import annotations

import torch
from torch import nn

from visionrecipe.errors import VisionRecipeError
from visionrecipe.models.registry import register_model

CONV_WIDTHS = (64, 128)
HIDDEN = 1024


class SeedCNN(nn.Module):
    """Two conv/pool stages and two Linear layers; the last one is ``head``."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        side = image_size // 4  # two MaxPool(2) stages, each flooring
        if side < 1:
            raise VisionRecipeError(f"seedcnn needs images of at least 4x4 pixels, got {image_size}")
        c1, c2 = CONV_WIDTHS
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * side * side, HIDDEN)
        self.relu = nn.ReLU()
        self.head = nn.Linear(HIDDEN, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.features(x))
        return self.head(self.relu(self.fc1(x)))


@register_model(
    "seedcnn",
    head_path="head",
    family="seedcnn",
    description="the seed article's 2-conv CNN; fc1 size derived from image_size",
)
def seedcnn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return SeedCNN(num_classes, in_channels, image_size)
