"""Batched augmentation on the training device: whole batches at once, no per-sample Python.

    batch = BatchAugment(mean, std, crop_padding=2, flip=True, alternate_flip=True, n_train=N, seed=0)
    x = batch(images_uint8[idx], idx, epoch, generator)     # float, normalised, augmented
    x = batch.normalise(images_uint8)                       # evaluation: normalise only
    order = epoch_order(n, seed, epoch, device)             # the shuffled order of an epoch

Alternating flip (from the CIFAR-10 speed records): each image gets a random flip in epoch 0 and
the opposite of it in every odd epoch, so two consecutive epochs see both views exactly once
instead of at random.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def flip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images where mask is True."""
    return torch.where(mask[:, None, None, None], x.flip(3), x)


class BatchAugment:
    def __init__(self, mean, std, *, crop_padding: int = 0, flip: bool = False,
                 alternate_flip: bool = False, n_train: int = 0, seed: int = 0,
                 device: torch.device | str = "cpu"):
        c = len(mean)
        self.mean = torch.tensor(mean, device=device).view(1, c, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(std, device=device).view(1, c, 1, 1) * 255)
        self.crop_padding = crop_padding
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
                 generator: torch.Generator) -> torch.Tensor:
        x = self.normalise(images)
        x = random_translate(x, self.crop_padding, generator)
        if self.flip:
            x = flip_where(x, self.flip_mask(index, epoch, generator))
        return x


# Each random stream of a run is seeded with seed * SEED_STRIDE + offset, the offset numbering the
# stream's instances (an epoch, a step, a process rank): a prime above any offset keeps the streams
# of seed 0 and seed 1 from ever meeting.
SEED_STRIDE = 1_000_003


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The shuffled order of an epoch, a pure function of (seed, epoch): resume needs no RNG state."""
    g = torch.Generator().manual_seed(seed * SEED_STRIDE + 7 * epoch + 1)
    return torch.randperm(n, generator=g).to(device)
