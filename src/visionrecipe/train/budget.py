"""Time-budget planning: how many steps fit in --time-budget seconds, so the schedule ends there.

    if step == BUDGET_PROBE_STEPS and epoch == 0:
        total_steps, epochs = plan_budget(budget, seconds, steps_per_epoch, eval_fraction(...))
    total_steps, epochs = replan_budget(budget, elapsed, step, epoch, steps_per_epoch)   # each epoch end

The plan is a runtime plan, not a setting: the trainer keeps it in its TrainState (and state.pt),
and config.yaml keeps the user's --epochs bound and --time-budget.
"""

from __future__ import annotations

import math

# Steps timed before the first plan. Step 1 pays one-off costs (allocation, compilation), so the
# first plan is a rough estimate that each epoch end refines.
BUDGET_PROBE_STEPS = 8


def eval_fraction(eval_images: int, global_batch: int, steps_per_epoch: int) -> float:
    """Validation's cost as a fraction of an epoch of training: an image scored costs about a
    third of an image trained (forward only, no backward)."""
    return eval_images / (3 * global_batch * steps_per_epoch)


def plan_budget(time_budget: float, probe_seconds: float, steps_per_epoch: int,
                eval_share: float, step: int = BUDGET_PROBE_STEPS) -> tuple[int, int]:
    """(total steps, epochs) from the time the first BUDGET_PROBE_STEPS steps took, with the
    cost of each epoch's validation deducted from the budget."""
    per_step = probe_seconds / BUDGET_PROBE_STEPS
    budget = time_budget / (1 + eval_share)
    total_steps = max(step + 1, int(budget / per_step))
    return total_steps, math.ceil(total_steps / steps_per_epoch)


def replan_budget(time_budget: float, elapsed: float, step: int, epoch: int,
                  steps_per_epoch: int) -> tuple[int, int]:
    """(total steps, epochs) re-measured at an epoch end: the first steps are a noisy estimate."""
    per_step = elapsed / max(step, 1)
    total_steps = step + max(0, int((time_budget - elapsed) / per_step))
    return total_steps, max(epoch, math.ceil(total_steps / steps_per_epoch))
