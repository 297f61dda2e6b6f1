"""The recipes as data: the values a run takes for every setting the user left unset.

    cfg = resolve_recipe(Config.from_dict({"data": "digits"}))   # fast: fastnet, SGD-Nesterov, ...
    RECIPES["standard"].lr, RECIPES["fast"].lr_per_1024          # 0.001, True
    resolve_device_defaults(cfg, "cpu").model.width              # 0.5: fastnet is halved on a CPU
    resolve_crop_padding(cfg, image_size=8)                      # the recipe's 32-px padding, scaled

"fast" follows the CIFAR-10 speed-record line of work (airbench): SGD-Nesterov with a lr per 1024
examples, label smoothing, EMA, alternating flips, translate by 2 px, patch whitening and mirror
TTA. "standard" is a plain, robust default for any registry model. Each function returns a new
Config; the one it is given is left as it was. The settings that depend on the data and the
device a run landed on are resolved in train/build.py, once, before anything runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from visionrecipe.config import FIELDS, MODEL_OPTIONS, Config, apply_overrides


@dataclass(frozen=True)
class Recipe:
    """Every field is the value of the setting of the same name (see config.py for units)."""

    epochs: int
    batch_size: int
    optimizer: str
    # Peak learning rate: per 1024 examples when lr_per_1024 (scaled by batch_size / 1024 in
    # build_optimizer, as airbench states its hyperparameters), per batch otherwise.
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    bias_lr_mult: float
    label_smoothing: float
    schedule: str
    warmup_epochs: float | None
    ema: bool
    alternate_flip: bool
    whiten: bool
    tta: bool
    model: str | None = None  # None: seedcnn (the recipe is for whichever --model is given)
    auto_augment: str = "none"  # TrivialAugment off by both recipes; the budget policy turns it on for long runs
    # Precise BatchNorm statistics for the evaluated model (see "precise BN" below); standard: not measured, off.
    recalibrate_bn: int = 0
    # Not settings: how the recipe reads its lr, and its translate padding at 32×32 pixels, scaled
    # to the image size (4 px would wipe out an 8×8 digit).
    lr_per_1024: bool = False
    crop_padding_at_32: int = 4

    def settings(self) -> dict:
        """The values this recipe gives to settings (the fields named like a config field)."""
        return {k: v for k, v in asdict(self).items() if k in FIELDS}


RECIPES: dict[str, Recipe] = {
    # airbench states lr 11.5 per 1024 examples on a summed loss with momentum 0.85, i.e.
    # 11.5 / (1 + 1/0.15) = 1.5 on the mean loss at batch 1024; its decoupled weight decay 0.0153
    # becomes 0.0153 / 11.5 here.
    "fast": Recipe(model="fastnet", epochs=10, batch_size=512, optimizer="sgd", lr=1.5, momentum=0.85, nesterov=True,
                   weight_decay=1.33e-3, bias_lr_mult=64.0, label_smoothing=0.2, schedule="triangle",
                   warmup_epochs=None, ema=True, alternate_flip=True, whiten=True, tta=True,
                   recalibrate_bn=1024, lr_per_1024=True, crop_padding_at_32=2),
    "standard": Recipe(epochs=10, batch_size=64, optimizer="adamw", lr=1e-3, momentum=0.9, nesterov=False,
                       weight_decay=0.05, bias_lr_mult=1.0, label_smoothing=0.1, schedule="cosine",
                       warmup_epochs=0.5, ema=False, alternate_flip=False, whiten=False, tta=False),
}
assert all(f.name in FIELDS for f in fields(Recipe) if f.name not in ("lr_per_1024", "crop_padding_at_32"))

# Why the fast recipe re-estimates BatchNorm statistics before it evaluates ("precise BN", Wu & Johnson
# 2021, and FixRes's fix for a test side above the training one): its EMA model averages the weights
# but carries the live model's BatchNorm buffers, and with BN momentum 0.4 those describe the last two
# augmented batches of other weights, at the training side. Measured on saved runs (BENCHMARKS.md,
# "BatchNorm statistics"): 1,024 train images, evaluated as test images are, lift CIFAR-10 at 600 s
# from 87.81% to 89.04% and Imagenette at 900 s from 86.17% to 88.54%; 512 give most of it.


@dataclass(frozen=True)
class SizeRule:
    """What the default recipe does from an image size up (the first rule whose min_size the data's
    size reaches wins): the model when --model is not given, and the crops when --crop-scale is not."""

    min_size: int  # the stored image's side, in pixels
    model: str
    crop_scale: float  # random-resized crops' smallest area share; 0: translate by crop_padding instead


# Stored side from which photos train on random-resized crops; below it, translate-and-flip (CIFAR's
# 32 px). Imagenette on 2 cores, 300 s (BENCHMARKS.md, "Photos"): fastnet beat photonet at every side
# tried (82.6% at 64 px against photonet's 79.2% at 64 and 72.8% at 96→128), so fastnet is the net.
PHOTO_MIN_SIZE = 96
CROP_SCALE = 0.35  # torchvision's RandomResizedCrop uses 0.08; fast.ai's Imagenette runs 0.35

SIZE_RULES = (
    SizeRule(min_size=PHOTO_MIN_SIZE, model="fastnet", crop_scale=CROP_SCALE),
    SizeRule(min_size=0, model="fastnet", crop_scale=0.0),
)

# The fast recipe's lr (per 1024 images) and BatchNorm-bias multiplier for nets whose own differ, when
# the user set neither. photonet diverged at the recipe's lr 1.5 with BatchNorm biases at ×64
# (Imagenette 64 px, epoch 9: 58% → 9%); lr 0.6 with biases at ×1 trains steadily. It takes crops at any side.
FAST_RATES = {"photonet": {"lr": 0.6, "bias_lr_mult": 1.0}}
CROPPED_NETS = ("photonet",)

# The nets the fast recipe is tuned for: given by --model (or chosen by the policy), they keep it.
OWN_NETS = ("fastnet", "photonet")


def size_rule(image_size: int | None) -> SizeRule:
    """The rule for images of `image_size` px (None: not known yet, the small-image rule)."""
    return next(rule for rule in SIZE_RULES if (image_size or 0) >= rule.min_size)


# On a CPU the fast recipe halves fastnet's width (a quarter of the FLOPs): measured on 2 cores,
# 4× the epochs in the same minutes buys more accuracy than the wider net (BENCHMARKS.md).
CPU_FASTNET_WIDTH = 0.5


# --- the budget policy: what a --time-budget buys, as data (train/plan.py measures and applies it) ---
@dataclass(frozen=True)
class Tier:
    """One choice the budget policy can make: a net, its size options and the final training side."""

    model: str
    size: int | None = None  # final training side in px; None: the data's own (the small-image path)
    width: float | None = None
    depth: int | None = None
    stem: int | None = None  # fastnet's first-layer stride (2: the side halves before the first block)

    @property
    def kind(self) -> str:
        """"small" (trains at the data's own side) or "photo": the key of MIN_EPOCHS, RUN_EFFICIENCY, the probe's batch."""
        return "small" if self.size is None else "photo"

    def options(self) -> dict:
        """The net's registry options (create_model's keywords, the settings of the same names)."""
        return {k: getattr(self, k) for k in MODEL_OPTIONS if getattr(self, k) is not None}

    def describe(self) -> str:
        options = [f"{k} {v:g}" for k, v in self.options().items()]
        return self.model + (f" ({', '.join(options)})" if options else "")


# Cheapest first; each costs more per image than the one before (img/s on 2 cores, one train step on
# random data, batch 256 at 32 px / 128 for photos: BENCHMARKS.md, "Budget policy").
SMALL_TIERS = (  # fastnet at the data's side: width is the lever (1,272 / 674 / 411 img/s at 32 px)
    Tier("fastnet", width=0.5), Tier("fastnet", width=0.75), Tier("fastnet", width=1.0),
)
# Photos: fastnet (width 0.5) at a growing training side, then wider (a GPU affords those). Measured on
# Imagenette in 300 s on 2 cores, fastnet at 64 px (82.6%) beat photonet at every side and schedule
# tried (64 px: 79.2%; 96→128 px progressive: 72.8%), so photonet stays a model to choose, not a tier.
PHOTO_TIERS = tuple(Tier("fastnet", side, width=0.5) for side in (64, 80, 96, 112, 128, 160, 192, 224)) + (
    Tier("fastnet", 160, width=1.0), Tier("fastnet", 224, width=1.0),
)
# The policy takes the costliest tier that still affords this many epochs in the budget. Small images
# (fitted on CIFAR-10 at 600 s): width 0.75 in 8 epochs (87.3%) beat width 0.5 in 17 (86.9%), and width
# 0.5 is near its ceiling by 8 (86.3% at 300 s). Photos need many more (Imagenette, 2 cores, BatchNorm
# recalibrated): 64 px in 40 epochs (900 s) 88.54%, against 112 px in 13 (900 s) 86.55% and 64 px in 16
# (300 s) 86.88%, so a larger side is worth its cost only once it still affords about 26 epochs.
MIN_EPOCHS = {"small": 8.0, "photo": 26.0}


def min_epochs(tier: Tier) -> float:
    """The epochs a tier must afford to be chosen (MIN_EPOCHS of its kind of data)."""
    return MIN_EPOCHS[tier.kind]


# A whole run's images/s as a share of the probe's (augmentation, EMA, validation with TTA and BatchNorm
# recalibration, the recipe's batch of 512 against the probe's 64): measured, fastnet 1,253 of 1,272 on
# CIFAR-10; on Imagenette, epochs run against epochs a share of 1.0 planned: 39 of 47 (48→64 px, 900 s),
# 27 of 34 (64→96 px, 1,800 s), 12 of 14 (mixed sizes, 300 s).
RUN_EFFICIENCY = {"small": 0.95, "photo": 0.8}
# Photos train on random-resized crops (progressive resizing, FixRes) when this holds, else on
# translate-and-flip at the stored side: inet300_D in BENCHMARKS.md decided it.
PHOTO_CROPS = True
# Progressive resizing (photos): the training side starts at PROGRESSIVE_START × the final side and
# grows linearly to it over the first PROGRESSIVE_RAMP of the steps (multiples of SIDE_STEP px);
# evaluation is at FIXRES × the final side ("FixRes": random-resized crops zoom in, so objects look
# bigger in training than in a whole centred image of the same side).
PROGRESSIVE_START = 0.75
PROGRESSIVE_RAMP = 0.75
SIDE_STEP = 16
FIXRES = 1.15
# `train --data PHOTOS` with neither --epochs nor --time-budget trains this long (seconds): minutes on
# a laptop-class CPU, whatever the folder's size.
DEFAULT_PHOTO_BUDGET = 240.0


def photo_data(side: int | None) -> bool:
    """Whether images of this stored (or native) side take the photo path (crops, PHOTO_TIERS)."""
    return size_rule(side).crop_scale > 0


def training_side(final: int, start: int, step: int, total_steps: int) -> int:
    """The training side at `step` of `total_steps`: `start` growing linearly to `final` over the first
    PROGRESSIVE_RAMP of the steps, in multiples of SIDE_STEP (a handful of shapes, each compiled once)."""
    if start >= final or total_steps <= 0:
        return final
    progress = min(1.0, step / max(1.0, PROGRESSIVE_RAMP * total_steps))
    side = start + (final - start) * progress
    return min(final, max(start, int(side // SIDE_STEP) * SIDE_STEP))


def progressive_costs(final: int, start: int, total_steps: int):
    """Every step's cost relative to a step at `final` px, (side / final)², for a run of `total_steps`
    (numpy, vectorised: training_side at each step; train/budget.py plans a budget with it)."""
    import numpy as np

    steps = np.arange(total_steps, dtype=np.float64)
    if start >= final or total_steps <= 0:
        return np.ones(total_steps)
    progress = np.minimum(1.0, steps / max(1.0, PROGRESSIVE_RAMP * total_steps))
    sides = np.floor((start + (final - start) * progress) // SIDE_STEP) * SIDE_STEP
    sides = np.minimum(final, np.maximum(start, sides))
    return (sides / final) ** 2


def progressive_start(final: int) -> int:
    """The first training side of a progressive run that ends at `final` px."""
    return max(SIDE_STEP, int(PROGRESSIVE_START * final // SIDE_STEP) * SIDE_STEP)


def eval_side(final: int, native: int | None) -> int:
    """The evaluation (and storage) side for a final training side: FIXRES above it, never above
    the images' own side."""
    side = int(round(FIXRES * final / 8)) * 8
    return min(side, native) if native else side


def progressive_cost(final: int, start: int, samples: int = 1000) -> float:
    """A progressive run's mean cost per image as a share of training at `final` throughout
    (cost ∝ side²)."""
    return float(progressive_costs(final, start, samples).mean())


def usable_tiers(tiers: tuple[Tier, ...], native: int | None) -> list[Tier]:
    """The tiers that do not train above the images' own side (at least the cheapest)."""
    return [t for t in tiers if t.size is None or native is None or t.size <= native] or [tiers[0]]


def run_speed(tier: Tier, probe_speed: float) -> float:
    """A whole run's images/s from a probe's at the final side: RUN_EFFICIENCY, and the cheaper
    early steps of progressive resizing."""
    cost = progressive_cost(tier.size, progressive_start(tier.size)) if tier.size and PHOTO_CROPS else 1.0
    return probe_speed * RUN_EFFICIENCY[tier.kind] / cost


def afforded_epochs(tier: Tier, probe_speed: float, n_train: int, budget: float) -> float:
    """Epochs of n_train images that `budget` seconds buy at the tier's probed speed."""
    return budget * run_speed(tier, probe_speed) / max(1, n_train)


@dataclass(frozen=True)
class Plan:
    """What the budget policy chose, and from what (plan_tier's output)."""

    tier: Tier
    image_size: int | None  # stored and evaluated side (None: the data's own)
    train_size: int | None  # final training side (None: the stored side)
    train_size_start: int | None  # progressive resizing's first side (None: no ramp)
    epochs: float  # the epochs the budget affords at the tier's speed
    images_per_second: float  # the tier's expected speed for a whole run
    reason: str


def plan_tier(tiers: tuple[Tier, ...], n_train: int, native: int | None, budget: float,
              speeds: dict[Tier, float]) -> Plan:
    """The costliest tier that affords its min_epochs in `budget` seconds, else the cheapest: a pure
    function of the data (count, native side), the measured `speeds` (training images/s of one probe
    step per tier, at the tier's final side) and the budget, so the same inputs give the same plan.
    Photo tiers above the images' own side are skipped."""
    usable = usable_tiers(tiers, native)
    chosen = usable[0]
    for tier in usable:
        if afforded_epochs(tier, speeds[tier], n_train, budget) >= min_epochs(tier):
            chosen = tier
    epochs = afforded_epochs(chosen, speeds[chosen], n_train, budget)
    speed = run_speed(chosen, speeds[chosen])
    need = min_epochs(chosen)
    why = (f"the costliest of {len(usable)} choices that affords {need:g} epochs" if epochs >= need
           else f"the cheapest choice; even it affords under {need:g} epochs")
    if chosen.size is None:
        return Plan(chosen, None, None, None, epochs, speed, why)
    if not PHOTO_CROPS:  # translate-and-flip at the stored side: nothing zooms, so no FixRes, no ramp
        return Plan(chosen, chosen.size, None, None, epochs, speed, why)
    return Plan(chosen, eval_side(chosen.size, native), chosen.size, progressive_start(chosen.size), epochs, speed, why)


def copy_config(cfg: Config, **settings) -> Config:
    """A new Config: `cfg` with `settings` (flat names) changed; `cfg` itself is untouched."""
    return apply_overrides(Config.from_dict(cfg.to_dict()), settings)


# Transfer first: `--weights imagenet` without --model fine-tunes this backbone (published weights,
# 11 M parameters: fine-tunes on a CPU); the head trains alone for TRANSFER_HEAD_EPOCHS, then the whole
# net with the backbone's rate × TRANSFER_BACKBONE_LR (discriminative rates, as fastai's fine_tune).
# Weights from a run or a file of the user's (often the same domain) are fine-tuned whole, at one rate.
TRANSFER_MODEL = "resnet18"
TRANSFER_HEAD_EPOCHS = 1
TRANSFER_BACKBONE_LR = 0.1


def resolve_recipe(cfg: Config, image_size: int | None = None) -> Config:
    """Fill every None field from the recipe; returns a new Config, the input is unchanged.
    `image_size` (the data's, once known) picks the fast recipe's model and crops (SIZE_RULES)."""
    cfg = copy_config(cfg)
    if cfg.model.weights == "imagenet" and cfg.model.model is None:
        cfg.model.model = TRANSFER_MODEL
    if cfg.optim.recipe is None:
        cfg.optim.recipe = "fast" if cfg.model.model in (None, *OWN_NETS) else "standard"
    rule = size_rule(image_size)
    if cfg.optim.recipe == "fast" and cfg.model.model is None:
        cfg.model.model = rule.model
    if cfg.optim.crop_scale is None:
        cfg.optim.crop_scale = CROP_SCALE if cfg.model.model in CROPPED_NETS else rule.crop_scale
    if cfg.optim.recipe == "fast":
        for name, value in FAST_RATES.get(cfg.model.model, {}).items():
            if getattr(cfg.optim, name) is None:
                setattr(cfg.optim, name, value)
    for name, value in RECIPES[cfg.optim.recipe].settings().items():
        section, _ = FIELDS[name]
        if getattr(getattr(cfg, section), name) is None:
            setattr(getattr(cfg, section), name, value)
    if cfg.model.model is None:
        cfg.model.model = "seedcnn" if cfg.optim.recipe == "standard" else "fastnet"
    if cfg.optim.flip is None:
        cfg.optim.flip = cfg.data.data != "digits"
    if not cfg.optim.flip:
        cfg.optim.alternate_flip = cfg.optim.tta = False
    if cfg.optim.warmup_epochs is None:
        cfg.optim.warmup_epochs = 0.0
    if cfg.optim.whiten and not cfg.model.model == "fastnet":
        cfg.optim.whiten = False
    if cfg.model.weights:
        cfg.optim.whiten = False  # the loaded whitening layer is what the loaded blocks expect
    published = cfg.model.weights == "imagenet"  # a run or file of the user's own is fine-tuned whole
    if published and not cfg.model.freeze_backbone and cfg.model.unfreeze_after is None:
        cfg.model.unfreeze_after = TRANSFER_HEAD_EPOCHS
    if cfg.model.backbone_lr_mult is None:
        cfg.model.backbone_lr_mult = TRANSFER_BACKBONE_LR if published else 1.0
    if cfg.model.unfreeze_after == 0:
        cfg.model.unfreeze_after = None  # never frozen
    elif cfg.model.unfreeze_after is not None:
        cfg.model.freeze_backbone = True  # "unfreeze after N epochs" implies frozen until then
    return cfg


def resolve_device_defaults(cfg: Config, device_type: str) -> Config:
    """Recipe values that depend on the device the run landed on; returns a new Config."""
    if cfg.run.precision is None:  # bf16 autocast pays on CUDA; elsewhere fp32 unless asked (BENCHMARKS.md)
        cfg = copy_config(cfg, precision="bf16" if device_type == "cuda" else "fp32")
    if (cfg.optim.recipe == "fast" and cfg.model.model == "fastnet" and cfg.model.width is None
            and not cfg.model.weights and device_type == "cpu"):
        return copy_config(cfg, width=CPU_FASTNET_WIDTH)
    return cfg


def resolve_crop_padding(cfg: Config, image_size: int) -> int:
    """--crop-padding, or the recipe's padding at 32×32 scaled to the image size (at least 1 px);
    0 under random-resized crops, which move the image already."""
    if cfg.optim.crop_padding is not None:
        return cfg.optim.crop_padding
    if cfg.optim.crop_scale:
        return 0
    return max(1, round(RECIPES[cfg.optim.recipe].crop_padding_at_32 * image_size / 32))


def lr_per_1024(cfg: Config) -> bool:
    """Whether --lr is per 1024 examples (the fast recipe) rather than per batch."""
    return RECIPES[cfg.optim.recipe].lr_per_1024


def lr_unit(cfg: Config) -> str:
    """The unit of --lr, as every lr shown to the user is labelled: "per 1024 images" or "per batch"."""
    return "per 1024 images" if lr_per_1024(cfg) else "per batch"
