"""Learning-rate schedules as a pure function of the step: resume needs no scheduler state.

    lr = base_lr * lr_factor("cosine", step, total_steps, warmup_steps=100)
"""

from __future__ import annotations

import math


def lr_factor(schedule: str, step: int, total_steps: int, *, warmup_steps: int = 0) -> float:
    """Multiplier of the peak learning rate for the step about to be taken (0-based)."""
    total_steps = max(total_steps, 1)
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "onecycle":
        # Rise for the first 30% (unless a warm-up already did), then cosine down to ~0.
        if not warmup_steps and step < 0.3 * total_steps:
            return 0.04 + 0.96 * step / (0.3 * total_steps)
        start = warmup_steps or 0.3 * total_steps
        progress = min(1.0, (step - start) / max(total_steps - start, 1))
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "triangle":
        # airbench's shape: linear up over the first 23% of steps from 0.2, then linear down to 0.07.
        peak = 0.23
        progress = min(1.0, step / total_steps)
        if progress < peak and not warmup_steps:
            return 0.2 + 0.8 * progress / peak
        return 1.0 - 0.93 * (progress - peak) / (1 - peak) if progress >= peak else 1.0
    raise ValueError(f"unknown schedule {schedule}")
