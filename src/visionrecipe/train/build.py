"""Build a run: the one place that turns settings into data, model, normalisation, augmentation and loss.

    settings = Config.from_dict({"data": "digits"})
    data = load_data(resolve(settings, "cpu"))      # decoded at the size the settings ask for
    cfg = resolve(settings, "cpu", data)            # every value filled in: what config.yaml holds
    run = build_run(cfg, data, torch.device("cpu"))
    run.model, run.mean, run.std, run.loss_fn, run.meta  # run.augment(images, index, epoch, generator)
    another = run.new_model(width_scale=2.0)        # built the same way (the doctor's fresh models)
    order = run.epoch_order(epoch)                  # the train images of an epoch, in training order
    x, y = next(run.batches(64))                    # augmented batches drawn in that order (doctor, lr finder)

The trainer (train/loop.py), the doctor, tune and evaluate all build through here, so each of them
sees the batch size, loss and normalisation that training uses. `resolve` is called without the
data to learn how to load it (pretrained weights have their own decode size), then with it, on the
user's settings both times; nothing changes the resolved config afterwards: config.yaml is exactly
what ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from visionrecipe.config import Config
from visionrecipe.data import Dataset, channel_stats, load_dataset
from visionrecipe.models import create_model, get_spec
from visionrecipe.recipes import copy_config, resolve_crop_padding, resolve_device_defaults, resolve_recipe
from visionrecipe.system import warn
from visionrecipe.train.augment import SEED_STRIDE, BatchAugment, balanced_order, epoch_order
from visionrecipe.train.optim import small_data_batch
from visionrecipe.train.tasks import class_weights, init_prior_bias, task_loss

# Pixels whose patches set fastnet's whitening layer: 5,000 CIFAR images are plenty. Counted in pixels,
# not images: 5,000 photos at 160 px unfold into 6 GB of float patches (a run was killed for it).
WHITENING_PIXELS = 5000 * 32 * 32


def whitening_images(side: int) -> int:
    """How many images of `side` px set the whitening layer (at least 64)."""
    return max(64, WHITENING_PIXELS // (side * side))


# Nets whose layers are sized for one input side (seedcnn's flattened classifier): no progressive resizing.
FIXED_INPUT_FAMILIES = ("seedcnn",)


# --- the config, resolved once ---------------------------------------------------------------------
def resolve(cfg: Config, device_type: str, data: Dataset | None = None, processes: int = 1) -> Config:
    """The user's settings with every value a run needs filled in; a new Config, `cfg` is unchanged.

    Without `data`, what the data is loaded with (the decode size of pretrained weights); with it,
    the whole run: the recipe's values, the device's defaults (fastnet's width on a CPU), the crop
    padding at the data's image size and, when the recipe chose the batch, the batch shrunk so a
    small dataset still gets enough steps per epoch (`processes` share each batch). A run's
    config.yaml is resolved already: resolving it again changes nothing.
    """
    image_size = int(data.train.images.shape[2]) if data is not None else None  # picks photonet and crops
    resolved = resolve_device_defaults(resolve_recipe(cfg, image_size), device_type)
    spec = get_spec(resolved.model.model)  # an unknown model fails before any data is decoded
    settings = {}
    if resolved.model.weights and resolved.data.image_size is None:
        from visionrecipe.train.finetune import pretrained_image_size

        # Decode at the size the weights were trained at (also checks they exist, before decoding).
        settings["image_size"] = pretrained_image_size(resolved, spec)
    if data is not None:
        stored = int(data.train.images.shape[2])
        if spec.family in FIXED_INPUT_FAMILIES and resolved.optim.train_size not in (None, stored):
            # auto's plan gives every trial the policy's sides; a fixed-input net trains at the stored side
            warn(f"{resolved.model.model} takes {stored} px inputs only: training at {stored} px, not "
                 f"{resolved.optim.train_size} (--train-size)")
            settings.update(train_size=None, train_size_start=None)
        settings["crop_padding"] = resolve_crop_padding(resolved, stored)
        settings["cache"] = data.cache  # --cache auto: what loading chose (memory or disk)
        if cfg.optim.batch_size is None:  # the recipe's batch; a --batch-size is taken as given
            settings["batch_size"] = small_data_batch(resolved.optim.batch_size, len(data.train), processes)
    return copy_config(resolved, **settings) if settings else resolved


# --- the pieces ------------------------------------------------------------------------------------
def load_data(cfg: Config, progress: bool = False, device: torch.device | None = None) -> Dataset:
    """The dataset `cfg.data` names, split with the run's seed (decoded once, then cached); where
    it lives (--cache) is decided on the way in, with `device`'s free memory when it is a GPU."""
    device_free = torch.cuda.mem_get_info(device)[0] if device is not None and device.type == "cuda" else None
    return load_dataset(cfg.data.data, data_dir=cfg.data.data_dir, image_size=cfg.data.image_size,
                        val_fraction=cfg.data.val_fraction, seed=cfg.run.seed, strict=cfg.data.strict,
                        progress=progress, workers=cfg.data.workers,
                        allow_outside_paths=cfg.data.allow_outside_paths, cache=cfg.data.cache,
                        device_free=device_free)


def make_model(cfg: Config, data: Dataset, device: torch.device, width_scale: float = 1.0,
               resume_dir=None) -> tuple[nn.Module, dict]:
    """(model on the device, preprocessing): the registry's model with the run's options and the
    multilabel prior bias, loaded with --weights, whose mean/std (and source) come back as a dict."""
    spec = get_spec(cfg.model.model)
    options = cfg.model.options()
    if width_scale != 1.0:
        options["width"] = options.get("width", 1.0) * width_scale
    _, channels, height, _ = data.train.images.shape
    model = create_model(cfg.model.model, len(data.classes), in_channels=channels, image_size=height,
                         head=cfg.model.head, **options)
    if cfg.model.task == "multilabel":
        init_prior_bias(model, spec.head_path, data.train.labels)
    preprocessing = {}
    if cfg.model.weights:
        from visionrecipe.train.finetune import load_initial_weights

        preprocessing = load_initial_weights(model, cfg, spec, len(data.classes), classes=list(data.classes),
                                             resume_dir=resume_dir) or {}
    return model.to(device), preprocessing


@dataclass
class BuiltRun:
    """What a run trains: made by build_run, read by the trainer and the doctor."""

    cfg: Config
    data: Dataset
    device: torch.device
    model: nn.Module  # on the device, initial weights loaded, whitening set
    # The train split as uint8, on the device (50,000 CIFAR images are 150 MB); with --cache disk
    # where the data keeps it (MappedImages, or RAM), read through gather or train/feed.py.
    images: torch.Tensor
    labels: torch.Tensor
    data_stats: tuple[list[float], list[float]]  # the train split's own mean/std
    mean: list[float]  # the normalisation: the data's, or the pretrained weights' for a fine-tune
    std: list[float]
    augment: BatchAugment
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # the task's: (float logits, targets)
    meta: dict  # model.json's fields, less the epoch and its score
    head_path: str

    def new_model(self, width_scale: float = 1.0) -> nn.Module:
        """Another model built as this run's was (the RNG decides its initial weights)."""
        return self.whiten(make_model(self.cfg, self.data, self.device, width_scale)[0])

    def whiten(self, model: nn.Module) -> nn.Module:
        """fastnet's whitening layer set from the normalised train images (--whiten)."""
        if self.cfg.optim.whiten:
            from visionrecipe.models.fastnet import init_whitening

            count = whitening_images(int(self.images.shape[-1]))
            init_whitening(model, self.augment.normalise(self.gather(slice(0, count))).float())
        return model

    def gather(self, index) -> torch.Tensor:
        """Train images `index` as uint8 on the device, whichever --cache holds them."""
        return self.images[index].to(self.device)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Indices of the train images in the order epoch `epoch` trains on them, a pure function of
        (seed, epoch): every image once, shuffled, or with --sampler balanced each class equally often."""
        if self.cfg.optim.sampler == "balanced":
            return balanced_order(self.data.train.labels, self.cfg.run.seed, epoch, self.device)
        return epoch_order(len(self.labels), self.cfg.run.seed, epoch, self.device)

    def batches(self, batch_size: int):
        """Endless (augmented images, labels) batches drawn as the trainer draws them: the epoch's
        order, then BatchAugment with the generator seeded by the step (one process's view)."""
        seed, n = self.cfg.run.seed, len(self.labels)
        generator = torch.Generator(device=self.device)
        step, epoch = 0, 0
        while True:
            order = self.epoch_order(epoch)
            for position in range(max(1, n // batch_size)):
                index = order[position * batch_size:(position + 1) * batch_size]
                generator.manual_seed(seed * SEED_STRIDE + step)
                yield (self.augment(self.gather(index), index, epoch, generator, size=self.cfg.optim.train_size),
                       self.labels[index])
                step += 1
            epoch += 1


def build_run(cfg: Config, data: Dataset, device: torch.device, resume_dir=None) -> BuiltRun:
    """Model, normalisation, augmentation and loss for a resolved `cfg` (see resolve).

    The normalisation is the train split's mean/std, or the pretrained weights' when fine-tuning
    (from the source, or on resume from `resume_dir`'s last.json: the source may be gone)."""
    train = data.train
    stats = channel_stats(train.images)
    model, preprocessing = make_model(cfg, data, device, resume_dir=resume_dir)
    spec = get_spec(cfg.model.model)
    meta = {
        "architecture": cfg.model.model, "model_options": cfg.model.options(), "head": cfg.model.head,
        "family": spec.family, "classes": list(data.classes), "input_size": list(train.images.shape[1:]),
        # The eval policy (data/pil.py): training stored every image this way; predict, export and serve decode so.
        "preprocess": {"resize": int(train.images.shape[2]), "crop": int(train.images.shape[2])},
        "mean": stats[0], "std": stats[1], "tta": bool(cfg.optim.tta), "task": cfg.model.task,
        "data": cfg.data.data, "threshold": cfg.model.threshold, **preprocessing,
    }
    # --cache disk: the split stays where the data keeps it, and train/feed.py reads it batch by batch.
    images = train.images if cfg.data.cache == "disk" else train.images.to(device)
    augment = BatchAugment(meta["mean"], meta["std"], crop_padding=cfg.optim.crop_padding, flip=cfg.optim.flip,
                           alternate_flip=cfg.optim.alternate_flip, n_train=len(train.labels), seed=cfg.run.seed,
                           device=device, crop_scale=cfg.optim.crop_scale, crop_ratio=cfg.optim.crop_ratio,
                           auto_augment=cfg.optim.auto_augment or "none", mixup=cfg.optim.mixup,
                           cutmix=cfg.optim.cutmix, mix_prob=cfg.optim.mix_prob, num_classes=len(data.classes))
    weight = class_weights(train.labels, len(data.classes)).to(device) if cfg.optim.class_weights == "auto" else None
    built = BuiltRun(cfg, data, device, model, images, train.labels.to(device), stats, meta["mean"], meta["std"],
                     augment, task_loss(cfg, weight), meta, spec.head_path)
    built.whiten(model)
    return built
