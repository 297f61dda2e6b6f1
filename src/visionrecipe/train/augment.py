"""Batched augmentation on the training device: whole batches at once, no per-sample Python.

    batch = BatchAugment(mean, std, crop_padding=2, flip=True, alternate_flip=True, n_train=N, seed=0)
    photos = BatchAugment(mean, std, crop_scale=0.35, crop_ratio=4 / 3, flip=True)   # random-resized crops
    x = batch(images_uint8[idx], idx, epoch, generator)     # float, normalised, augmented
    x = batch.normalise(images_uint8)                       # evaluation: normalise only
    strong = BatchAugment(mean, std, auto_augment="trivial", mixup=0.2, cutmix=1.0, num_classes=10)
    x, targets = strong.mix(strong(images_uint8[idx], idx, epoch, generator), labels[idx], generator)  # soft
    order = epoch_order(n, seed, epoch, device)             # the shuffled order of an epoch
    order = balanced_order(labels, seed, epoch, device)     # --sampler balanced: each class equally often

Alternating flip (from the CIFAR-10 speed records): each image gets a random flip in epoch 0 and
the opposite of it in every odd epoch, so two consecutive epochs see both views exactly once
instead of at random.

Random-resized crops (photos, 96 px and up by default; the 32-px path keeps translate-and-flip): each image
gets its own box (area a share in [crop_scale, 1] of the image, aspect ratio in [1/crop_ratio,
crop_ratio], as torchvision's RandomResizedCrop draws them) and the whole batch is resampled to
its size in one `grid_sample` call, the flip folded into the same affine map.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from visionrecipe.train.strong_augment import mix_batch, trivial_augment


def random_translate(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `padding` pixels (reflect-padded): a random crop of the padded image."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_boxes(n: int, height: int, width: int, scale: float, ratio: float, generator: torch.Generator,
                 device: torch.device | str = "cpu", tries: int = 10) -> torch.Tensor:
    """n boxes (x0, y0, x1, y1) in pixels, inside the height×width image: torchvision's
    RandomResizedCrop draw (area share uniform in [scale, 1], log aspect uniform in
    [-log ratio, log ratio]; `tries` draws per image, the first that fits wins, else the whole
    image), all images at once."""
    area = height * width
    shares = torch.empty(n, tries, device=device).uniform_(scale, 1.0, generator=generator)
    log_ratio = math.log(ratio)
    aspects = torch.exp(torch.empty(n, tries, device=device).uniform_(-log_ratio, log_ratio, generator=generator))
    w = torch.sqrt(shares * area * aspects)
    h = torch.sqrt(shares * area / aspects)
    fits = (w <= width) & (h <= height)
    first = fits.float().argmax(1, keepdim=True)  # the first draw that fits (0 when none does)
    any_fit = fits.any(1)
    w = torch.where(any_fit, w.gather(1, first)[:, 0], torch.full_like(w[:, 0], width))
    h = torch.where(any_fit, h.gather(1, first)[:, 0], torch.full_like(h[:, 0], height))
    x0 = torch.rand(n, device=device, generator=generator) * (width - w)
    y0 = torch.rand(n, device=device, generator=generator) * (height - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def resized_crops(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor | None = None,
                  size: int | None = None) -> torch.Tensor:
    """Each image's box resampled (bilinear) to size×size (default: the input's), mirrored where
    `flip`; one affine_grid + one grid_sample for the whole batch, no loop over images."""
    n, c, height, width = x.shape
    size = size or height
    # grid_sample's coordinates (align_corners=False): the image's outer pixel edges are ±1.
    scale_x = (boxes[:, 2] - boxes[:, 0]) / width
    scale_y = (boxes[:, 3] - boxes[:, 1]) / height
    centre_x = (boxes[:, 0] + boxes[:, 2]) / width - 1
    centre_y = (boxes[:, 1] + boxes[:, 3]) / height - 1
    if flip is not None:
        scale_x = torch.where(flip, -scale_x, scale_x)
    zero = torch.zeros_like(scale_x)
    theta = torch.stack([torch.stack([scale_x, zero, centre_x], 1), torch.stack([zero, scale_y, centre_y], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def flip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images where mask is True."""
    return torch.where(mask[:, None, None, None], x.flip(3), x)


class BatchAugment:
    def __init__(self, mean, std, *, crop_padding: int = 0, flip: bool = False,
                 alternate_flip: bool = False, n_train: int = 0, seed: int = 0,
                 device: torch.device | str = "cpu", crop_scale: float = 0.0, crop_ratio: float = 4 / 3,
                 auto_augment: str = "none", mixup: float = 0.0, cutmix: float = 0.0, mix_prob: float = 1.0,
                 num_classes: int = 0):
        c = len(mean)
        # train/strong_augment.py: TrivialAugment per image (in __call__), MixUp/CutMix per batch (mix)
        self.auto_augment = auto_augment
        self.mixup, self.cutmix, self.mix_prob, self.num_classes = mixup, cutmix, mix_prob, num_classes
        self.mean = torch.tensor(mean, device=device).view(1, c, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(std, device=device).view(1, c, 1, 1) * 255)
        self.crop_padding = crop_padding
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio  # crop_scale 0: no random-resized crops
        self.flip = flip
        self.alternate_flip = alternate_flip
        # The epoch-0 flip of every training image, fixed by the seed so resume sees the same views.
        g = torch.Generator().manual_seed(seed + 7919)
        self.base_flip = (torch.rand(n_train, generator=g) < 0.5).to(device)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) * self.inv_std

    def flip_mask(self, index: torch.Tensor, epoch: int, generator: torch.Generator) -> torch.Tensor:
        if self.alternate_flip:
            return self.base_flip[index] ^ bool(epoch % 2)
        return torch.rand(index.numel(), device=index.device, generator=generator) < 0.5

    def __call__(self, images: torch.Tensor, index: torch.Tensor, epoch: int,
                 generator: torch.Generator, size: int | None = None) -> torch.Tensor:
        """The augmented, normalised batch; `size`: the side to train at (progressive resizing),
        default the stored side."""
        # Crops and flips first, then TrivialAugment's op, as torchvision orders them; its ops are
        # defined on levels in [0, 255], hence normalised last (the linear steps before commute with it).
        x = images.float()
        if self.crop_scale > 0:
            n, _, height, width = x.shape
            boxes = random_boxes(n, height, width, self.crop_scale, self.crop_ratio, generator, x.device)
            flip = self.flip_mask(index, epoch, generator) if self.flip else None
            x = random_translate(resized_crops(x, boxes, flip, size), self.crop_padding, generator)
        else:
            if size is not None and size != x.shape[2]:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            x = random_translate(x, self.crop_padding, generator)
            if self.flip:
                x = flip_where(x, self.flip_mask(index, epoch, generator))
        if self.auto_augment == "trivial":
            x = trivial_augment(x, generator)
        return self.normalise(x)

    def mix(self, x: torch.Tensor, labels: torch.Tensor,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets) after --mixup/--cutmix (soft targets, N×classes); as given when both are off."""
        if not (self.mixup or self.cutmix):
            return x, labels
        return mix_batch(x, labels, self.num_classes, self.mixup, self.cutmix, self.mix_prob, generator=generator)


# Each random stream of a run is seeded with seed * SEED_STRIDE + offset, the offset numbering the
# stream's instances (an epoch, a step, a process rank): a prime above any offset keeps the streams
# of seed 0 and seed 1 from ever meeting.
SEED_STRIDE = 1_000_003


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The shuffled order of an epoch, a pure function of (seed, epoch): resume needs no RNG state."""
    g = torch.Generator().manual_seed(seed * SEED_STRIDE + 7 * epoch + 1)
    return torch.randperm(n, generator=g).to(device)


def balanced_order(labels: torch.Tensor, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """An epoch of len(labels) draws in which every class present is drawn equally often (the
    remainder of n / classes rotates over the classes from epoch to epoch), shuffled; a pure
    function of (seed, epoch) as epoch_order, so an exact resume needs no sampler state.

    Each class walks its own endless sequence of shuffled passes over its images, epoch after
    epoch: a small class repeats its images, a large one shows the next part of a pass each epoch,
    so every image is seen within ceil(images of the class / draws per epoch) epochs.
    """
    labels = labels.cpu()
    classes = torch.unique(labels).tolist()
    n, k = len(labels), len(classes)
    quota, remainder = divmod(n, k)
    draws = []
    for i, c in enumerate(classes):
        members = torch.nonzero(labels == c).reshape(-1).numpy()
        size = len(members)
        # Where this epoch's draws start in the class's sequence: every earlier epoch's quota, plus
        # the extra draws the rotation gave the class in them.
        extras = epoch // k * remainder + sum((i + e) % k < remainder for e in range(epoch % k))
        start = epoch * quota + extras
        stop = start + quota + int((i + epoch) % k < remainder)
        if stop == start:
            continue
        passes = range(start // size, (stop - 1) // size + 1)
        walk = np.concatenate([members[np.random.default_rng([seed, 1, c, p]).permutation(size)] for p in passes])
        draws.append(walk[start - passes[0] * size:stop - passes[0] * size])
    order = np.concatenate(draws)
    order = order[np.random.default_rng([seed, 0, epoch]).permutation(n)]
    return torch.from_numpy(order).to(device)
