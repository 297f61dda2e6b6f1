"""Stronger augmentation on the training device: TrivialAugment, MixUp and CutMix, whole batches at once.

    x = trivial_augment(images.float(), generator)   # N×C×H×W in [0, 255]: one random op per image
    x = apply_ops(x, op, magnitude)                  # the same with the ops (indices into OPS) given
    x, soft = mix_batch(x, labels, num_classes, mixup=0.2, cutmix=1.0, prob=1.0, generator=generator)
    loss = loss_fn(logits, soft)                     # train/tasks.py: class-probability targets

TrivialAugment (Müller & Hutter 2021) with torchvision's TrivialAugmentWide op set and magnitude bins:
each image draws one op and one of 31 magnitudes (signed ops a random sign), nearest interpolation and
black fill as torchvision does. The images are sorted by op once (one host sync per batch), so each op
runs once on its contiguous group and the five geometric ops share one affine grid_sample. Values are
pixel levels in [0, 255] and stay there; translations are in pixels (up to 32, torchvision's numbers,
so a small image may shift out of view). Every random draw comes from `generator`: the trainer seeds it
per step, which keeps runs repeatable and a resume exact.

MixUp/CutMix follow timm's Mixup in batch mode: image i is mixed with image N-1-i; with probability
`prob` a batch is mixed, by MixUp or CutMix (p = 0.5 each when both alphas are set); λ ~ Beta(α, α),
and CutMix's λ is corrected to the share of the image its box leaves. The targets are the mixed
one-hot (or multi-hot, --task multilabel) rows, not smoothed: the loss applies --label-smoothing once,
which gives the numbers timm gets by smoothing the one-hots before mixing.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

MAGNITUDE_BINS = 31  # torchvision's num_magnitude_bins


def _linspace(start: float, end: float):
    return lambda bins: torch.linspace(start, end, bins)


# (name, magnitudes of the bins or None, signed): torchvision's TrivialAugmentWide._AUGMENTATION_SPACE.
# The geometric ops are numbered together (1-5) so that, sorted by op, they form one group.
OPS = (
    ("identity", None, False),
    ("shear_x", _linspace(0.0, 0.99), True),  # the shear's tangent, about the top-left corner
    ("shear_y", _linspace(0.0, 0.99), True),
    ("translate_x", _linspace(0.0, 32.0), True),  # pixels, truncated to whole ones
    ("translate_y", _linspace(0.0, 32.0), True),
    ("rotate", _linspace(0.0, 135.0), True),  # degrees, counter-clockwise
    ("brightness", _linspace(0.0, 0.99), True),  # the factor is 1 + magnitude
    ("color", _linspace(0.0, 0.99), True),  # saturation
    ("contrast", _linspace(0.0, 0.99), True),
    ("sharpness", _linspace(0.0, 0.99), True),
    ("posterize", lambda bins: (8 - torch.arange(bins) / ((bins - 1) / 6)).round(), False),  # bits kept
    ("solarize", _linspace(1.0, 0.0), False),  # the threshold, a share of 255
    ("autocontrast", None, False),
    ("equalize", None, False),
)
OP_INDEX = {name: i for i, (name, _, _) in enumerate(OPS)}
GEOMETRIC = range(OP_INDEX["shear_x"], OP_INDEX["rotate"] + 1)


@lru_cache(maxsize=None)
def magnitude_table(bins: int = MAGNITUDE_BINS) -> tuple[torch.Tensor, torch.Tensor]:
    """(len(OPS)×bins magnitudes, which ops are signed), on the CPU."""
    table = torch.stack([fn(bins).float() if fn else torch.zeros(bins) for _, fn, _ in OPS])
    return table, torch.tensor([signed for _, _, signed in OPS])


def trivial_augment(x: torch.Tensor, generator: torch.Generator, bins: int = MAGNITUDE_BINS) -> torch.Tensor:
    """Each image of the float batch (values in [0, 255]) through one random op at a random magnitude."""
    n = len(x)
    # Drawn for every image whatever its op: the number of draws, hence the stream, depends on n only.
    op = torch.randint(len(OPS), (n,), device=x.device, generator=generator)
    level = torch.randint(bins, (n,), device=x.device, generator=generator)
    negative = torch.rand(n, device=x.device, generator=generator) <= 0.5  # torchvision's test
    table, signed = (t.to(x.device) for t in magnitude_table(bins))
    magnitude = torch.where(signed[op] & negative, -table[op, level], table[op, level])
    return apply_ops(x, op, magnitude)


def apply_ops(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Image i through OPS[op[i]] at magnitude[i]; each op runs once, on all of its images together."""
    order = torch.argsort(op, stable=True)
    counts = torch.bincount(op, minlength=len(OPS)).tolist()  # the one host sync: group sizes
    starts = np.cumsum([0] + counts).tolist()
    x, op, magnitude = x[order], op[order], magnitude[order]
    groups = [x[:starts[GEOMETRIC.start]]]  # identity
    first, end = starts[GEOMETRIC.start], starts[GEOMETRIC.stop]
    if end > first:
        groups.append(affine(x[first:end], op[first:end], magnitude[first:end]))
    for i in range(GEOMETRIC.stop, len(OPS)):
        if counts[i]:
            part = slice(starts[i], starts[i + 1])
            groups.append(PIXEL_OPS[OPS[i][0]](x[part], magnitude[part]))
    return torch.cat(groups)[torch.argsort(order)]


# --- geometric ops: one affine map per image, one grid_sample -----------------------------------------
def affine(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Shear, translate or rotate each image (op: its index into OPS), nearest pixel, black outside.

    torchvision's inverse maps in pixel coordinates centred on the image (output pixel p reads input
    pixel A·p + t), rescaled to grid_sample's [-1, 1] units (align_corners=False, as torchvision)."""
    n, c, h, w = x.shape
    m = magnitude.to(x.dtype)
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    radians = torch.deg2rad(m)
    cos, sin = torch.cos(radians), torch.sin(radians)
    shift = m.trunc()
    kind = {name: op == OP_INDEX[name] for name in ("shear_x", "shear_y", "translate_x", "translate_y")}
    rotate = op == OP_INDEX["rotate"]
    # shear_x: x_in = x + m·(y + h/2), about the top-left corner; shear_y likewise; translate: p - t.
    a11 = torch.where(rotate, cos, one)
    a12 = torch.where(kind["shear_x"], m * h / w, torch.where(rotate, -sin * h / w, zero))
    a21 = torch.where(kind["shear_y"], m * w / h, torch.where(rotate, sin * w / h, zero))
    a22 = a11
    t1 = torch.where(kind["shear_x"], m * h / w, torch.where(kind["translate_x"], -2 * shift / w, zero))
    t2 = torch.where(kind["shear_y"], m * w / h, torch.where(kind["translate_y"], -2 * shift / h, zero))
    theta = torch.stack([torch.stack([a11, a12, t1], 1), torch.stack([a21, a22, t2], 1)], 1)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


# --- pixel ops: (images in [0, 255], magnitude per image) -> images in [0, 255] ------------------------
def _per_image(m: torch.Tensor) -> torch.Tensor:
    return m.view(-1, 1, 1, 1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor·x + (1 - factor)·other, clamped: torchvision's _blend (factor 1 leaves x)."""
    factor = _per_image(factor)
    return (x * factor + other * (1 - factor)).clamp(0, 255)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """N×1×H×W luma (ITU-R 601-2, torchvision's weights); a one-channel image is its own."""
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    weights = torch.tensor([0.2989, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def brightness(x, m):
    return (x * _per_image(1 + m)).clamp(0, 255)


def color(x, m):
    if x.shape[1] == 1:  # nothing to saturate: torchvision (and PIL) return a grey image as it is
        return x
    return _blend(x, grayscale(x), 1 + m)


def contrast(x, m):
    return _blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), 1 + m)


def sharpness(x, m):
    """Blend with the 3×3 smoothed image ([1 1 1; 1 5 1; 1 1 1] / 13); the border keeps its pixels."""
    n, c, h, w = x.shape
    if h <= 2 or w <= 2:
        return x
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5
    blurred = F.conv2d(x, (kernel / 13).expand(c, 1, 3, 3), groups=c)
    out = x.clone()
    out[..., 1:-1, 1:-1] = _blend(x[..., 1:-1, 1:-1], blurred, 1 + m)
    return out


def posterize(x, m):
    """Keep the top m bits of each level (8: the image as it is)."""
    step = _per_image(2 ** (8 - m))
    return torch.where(step > 1, torch.floor(x / step) * step, x)


def solarize(x, m):
    """Invert the levels at or above 255·m."""
    return torch.where(x >= _per_image(255 * m), 255 - x, x)


def autocontrast(x, m):
    """Stretch each channel to [0, 255]; a flat channel stays as it is."""
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    flat = high == low
    scale = torch.where(flat, torch.ones_like(high), 255 / (high - low).clamp(min=1e-6))
    return ((x - torch.where(flat, torch.zeros_like(low), low)) * scale).clamp(0, 255)


def equalize(x, m):
    """Histogram equalisation per image and channel, as PIL and torchvision compute it, all channels
    at once: one bincount over the levels offset by 256 per channel."""
    n, c, h, w = x.shape
    levels = x.round().clamp(0, 255).long().view(n * c, h * w)
    offsets = torch.arange(n * c, device=x.device)[:, None] * 256
    hist = torch.bincount((levels + offsets).view(-1), minlength=n * c * 256).view(n * c, 256)
    cumulative = hist.cumsum(1)
    # PIL's step: the pixels not at the image's brightest level, over 255; 0 leaves the channel alone.
    brightest = hist.gather(1, cumulative.argmax(1, keepdim=True))
    step = torch.div(h * w - brightest, 255, rounding_mode="floor")
    lut = torch.div(cumulative[:, :-1] + step // 2, step.clamp(min=1), rounding_mode="floor").clamp(0, 255)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut], 1)
    equalized = lut.gather(1, levels).to(x.dtype).view(n, c, h, w)
    return torch.where((step > 0).view(n, c, 1, 1), equalized, x)


PIXEL_OPS = {"brightness": brightness, "color": color, "contrast": contrast, "sharpness": sharpness,
             "posterize": posterize, "solarize": solarize, "autocontrast": autocontrast, "equalize": equalize}
assert set(PIXEL_OPS) == {name for name, _, _ in OPS[GEOMETRIC.stop:]}


# --- MixUp and CutMix ------------------------------------------------------------------------------
def mix_batch(x: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0,
              prob: float = 1.0, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed images, N×num_classes soft targets): image i with image N-1-i, as timm's Mixup does per
    batch. `labels`: class indices (N) or multi-hot rows (N×C); an unmixed batch gets its one-hot rows."""
    targets = F.one_hot(labels, num_classes).to(x.dtype) if labels.dim() == 1 else labels.to(x.dtype)
    # The batch's few scalars come from numpy, seeded by one draw of the step's generator (torch has
    # no seeded Beta sampler): one host sync per batch.
    seed = int(torch.randint(2**62, (1,), device=x.device, generator=generator))
    rng = np.random.default_rng(seed)
    if not (mixup > 0 or cutmix > 0) or rng.random() >= prob:
        return x, targets
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    share = float(rng.beta(alpha, alpha))  # λ: the share of each image that stays its own
    if use_cutmix:
        top, bottom, left, right = cutmix_box(x.shape[2], x.shape[3], share, rng)
        x = x.clone()
        x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
        share = 1 - (bottom - top) * (right - left) / (x.shape[2] * x.shape[3])  # the box's true area
    else:
        x = x * share + x.flip(0) * (1 - share)
    return x, targets * share + targets.flip(0) * (1 - share)


def cutmix_box(height: int, width: int, share: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of timm's rand_bbox: sides sqrt(1 - λ) of the image's, centred at a
    uniform pixel and clipped to the image (so the pasted area may be smaller than 1 - λ)."""
    ratio = math.sqrt(1 - share)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right
