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

from visionrecipe.config import FIELDS, Config, apply_overrides


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
                   lr_per_1024=True, crop_padding_at_32=2),
    "standard": Recipe(epochs=10, batch_size=64, optimizer="adamw", lr=1e-3, momentum=0.9, nesterov=False,
                       weight_decay=0.05, bias_lr_mult=1.0, label_smoothing=0.1, schedule="cosine",
                       warmup_epochs=0.5, ema=False, alternate_flip=False, whiten=False, tta=False),
}
assert all(f.name in FIELDS for f in fields(Recipe) if f.name not in ("lr_per_1024", "crop_padding_at_32"))


@dataclass(frozen=True)
class SizeRule:
    """What the default recipe does from an image size up (the first rule whose min_size the data's
    size reaches wins): the model when --model is not given, and the crops when --crop-scale is not."""

    min_size: int  # the stored image's side, in pixels
    model: str
    crop_scale: float  # random-resized crops' smallest area share; 0: translate by crop_padding instead
    # The fast recipe's lr (per 1024 images) and BatchNorm-bias multiplier for this rule's model, when
    # they differ from the recipe's (None: the recipe's). Only when the rule's model is the one trained.
    lr: float | None = None
    bias_lr_mult: float | None = None


# Stored side from which the default recipe trains photonet with crops. Fitted to Imagenette at 300 s on
# 2 cores (BENCHMARKS.md, "Photos"): at 64 px fastnet wins (82.6% against 79.2%), at 128 px photonet does
# (60.1% against fastnet's 31 img/s and one epoch); 96 lies between the two measured sizes.
PHOTO_MIN_SIZE = 96

# Photos need an early-downsampling net and random-resized crops; fastnet's three pooling stages and
# 2-px translations suit CIFAR's 32 px, and its cost grows with the square of the side.
SIZE_RULES = (
    # photonet diverged at the fast recipe's lr 1.5 with BatchNorm biases at ×64 (Imagenette 64 px, epoch 9:
    # 58% → 9%); lr 0.6 with biases at ×1 trains steadily (BENCHMARKS.md, "Photos").
    SizeRule(min_size=PHOTO_MIN_SIZE, model="photonet", crop_scale=0.35, lr=0.6, bias_lr_mult=1.0),
    SizeRule(min_size=0, model="fastnet", crop_scale=0.0),
)


def size_rule(image_size: int | None) -> SizeRule:
    """The rule for images of `image_size` px (None: not known yet, the small-image rule)."""
    return next(rule for rule in SIZE_RULES if (image_size or 0) >= rule.min_size)


# On a CPU the fast recipe halves fastnet's width (a quarter of the FLOPs): measured on 2 cores,
# 4× the epochs in the same minutes buys more accuracy than the wider net (BENCHMARKS.md).
CPU_FASTNET_WIDTH = 0.5


def copy_config(cfg: Config, **settings) -> Config:
    """A new Config: `cfg` with `settings` (flat names) changed; `cfg` itself is untouched."""
    return apply_overrides(Config.from_dict(cfg.to_dict()), settings)


def resolve_recipe(cfg: Config, image_size: int | None = None) -> Config:
    """Fill every None field from the recipe; returns a new Config, the input is unchanged.
    `image_size` (the data's, once known) picks the fast recipe's model and crops (SIZE_RULES)."""
    cfg = copy_config(cfg)
    if cfg.optim.recipe is None:
        cfg.optim.recipe = "fast" if cfg.model.model in (None, "fastnet") else "standard"
    rule = size_rule(image_size)
    if cfg.optim.recipe == "fast" and cfg.model.model is None:
        cfg.model.model = rule.model
    if cfg.optim.crop_scale is None:
        cfg.optim.crop_scale = rule.crop_scale
    if cfg.optim.recipe == "fast" and cfg.model.model == rule.model:
        for name in ("lr", "bias_lr_mult"):
            if getattr(cfg.optim, name) is None and getattr(rule, name) is not None:
                setattr(cfg.optim, name, getattr(rule, name))
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
    if cfg.model.unfreeze_after is not None:
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
