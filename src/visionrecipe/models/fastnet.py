"""fastnet: a small, fast CNN for small images after Keller Jordan's airbench CIFAR-10 records.

Usage::

    from visionrecipe.models import create_model
    from visionrecipe.models.fastnet import init_whitening

    model = create_model("fastnet", num_classes=10, image_size=32)       # widths 64, 256, 256
    model = create_model("fastnet", num_classes=10, width=0.5, depth=4)  # 32, 128, 128, 128
    model = create_model("fastnet", num_classes=10, image_size=128, stem=2)  # blocks see 64×64
    init_whitening(model, train_images[:5000])  # normalised float (N, C, H, W); freezes the layer

Layout (airbench94): a 2x2 "whitening" conv with 2*C*2*2 outputs (24 for RGB; stride ``stem``) -> GELU ->
``depth`` blocks of [Conv3x3 -> MaxPool(2) -> BN -> GELU -> Conv3x3 -> BN -> GELU] ->
global max pool -> head Linear (no bias) -> logits times 1/9.

Why these pieces: the whitening conv's weights come from the eigenvectors of the data's
2x2 patch covariance, so the first layer starts decorrelated and is never trained; the
3x3 convs start as identity (dirac) on their first in-channels, so at init every block
passes its input through and deep stacks train from the first step; the fixed 1/9 logit
scale is airbench's tuned temperature.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from visionrecipe.errors import VisionRecipeError
from visionrecipe.models.registry import register_model

WIDTHS = (64, 256, 256)  # channels of blocks 1..3; further blocks repeat the last
WHITEN_KERNEL = 2
LOGIT_SCALE = 1 / 9
# The whitening conv's stride: 1 (airbench, small images) or 2, which reads the image in disjoint 2×2
# patches (lossless: 12 values in, 24 whitened out) and so halves the side before the first block. A
# photo at 2s px then costs about what one at s px costs with stride 1, and keeps its detail.
STEM_STRIDES = (1, 2)
# PyTorch's momentum is the weight of the new batch: airbench's "0.6" is torch's 0.4.
BN_MOMENTUM = 0.4


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
    # Identity on the first min(in, out) output channels; the rest keep the default init.
    nn.init.dirac_(conv.weight.data[:in_channels])
    return conv


class ConvBlock(nn.Module):
    """Conv -> MaxPool(2) -> BN -> GELU -> Conv -> BN -> GELU; the pool can be skipped."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels)
        # On 1x1 maps there is nothing left to pool: small inputs (8x8 digits) run out first.
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.norm1 = nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM)
        self.act1 = nn.GELU()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.norm2 = nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM)
        self.act2 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.pool(self.conv1(x))))
        return self.act2(self.norm2(self.conv2(x)))


class FastNet(nn.Module):
    """Whitening conv, ``len(widths)`` conv blocks, global max pool, bias-free Linear head."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, widths: list[int], stem: int = 1):
        super().__init__()
        whiten_width = 2 * in_channels * WHITEN_KERNEL**2  # each eigenvector and its negative
        self.whiten = nn.Conv2d(in_channels, whiten_width, WHITEN_KERNEL, stride=stem, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from data by init_whitening, never trained
        self.act = nn.GELU()
        side = (image_size - WHITEN_KERNEL) // stem + 1  # (n + 2*0 - 2)/stem + 1
        blocks, channels = [], whiten_width
        for width in widths:
            blocks.append(ConvBlock(channels, width, pool=side >= 2))
            side = side // 2 if side >= 2 else side
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(channels, num_classes, bias=False)
        # A plain float, not a buffer: it is not trained and stays out of the state dict.
        self.logit_scale = LOGIT_SCALE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act(self.whiten(x)))
        return self.head(self.flatten(self.pool(x))) * self.logit_scale


def fastnet_widths(width: float = 1.0, depth: int = 3) -> list[int]:
    """Block widths: ``WIDTHS`` times ``width``, rounded to a multiple of 8, ``depth`` long."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise VisionRecipeError(f"fastnet depth must be a positive integer, got {depth!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
        raise VisionRecipeError(f"fastnet width must be a positive number, got {width!r}")
    base = [WIDTHS[min(i, len(WIDTHS) - 1)] for i in range(depth)]
    # Multiples of 8 keep tensor-core friendly channel counts.
    return [max(8, round(w * width / 8) * 8) for w in base]


@register_model(
    "fastnet",
    head_path="head",
    family="fastnet",
    description="airbench-style fast CNN: frozen whitening conv, dirac-initialised conv blocks",
    options=("width", "depth", "stem"),
)
def fastnet(num_classes: int, in_channels: int, image_size: int, width: float = 1.0, depth: int = 3,
            stem: int = 1) -> nn.Module:
    if image_size < WHITEN_KERNEL:
        raise VisionRecipeError(f"fastnet needs images of at least 2x2 pixels, got {image_size}")
    if isinstance(stem, bool) or stem not in STEM_STRIDES:
        raise VisionRecipeError(f"fastnet stem must be one of {', '.join(map(str, STEM_STRIDES))}, got {stem!r}")
    return FastNet(num_classes, in_channels, image_size, fastnet_widths(width, depth), stem)


def patch_covariance(images: torch.Tensor, kernel_size: int = WHITEN_KERNEL) -> torch.Tensor:
    """Uncentred covariance (C*k*k, C*k*k) of every k x k patch in ``images`` (N, C, H, W).

    Rows follow a conv weight's (channel, row, column) order, so an eigenvector reshaped
    to (C, k, k) is a conv filter. Uncentred, as airbench: the data is already normalised.
    """
    patches = F.unfold(images.float(), kernel_size)  # (N, C*k*k, L)
    flat = patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()
    return (flat.T @ flat) / flat.shape[0]


def init_whitening(model: nn.Module, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set fastnet's whitening conv from ``images`` (N, C, H, W, normalised floats) and freeze it.

    The filters are the patch covariance's eigenvectors scaled by 1/sqrt(eigenvalue + eps),
    strongest first, followed by their negatives (the GELU after the conv would otherwise
    keep only one sign of each whitened component). A few thousand images are plenty.
    """
    conv = model.whiten
    k = conv.kernel_size[0]
    if images.ndim != 4 or images.shape[1] != conv.in_channels:
        raise VisionRecipeError(
            f"init_whitening needs images of shape (N, {conv.in_channels}, H, W), got {tuple(images.shape)}"
        )
    eigenvalues, eigenvectors = torch.linalg.eigh(patch_covariance(images, k))
    # eigh sorts ascending; flip so the strongest components come first, as airbench does.
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)
    filters = eigenvectors / torch.sqrt(eigenvalues.clamp(min=0) + eps)[:, None]
    filters = filters.reshape(-1, conv.in_channels, k, k)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight))
    conv.weight.requires_grad_(False)
