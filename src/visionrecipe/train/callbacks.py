"""Watching a run: the live progress bar, TensorBoard event files, and the NaN test hook.

    bar = progress_bar(total_steps, "Epoch 1/10", enabled=True)
    writer = open_tensorboard(run_dir)       # --tensorboard
"""

from __future__ import annotations

import os
from pathlib import Path

from visionrecipe.errors import VisionRecipeError


def open_tensorboard(run_dir: Path):
    """A SummaryWriter on <run_dir>/tensorboard; a one-line error when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise VisionRecipeError("--tensorboard needs the tensorboard package: "
                                "pip install 'visionrecipe[tensorboard]'") from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, unit="step", dynamic_ncols=True)


def nan_injection_steps() -> set[int]:
    """Test hook: VISIONRECIPE_INJECT_NAN_AT_STEP=12 (or 12,15) makes the loss of those steps
    (1-based) NaN, so the NaN handling can be tested on a healthy run. Read once, here."""
    value = os.environ.get("VISIONRECIPE_INJECT_NAN_AT_STEP", "")
    try:
        return {int(part) for part in value.split(",") if part.strip()}
    except ValueError:
        raise VisionRecipeError(f"VISIONRECIPE_INJECT_NAN_AT_STEP={value!r}: expected step numbers, e.g. 12,15") from None
