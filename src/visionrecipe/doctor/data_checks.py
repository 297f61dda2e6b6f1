"""The doctor's look at the data: class balance, image files, duplicates and train/test leakage.

    checks = data_checks(dataset)                       # list of doctor_checks.Check
    exact, perceptual = image_hashes(images)            # one bytes key and one 64-bit dHash per image
    leaks = find_copies(test.images, train.images)       # [(test index, train index, "exact" | "near")]
    rows = class_samples(labels, num_classes, per_class=8)

Duplicates are found by hashing, not by comparing all pairs: an exact key (the pixel bytes) and
a perceptual dHash (8×9 grey thumbnail, one bit per horizontal gradient sign) computed in torch
over the uint8 tensors. Equal dHashes are only candidates; tiny images such as 8×8 digits share
them by chance, so a candidate counts as a near copy only when its pixels differ by less than
NEAR_MAD on average.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from visionrecipe.data.cache import cat_images
from visionrecipe.doctor.checks import Check, timed

NEAR_MAD = 2.5  # mean |pixel difference| (0–255) below which two images count as one; JPEG re-saves land ~1–2
CANDIDATES = 8  # members of a hash bucket compared against: bounds the work on blank-image buckets
LEAK_FAIL = 0.01  # fraction of test images copied from train that fails the check
HEADER_SAMPLE = 2000  # image files whose headers are read for the size survey
HASH_CHUNK = 4096  # images hashed at a time


def image_hashes(images: torch.Tensor) -> tuple[list[bytes], list[int]]:
    """(exact keys, 64-bit dHashes) of uint8 N×C×H×W images (a tensor, or MappedImages on disk),
    HASH_CHUNK images at a time: the float copy is a chunk's, never the whole split's."""
    exact, perceptual = [], []
    for start in range(0, len(images), HASH_CHUNK):
        chunk = images[start:start + HASH_CHUNK]
        exact += [hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest() for image in chunk]
        grey = chunk.float().mean(1, keepdim=True)
        mode = "area" if grey.shape[-1] >= 9 and grey.shape[-2] >= 8 else "bilinear"
        thumb = F.interpolate(grey, size=(8, 9), mode=mode)
        bits = (thumb[..., 1:] > thumb[..., :-1]).flatten(1).numpy()
        perceptual += np.packbits(bits, axis=1).view(">u8").reshape(-1).tolist()
    return exact, perceptual


def _near(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a.float() - b.float()).abs().mean()) < NEAR_MAD


def find_copies(images: torch.Tensor, reference: torch.Tensor | None = None) -> list[tuple[int, int, str]]:
    """Images that copy a reference image: (index, reference index, "exact" | "near").

    Without `reference`, duplicates inside `images`: each image after the first of its kind.
    """
    inside = reference is None
    reference = images if inside else reference
    ref_exact, ref_hash = image_hashes(reference)
    exact_index: dict[bytes, int] = {}
    buckets: dict[int, list[int]] = {}
    if not inside:
        for j, (key, h) in enumerate(zip(ref_exact, ref_hash)):
            exact_index.setdefault(key, j)
            buckets.setdefault(h, []).append(j)
    keys, hashes = (ref_exact, ref_hash) if inside else image_hashes(images)
    copies = []
    for i, (key, h) in enumerate(zip(keys, hashes)):
        if key in exact_index:
            copies.append((i, exact_index[key], "exact"))
        else:
            match = next((j for j in buckets.get(h, [])[:CANDIDATES] if _near(images[i], reference[j])), None)
            if match is not None:
                copies.append((i, match, "near"))
        if inside:  # later images are compared with this one
            exact_index.setdefault(key, i)
            buckets.setdefault(h, []).append(i)
    return copies


def class_samples(labels: torch.Tensor, num_classes: int, per_class: int = 8, seed: int = 0) -> list[list[int]]:
    """A few random indices of each class, one list per class."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).reshape(-1)
        rows.append(members[torch.randperm(len(members), generator=generator)[:per_class]].tolist())
    return rows


def check_class_balance(labels: torch.Tensor, classes: list[str]) -> Check:
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    smallest, largest = min(counts), max(counts)
    ratio = largest / max(smallest, 1)
    values = {"counts": dict(zip(classes, counts)), "imbalance_ratio": ratio}
    figure = f"{len(classes)} classes, {smallest}–{largest} train images each (ratio {ratio:.1f})"
    if smallest < 2:
        return Check("class balance", "fail", figure, "a class has fewer than 2 training images", values)
    if ratio > 3:
        return Check("class balance", "warn", figure, "imbalanced: watch per-class recall (evaluate's balanced "
                     "accuracy); consider --sampler balanced or --class-weights auto", values)
    return Check("class balance", "pass", figure, "", values)


def check_image_files(images: torch.Tensor, paths: list[str] | None) -> Check:
    """Decoded shape, and for files the original sizes and modes (headers only, a sample)."""
    from PIL import Image

    c, h, w = images.shape[1:]
    values: dict = {"tensor": [c, h, w]}
    figure = f"decoded {c}×{h}×{w}"
    if not paths:
        return Check("image sizes", "pass", figure + " (tensor dataset)", "", values)
    sample = random.Random(0).sample(paths, min(len(paths), HEADER_SAMPLE))
    sizes, modes = [], Counter()
    for path in sample:
        try:
            with Image.open(path) as img:  # lazy: reads the header, not the pixels
                sizes.append(img.size)
                modes[img.mode] += 1
        except OSError:
            continue
    if not sizes:
        return Check("image sizes", "pass", figure, "", values)
    widths, heights = np.array(sizes).T
    upsampled = float(np.mean(np.minimum(widths, heights) < min(h, w)))
    values.update(files_sampled=len(sizes), min_size=[int(widths.min()), int(heights.min())],
                  max_size=[int(widths.max()), int(heights.max())], modes=dict(modes), upsampled=upsampled)
    figure += (f" from files {widths.min()}×{heights.min()} to {widths.max()}×{heights.max()}, "
               + ", ".join(f"{m} {n}" for m, n in modes.most_common(3)))
    if upsampled > 0.1:
        return Check("image sizes", "warn", figure, f"{100 * upsampled:.0f}% of files are smaller than the "
                     "training size and get upsampled: lower --image-size", values)
    return Check("image sizes", "pass", figure, "", values)


def check_unreadable(skipped: list, total: int) -> Check:
    n = len(skipped)
    values = {"skipped": n, "examples": [list(s) for s in skipped[:5]]}
    figure = f"{n} of {total + n} files unreadable" + (f" (first: {skipped[0][0]})" if n else "")
    if n == 0:
        return Check("unreadable files", "pass", figure, "", values)
    verdict = "fail" if n > 0.1 * (total + n) else "warn"
    return Check("unreadable files", verdict, figure, "fix or delete them (they are skipped in training)", values)


def check_duplicates(images: torch.Tensor) -> Check:
    copies = find_copies(images)
    exact = sum(kind == "exact" for _, _, kind in copies)
    values = {"exact": exact, "near": len(copies) - exact, "pairs": copies[:20]}
    figure = f"{exact} exact and {len(copies) - exact} near duplicates in {len(images)} train images"
    if len(copies) > 0.01 * len(images):
        return Check("train duplicates", "warn", figure, "deduplicate: copies overweight some images and "
                     "leak into the validation split", values)
    return Check("train duplicates", "pass", figure, "", values)


def check_leakage(test: torch.Tensor, train: torch.Tensor) -> Check:
    copies = find_copies(test, train)
    exact = sum(kind == "exact" for _, _, kind in copies)
    values = {"exact": exact, "near": len(copies) - exact, "pairs": copies[:20], "test_images": len(test)}
    figure = f"{len(copies)} of {len(test)} test images copy a train image ({exact} exact)"
    if len(copies) >= max(1, LEAK_FAIL * len(test)):
        return Check("train/test leakage", "fail", figure, "remove the copies from test (or train): the test "
                     "score overstates accuracy on new images", values)
    if copies:
        return Check("train/test leakage", "warn", figure, "a few test images copy train images", values)
    return Check("train/test leakage", "pass", figure, "", values)


def data_checks(dataset) -> list[Check]:
    """Every data check on a loaded Dataset; the train pool includes a carved validation split."""
    pool = dataset.train.images
    if dataset.val is not None:  # on disk (--cache disk) the pool stays there
        pool = cat_images([pool, dataset.val.images])
    total = len(pool) + len(dataset.test)
    runs = [
        lambda: check_class_balance(dataset.train.labels, dataset.classes),
        lambda: check_image_files(dataset.train.images, dataset.train.paths),
        lambda: check_unreadable(dataset.skipped, total),
        lambda: check_duplicates(pool),
        lambda: check_leakage(dataset.test.images, pool),
    ]
    return [timed(run) for run in runs]
