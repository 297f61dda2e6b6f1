"""The run's plan, made before anything is stored: the budget policy measured on this device, and
the memory check before the first step.

    settings, line = plan_run(settings, device, world)  # the policy's choices filled in, and the plan's line
    cfg = fit_memory(cfg, data, device, world)            # --grad-accum raised so a step fits, or a one-line error

The policy itself is data in recipes.py (tiers, MIN_EPOCHS, FIXRES, progressive resizing) and a
pure function, `plan_tier`; this module feeds it what only this machine knows: how many images
per second each candidate trains at, timed on random images before the data is decoded (the
chosen side decides the side the data is stored at). It runs for the default command, where the
recipe picks the net (`--model`, `--width`, `--depth`, `--stem`, `--weights` unset); its choices become
ordinary settings, so config.yaml holds them and a resume replays them without measuring again.
"""

from __future__ import annotations

import math
import os
import time

import torch

from visionrecipe.config import Config
from visionrecipe.errors import VisionRecipeError
from visionrecipe.recipes import (CROP_SCALE, DEFAULT_PHOTO_BUDGET, PHOTO_CROPS, PHOTO_TIERS, SMALL_TIERS,
                                  Plan, Tier, afforded_epochs, copy_config, min_epochs, photo_data, plan_tier, usable_tiers)
from visionrecipe.system import log

# Images per timed step (CPU; ×4 on CUDA): enough for a steady rate, few enough that timing the
# photo tiers (fastnet at 96 px trains about 85 img/s on 2 cores) takes seconds, not a minute.
PROBE_BATCH = {"small": 256, "photo": 64}
PROBE_STEPS = 3  # timed, after one untimed step (the first step of a shape builds its kernels)
# Tiers whose speed estimated from their MACs would afford under this share of min_epochs are not timed.
PROBE_CUTOFF = 0.6
# Without a budget (--epochs given) photos train at this tier (fastnet at 96 px).
NO_BUDGET_TIER = PHOTO_TIERS[2]
# The share of free memory a training step may plan to use; the rest is the allocator's slack,
# the evaluation batches and everything else on the machine.
MEMORY_SHARE = 0.6
# Bytes kept per image for the backward pass, per value of the layer table's outputs (float32): the
# table lists convs, norms and pools; activations and their gradients in flight about double it.
ACTIVATION_FACTOR = 2 * 4


def policy_applies(cfg: Config) -> bool:
    """The default command: the recipe chooses the net (nothing about the model was given)."""
    model = cfg.model
    return (cfg.optim.recipe in (None, "fast") and model.model is None and model.weights is None
            and not model.options() and cfg.optim.train_size is None)


def plan_run(settings: Config, device: torch.device, world) -> tuple[Config, str | None]:
    """(settings with the plan's choices set, the plan's log line), or (settings, None) when the
    policy does not apply."""
    chosen, line = plan_choices(settings, device, world)
    return (copy_config(settings, **chosen) if chosen else settings), line


def plan_choices(settings: Config, device: torch.device, world,
                 described: tuple[int, int | None] | None = None) -> tuple[dict, str | None]:
    """(the plan's choices as settings, its line), or ({}, None) when the policy does not apply.
    Rank 0 measures; every process gets its plan. `described`: describe_dataset's answer, when the
    caller has it already (a listing of a large folder is not free)."""
    if not policy_applies(settings):
        return {}, None
    from visionrecipe.data.load import describe_dataset

    planned = None
    if world.is_main:
        described = described or describe_dataset(settings.data.data)
        if described is not None:
            planned = _plan(settings, described, device, world.size)
    return world.broadcast(planned) or ({}, None)


def _plan(settings: Config, described: tuple[int, int | None], device: torch.device,
          processes: int) -> tuple[dict, str] | None:
    n_images, native = described
    n_train = round(n_images * (1 - (settings.data.val_fraction or 0.0)))  # validation is carved from train
    native = settings.data.image_size or native  # --image-size caps the side, as the images' own would
    photos = photo_data(native)
    budget = settings.optim.time_budget
    if budget is None and settings.optim.epochs is None and photos:
        budget = DEFAULT_PHOTO_BUDGET
    started = time.perf_counter()
    if budget is None:
        if not photos:
            return None  # small images, a number of epochs: the recipe's own defaults
        plan = plan_tier((NO_BUDGET_TIER,), n_train, native, 1.0, {NO_BUDGET_TIER: 1.0})
        plan = Plan(plan.tier, plan.image_size, plan.train_size, plan.train_size_start, 0.0, 0.0,
                    "the photo default without a time budget")
    else:
        tiers = PHOTO_TIERS if photos else SMALL_TIERS
        speeds = measure_speeds(tiers, n_train, native, budget, device, processes)
        plan = plan_tier(tuple(speeds), n_train, native, budget, speeds)
    chosen = {"model": plan.tier.model, **plan.tier.options()}
    if plan.image_size is not None:
        chosen.update(image_size=plan.image_size, train_size=plan.train_size, train_size_start=plan.train_size_start)
        if settings.optim.crop_scale is None:  # photos: random-resized crops, or translate-and-flip
            chosen["crop_scale"] = CROP_SCALE if PHOTO_CROPS else 0.0
    if budget is not None and settings.optim.time_budget is None:
        chosen["time_budget"] = budget
    chosen = {k: v for k, v in chosen.items() if v is not None}
    return chosen, describe_plan(plan, budget, settings.optim.time_budget is None, n_train,
                                 time.perf_counter() - started)


def describe_plan(plan: Plan, budget: float | None, default_budget: bool, n_train: int, seconds: float) -> str:
    """The run's first line: what the policy chose and why."""
    sides = ""
    if plan.train_size:
        ramp = f"{plan.train_size_start}→{plan.train_size}" if plan.train_size_start else str(plan.train_size)
        sides = f", training at {ramp} px (progressive), evaluated at {plan.image_size} px (FixRes)"
    elif plan.image_size:
        sides = f" at {plan.image_size} px"
    if budget is None:
        return f"plan: {plan.tier.describe()}{sides}: {plan.reason}"
    given = " (the default for photos; --time-budget or --epochs sets another)" if default_budget else ""
    return (f"plan: {plan.tier.describe()}{sides}, about {plan.epochs:.0f} epochs of {n_train:,} images "
            f"in {budget:g} s{given}: {plan.reason} at the measured {plan.images_per_second:.0f} img/s "
            f"(probed in {seconds:.1f} s)")


# --- speeds ------------------------------------------------------------------------------------------
def measure_speeds(tiers: tuple[Tier, ...], n_train: int, native: int | None, budget: float,
                   device: torch.device, processes: int = 1) -> dict[Tier, float]:
    """Training images/s of each tier worth timing, cheapest first: a tier is timed unless its speed
    estimated from the last timed one (scaled by their MACs) affords under PROBE_CUTOFF of its min_epochs,
    and the walk stops at the first timed tier that affords too few. The untimed keep their estimates."""
    usable = usable_tiers(tiers, native)
    side = native or 32
    speeds: dict[Tier, float] = {}
    last, last_macs = None, None
    for tier in usable:
        macs = tier_macs(tier, side)
        need = min_epochs(tier)
        if last is not None:
            estimate = speeds[last] * last_macs / macs
            if afforded_epochs(tier, estimate, n_train, budget) < PROBE_CUTOFF * need:
                speeds[tier] = estimate
                continue
        speeds[tier] = processes * probe_speed(tier, side, device)
        last, last_macs = tier, macs
        if afforded_epochs(tier, speeds[tier], n_train, budget) < need:
            for rest in usable[usable.index(tier) + 1:]:
                speeds[rest] = speeds[tier] * macs / tier_macs(rest, side)
            break
    return speeds


def _build(tier: Tier, side: int, device: torch.device | str = "cpu") -> torch.nn.Module:
    from visionrecipe.models import create_model

    return create_model(tier.model, 10, in_channels=3, image_size=tier.size or side, **tier.options()).to(device)


def tier_macs(tier: Tier, side: int) -> int:
    """Multiply-adds of one image through the tier's net at its training side."""
    from visionrecipe.models.summary import module_layer_table

    size = tier.size or side
    return sum(row["macs"] for row in module_layer_table(_build(tier, side), (3, size, size))) or 1


def probe_speed(tier: Tier, side: int, device: torch.device) -> float:
    """Images/s of training steps (forward, backward, SGD) of the tier's net on random images."""
    model = _build(tier, side, device).to(memory_format=torch.channels_last)
    size = tier.size or side
    batch = PROBE_BATCH[tier.kind] * (4 if device.type == "cuda" else 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    step()
    # The fastest of the timed steps: anything else running on the machine only ever slows a step.
    return batch / min(timed() for _ in range(PROBE_STEPS))


# --- memory ------------------------------------------------------------------------------------------
def free_memory(device: torch.device) -> int:
    """Bytes free for training on the device: CUDA's free memory, else the RAM free (data/cache.py).
    VISIONRECIPE_FREE_MEMORY (bytes) overrides it: a test hook, to simulate a small machine."""
    override = os.environ.get("VISIONRECIPE_FREE_MEMORY")
    if override:
        return int(override)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    from visionrecipe.data.cache import free_memory as free_ram

    return free_ram()


def step_memory(cfg: Config, channels: int, classes: int, side: int) -> tuple[int, int]:
    """(bytes kept per training image, bytes of the weights with their gradients, momentum and EMA),
    estimated from the net's layer table at the training side."""
    from visionrecipe.models import create_model
    from visionrecipe.models.summary import module_layer_table

    model = create_model(cfg.model.model, classes, in_channels=channels, image_size=side, head=cfg.model.head,
                         **cfg.model.options())
    rows = module_layer_table(model, (channels, side, side))
    per_image = ACTIVATION_FACTOR * sum(math.prod(row["output_shape"]) for row in rows)
    return per_image, 4 * 4 * sum(p.numel() for p in model.parameters())


def fit_memory(cfg: Config, data, device: torch.device, processes: int = 1) -> tuple[Config, str | None]:
    """(cfg, None) when a training step fits the device's free memory; else cfg with --grad-accum
    raised so each micro-batch fits (the batch of an optimizer step stays), and the line that says so.
    A plan that cannot fit even one image at a time is a one-line error saying what to change."""
    _, channels, stored, _ = data.train.images.shape
    side = cfg.optim.train_size or stored
    per_image, weights = step_memory(cfg, channels, len(data.classes), side)
    free = free_memory(device)
    # copied to the GPU before training (with --cache disk it stays on the host and streams)
    resident = data.train.images.numel() if device.type == "cuda" and cfg.data.cache != "disk" else 0
    room = MEMORY_SHARE * free - weights - resident
    batch = cfg.optim.batch_size // processes
    accum = cfg.optim.grad_accum
    if batch // accum * per_image <= room:
        return cfg, None
    while batch % (accum * 2) == 0 and batch // accum * per_image > room:
        accum *= 2
    if room < per_image or batch // accum * per_image > room:
        raise VisionRecipeError(
            f"not enough memory: training {cfg.model.model} at {side} px keeps about {per_image / 2**20:.0f} MiB per "
            f"image (and {(weights + resident) / 2**30:.1f} GiB of weights and data), {free / 2**30:.1f} GiB is free "
            f"on {device.type}: lower --train-size or --image-size, or choose a smaller --model")
    line = (f"memory: a batch of {batch} at {side} px needs about {batch * per_image / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB is free: --grad-accum {accum} (micro-batches of {batch // accum}, "
            "the same optimizer steps)")
    return copy_config(cfg, grad_accum=accum), line
