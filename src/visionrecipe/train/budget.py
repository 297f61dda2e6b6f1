"""Time-budget planning: how many steps fit in --time-budget seconds, so the schedule ends there.

    if step == BUDGET_PROBE_STEPS and epoch == 0:
        total_steps, epochs = plan_budget(budget, seconds, steps_per_epoch, eval_fraction(...), costs=costs)
    total_steps, epochs = replan_budget(budget, elapsed, step, epoch, steps_per_epoch, costs=costs)  # epoch ends

Steps need not cost the same: with progressive resizing an early step at 3/4 of the side costs about
(3/4)² of a late one. `costs(total_steps)` gives every step's relative cost for a run of that many steps
(recipes.progressive_costs; None: all equal), and the plan finds the most steps whose summed cost fits
the time left at the speed measured so far, so a run that grows its images still ends on its budget with
the schedule annealed.

The plan is a runtime plan, not a setting: the trainer keeps it in its TrainState (and state.pt),
and config.yaml keeps the user's --epochs bound and --time-budget.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

# Steps timed before the first plan. Step 1 pays one-off costs (allocation, compilation), so the
# first plan is a rough estimate that each epoch end refines.
BUDGET_PROBE_STEPS = 8

Costs = Callable[[int], np.ndarray]  # total steps -> each step's relative cost


def equal_costs(total_steps: int) -> np.ndarray:
    return np.ones(total_steps)


def eval_fraction(eval_images: int, global_batch: int, steps_per_epoch: int) -> float:
    """Validation's cost as a fraction of an epoch of training: an image scored costs about a
    third of an image trained (forward only, no backward)."""
    return eval_images / (3 * global_batch * steps_per_epoch)


def fit_steps(costs: Costs, done: int, units: float) -> int:
    """The most total steps T > done whose steps done..T-1 cost at most `units` (at least done + 1)."""
    def cost(total: int) -> float:
        return float(costs(total)[done:].sum())

    low, high = done + 1, done + 2
    while cost(high) <= units:
        low, high = high, done + 2 * (high - done)
    while high - low > 1:  # cost(low) fits (or low is the minimum), cost(high) does not
        middle = (low + high) // 2
        low, high = (middle, high) if cost(middle) <= units else (low, middle)
    return low


def plan_budget(time_budget: float, probe_seconds: float, steps_per_epoch: int, eval_share: float,
                step: int = BUDGET_PROBE_STEPS, costs: Costs | None = None,
                planned: int | None = None) -> tuple[int, int]:
    """(total steps, epochs) from the time the first `step` steps took, with the cost of each
    epoch's validation deducted from the budget. `planned`: the total the steps so far ran under."""
    costs = costs or equal_costs
    per_unit = probe_seconds / max(float(costs(max(planned or step, step))[:step].sum()), 1e-9)
    budget = time_budget / (1 + eval_share)
    total_steps = fit_steps(costs, 0, budget / per_unit)
    total_steps = max(step + 1, total_steps)
    return total_steps, math.ceil(total_steps / steps_per_epoch)


def replan_budget(time_budget: float, elapsed: float, step: int, epoch: int, steps_per_epoch: int,
                  costs: Costs | None = None, planned: int | None = None) -> tuple[int, int]:
    """(total steps, epochs) re-measured at an epoch end: the first steps are a noisy estimate.
    `planned`: the total the steps so far ran under (their costs are counted with it)."""
    costs = costs or equal_costs
    done = float(costs(max(planned or step, step))[:step].sum())
    per_unit = elapsed / max(done, 1e-9)
    left = max(0.0, time_budget - elapsed)
    total_steps = fit_steps(costs, step, left / per_unit) if left >= per_unit * float(costs(step + 1)[step]) else step
    return total_steps, max(epoch, math.ceil(total_steps / steps_per_epoch))
