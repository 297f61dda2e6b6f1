"""scikit-learn's 8×8 handwritten digits: a dataset that needs no download or disk.

Usage::

    from visionrecipe.data.digits import load_digits_tensors

    classes, (train_x, train_y), (test_x, test_y) = load_digits_tensors()
    train_x.shape   # torch.Size([1437, 1, 8, 8]), uint8

1,797 grey images with values 0–16, scaled to 0–255 as round(v * 255 / 16). The test
split is a fixed stratified 20% (seed 0), independent of --seed, so results from any
run are scored on the same 360 images.
"""

from __future__ import annotations

import numpy as np
import torch

from visionrecipe.data.split import stratified_split

TEST_FRACTION = 0.2
TEST_SEED = 0


def load_digits_tensors():
    """→ (classes, (train images, labels), (test images, labels)); images uint8 N×1×8×8."""
    from sklearn.datasets import load_digits  # imported late: sklearn costs ~1 s to import

    digits = load_digits()
    # Values are integers 0–16; only v=8 lands on a half (127.5), which np.rint and
    # Python's round() both send to 128, so this is round(v * 255 / 16) exactly.
    pixels = np.rint(digits.images * 255.0 / 16.0).astype(np.uint8)
    images = torch.from_numpy(np.ascontiguousarray(pixels[:, None, :, :]))
    labels = torch.from_numpy(digits.target.astype(np.int64))
    keep, held = stratified_split(labels, TEST_FRACTION, TEST_SEED)
    classes = [str(i) for i in range(10)]
    return classes, (images[keep], labels[keep]), (images[held], labels[held])
