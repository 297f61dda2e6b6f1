"""The training loop: one readable function from data to a finished run directory.

    run = train(Config.from_dict({"data": "digits", "epochs": 5}))
    run = train(data="digits", model="seedcnn", epochs=5)      # same, keyword settings
    run.evaluate()["accuracy"]

What happens, in order: resolve the recipe, load the data as uint8 tensors (decoded once, cached),
build the model, then loop over steps. Each step gathers a batch from the device-resident data,
augments it on the device, runs forward/backward under bf16 autocast on CUDA, and steps the
optimizer with the learning rate of the schedule at that step. Each epoch ends with validation,
`metrics.jsonl`, the best and last models, and `state.pt` for an exact resume.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .augment import BatchAugment
from .config import LR_PER_1024, Config, apply_overrides, resolve_crop_padding, resolve_recipe, save_config
from .data import channel_stats, load_dataset
from .errors import VisionRecipeError
from .evaluate import compute_metrics, predict_logits
from .models import create_model, get_spec
from .run import Run, ensure_room, prepare_run_dir
from .schedule import lr_factor
from .system import is_main_process, log, select_device, set_threads, world


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM: state saved; `exit_code` is 130 or 143."""

    def __init__(self, exit_code: int, run_dir: Path):
        super().__init__(f"interrupted; resume with: visionrecipe train --resume {run_dir}")
        self.exit_code = exit_code


class TrainingStopped(VisionRecipeError):
    """Training cannot continue (a NaN loss); the last good checkpoint is kept."""

    exit_code = 1


def train(config: Config | None = None, **settings) -> Run:
    cfg = apply_overrides(Config.from_dict(config.to_dict()) if config else Config(), settings)
    return Trainer(cfg).fit()


def resume(run_dir: str | Path, **settings) -> Run:
    """Continue a run from its `state.pt` exactly where it stopped."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.yaml").is_file():
        raise VisionRecipeError(f"cannot resume {run_dir}: no config.yaml (not a run directory)")
    from .config import load_config

    cfg = load_config(run_dir / "config.yaml")
    allowed = {"progress", "device", "threads", "report", "checkpoint_every", "tensorboard"}
    for name, value in settings.items():
        if name not in allowed and value != cfg.flat().get(name):
            raise VisionRecipeError(
                f"cannot change {name} on resume (the run was planned with {cfg.flat().get(name)!r}); "
                "start a new run, or use --weights to fine-tune from it")
    apply_overrides(cfg, settings)
    return Trainer(cfg, resume_dir=run_dir).fit()


class Trainer:
    def __init__(self, cfg: Config, resume_dir: Path | None = None):
        self.cfg = resolve_recipe(cfg)
        self.resume_dir = resume_dir
        self.stop_signal: int | None = None

    # --- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.world = world()
        self.device = select_device(cfg.run.device, local_rank=self.world.local_rank)
        set_threads(cfg.run.threads, self.device)
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(cfg.run.seed)
        spec = get_spec(cfg.model.model)  # unknown model: fail before decoding any data

        self.run_dir = prepare_run_dir(cfg, resume=self.resume_dir is not None)
        self.data = load_dataset(cfg.data.data, data_dir=cfg.data.data_dir, image_size=cfg.data.image_size,
                                 val_fraction=cfg.data.val_fraction, seed=cfg.run.seed,
                                 strict=cfg.data.strict, progress=cfg.run.progress and is_main_process(),
                                 workers=cfg.data.workers)
        if self.data.skipped:
            log(f"skipped {len(self.data.skipped)} unreadable image(s); first: {self.data.skipped[0][0]}")
        train_split = self.data.train
        _, channels, height, width = train_split.images.shape
        self.classes = self.data.classes
        self.mean, self.std = channel_stats(train_split.images)
        options = {k: v for k, v in (("width", cfg.model.width), ("depth", cfg.model.depth)) if v is not None}
        self.model = create_model(cfg.model.model, len(self.classes), in_channels=channels,
                                  image_size=height, head=cfg.model.head, **options)
        self.meta = {
            "architecture": cfg.model.model, "model_options": options, "head": cfg.model.head,
            "family": spec.family, "classes": list(self.classes), "input_size": [channels, height, width],
            "mean": self.mean, "std": self.std, "tta": bool(cfg.optim.tta), "task": cfg.model.task,
            "data": cfg.data.data,
        }
        if cfg.model.weights:
            from .finetune import load_initial_weights

            preprocessing = load_initial_weights(self.model, cfg, spec, len(self.classes))
            self.meta.update(preprocessing or {})
            self.mean, self.std = self.meta["mean"], self.meta["std"]
        self.head_path = spec.head_path
        if is_main_process():
            # best + last model, and the state with optimizer moments: about 4 copies of the weights
            ensure_room(self.run_dir, 4 * 4 * sum(p.numel() for p in self.model.parameters()))
        self.model.to(self.device)
        if cfg.run.channels_last and self.device.type != "mps":
            self.model.to(memory_format=torch.channels_last)

        # The data lives on the device as uint8: 50,000 CIFAR images are 150 MB.
        self.train_images = train_split.images.to(self.device)
        self.train_labels = train_split.labels.to(self.device)
        cfg.optim.crop_padding = resolve_crop_padding(cfg, height)
        self.augment = BatchAugment(self.mean, self.std, crop_padding=cfg.optim.crop_padding,
                                    flip=cfg.optim.flip, alternate_flip=cfg.optim.alternate_flip,
                                    n_train=len(self.train_labels), seed=cfg.run.seed, device=self.device)
        if cfg.optim.whiten:
            from .models.fastnet import init_whitening

            sample = self.augment.normalise(self.train_images[:5000])
            init_whitening(self.model, sample.float())
        if self.data.val is not None:
            self.eval_split, self.eval_name = self.data.val, "val"
        else:
            self.eval_split, self.eval_name = self.data.test, "test"
            log("note: --val-fraction 0: validating on the test split each epoch (model selection sees test)")

        self.batch_size = min(cfg.optim.batch_size, len(self.train_labels))
        self.steps_per_epoch = self.batch_count(len(self.train_labels))
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        self.optimizer = build_optimizer(self.model, cfg, self.head_path, self.batch_size)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.ema = EMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema else None
        self.train_model = self.wrap_model()
        self.step = 0
        self.epoch = 0
        self.position = 0  # batches of the current epoch already done
        self.best_acc = -1.0
        self.elapsed = 0.0  # training seconds, summed across resumes
        self.nan_skips = 0
        if self.resume_dir is not None:
            self.load_state()
        else:
            save_config(self.cfg, self.run_dir / "config.yaml")
            (self.run_dir / "metrics.jsonl").write_text("")

    def batch_count(self, n: int) -> int:
        # The last partial batch is dropped: a batch of 1 breaks BatchNorm, and equal batches keep
        # the schedule's step count exact.
        per_rank = n // self.world.size
        return max(1, per_rank // self.batch_size)

    def wrap_model(self) -> torch.nn.Module:
        model = self.model
        if self.world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        want = self.cfg.run.compile
        if want == "on" or (want == "auto" and self.device.type == "cuda"):
            model = torch.compile(model)
        return model

    # --- the loop ----------------------------------------------------------------------------
    def fit(self) -> Run:
        self.setup()
        cfg = self.cfg
        old_handlers = self.install_signal_handlers()
        log(f"training {cfg.model.model} ({sum(p.numel() for p in self.model.parameters()):,} parameters) on "
            f"{cfg.data.data}: {len(self.train_labels):,} train, {len(self.eval_split.labels):,} {self.eval_name}, "
            f"{len(self.data.test.labels):,} test images, {len(self.classes)} classes, device {self.device}"
            + (f", decode {self.data.decode_seconds:.1f}s" if self.data.decode_seconds else ""))
        try:
            while self.epoch < cfg.optim.epochs and self.step < self.total_steps:
                self.run_epoch()
        finally:
            restore_signal_handlers(old_handlers)
        return self.finish()

    def run_epoch(self) -> None:
        cfg, epoch = self.cfg, self.epoch
        self.model.train()
        order = epoch_order(len(self.train_labels), cfg.run.seed, epoch, self.device)
        order = order[self.world.rank::self.world.size]
        steps = min(self.steps_per_epoch, self.total_steps - self.step + self.position)
        generator = torch.Generator(device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        seen = 0
        bar = progress_bar(steps, f"Epoch {epoch + 1}/{cfg.optim.epochs}", cfg.run.progress and is_main_process(),
                           initial=self.position)
        start = time.perf_counter()
        last_save = time.monotonic()
        while self.position < steps:
            index = order[self.position * self.batch_size:(self.position + 1) * self.batch_size]
            generator.manual_seed(cfg.run.seed * 1_000_003 + self.step)
            x = self.augment(self.train_images[index], index, epoch, generator)
            if cfg.run.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = self.train_step(x, self.train_labels[index])
            loss_sum += loss.detach() * len(index)
            seen += len(index)
            self.step += 1
            self.position += 1
            if bar is not None:
                bar.update(1)
                if self.position % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            if cfg.optim.time_budget and self.step == 8 and epoch == 0:
                self.plan_budget(time.perf_counter() - start)
            if self.stop_signal is not None:
                self.elapsed += time.perf_counter() - start
                self.save_state()
                raise TrainingInterrupted(128 + self.stop_signal, self.run_dir)
            if cfg.run.checkpoint_every and time.monotonic() - last_save > cfg.run.checkpoint_every * 60:
                self.elapsed += time.perf_counter() - start
                start = time.perf_counter()
                self.save_state()
                last_save = time.monotonic()
        if bar is not None:
            bar.close()
        train_seconds = time.perf_counter() - start
        self.elapsed += train_seconds
        train_loss = self.world.mean(loss_sum / max(seen, 1))
        self.end_epoch(train_loss, seen * self.world.size / max(train_seconds, 1e-9))

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        factor = lr_factor(cfg.optim.schedule, self.step, self.total_steps,
                           warmup_steps=round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.train_model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.optim.label_smoothing)
        if not self.loss_is_finite(loss):
            return torch.zeros((), device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        return loss

    def loss_is_finite(self, loss: torch.Tensor) -> bool:
        # One host sync per step; cheap next to a forward/backward on CPU, and on CUDA only the
        # small nets of the fast recipe notice it.
        if bool(torch.isfinite(loss)):
            return True
        if self.cfg.optim.on_nan == "skip":
            self.nan_skips += 1
            log(f"warning: non-finite loss at step {self.step + 1}, batch skipped ({self.nan_skips} so far)")
            return False
        raise TrainingStopped(f"loss became {loss.item()} at step {self.step + 1} (epoch {self.epoch + 1}); "
                              f"the last good checkpoint is kept in {self.run_dir}; "
                              "try a lower --lr, --grad-clip, or --on-nan skip")

    def plan_budget(self, seconds_for_first_steps: float) -> None:
        """Set the total step count so the schedule ends at the time budget.

        Measured on steps 2–8 (step 1 pays one-off costs), with the cost of each epoch's
        validation pass estimated from the data sizes and deducted.
        """
        per_step = seconds_for_first_steps / 8
        eval_fraction = len(self.eval_split.labels) / (3 * self.batch_size * self.steps_per_epoch)
        budget = self.cfg.optim.time_budget / (1 + eval_fraction)
        self.total_steps = max(self.step + 1, int(budget / per_step))
        self.cfg.optim.epochs = math.ceil(self.total_steps / self.steps_per_epoch)

    def replan_budget(self) -> None:
        """Re-measure at each epoch end: the first steps are a noisy estimate."""
        remaining = self.cfg.optim.time_budget - self.elapsed
        per_step = self.elapsed / max(self.step, 1)
        self.total_steps = self.step + max(0, int(remaining / per_step))
        self.cfg.optim.epochs = max(self.epoch, math.ceil(self.total_steps / self.steps_per_epoch))

    def end_epoch(self, train_loss: float, images_per_second: float) -> None:
        cfg = self.cfg
        eval_start = time.perf_counter()
        model = self.ema.model if self.ema is not None else self.model
        metrics = self.evaluate(model, self.eval_split)
        self.epoch += 1
        self.position = 0
        self.elapsed += time.perf_counter() - eval_start  # the budget covers validation too
        if cfg.optim.time_budget:
            self.replan_budget()
        record = {"epoch": self.epoch, "train_loss": round(train_loss, 6), "val_loss": round(metrics["loss"], 6),
                  "val_acc": metrics["accuracy"], "lr": self.optimizer.param_groups[-1]["lr"],
                  "img_per_s": round(images_per_second, 1), "elapsed_s": round(self.elapsed, 3), "step": self.step}
        if self.nan_skips:
            record["nan_skips"] = self.nan_skips
        log(f"Epoch {self.epoch}/{cfg.optim.epochs}  loss {train_loss:.4f}  {self.eval_name}_loss {metrics['loss']:.4f}  "
            f"{self.eval_name}_acc {100 * metrics['accuracy']:.2f}%  lr {record['lr']:.1e}  {images_per_second:,.0f} img/s")
        if is_main_process():
            ckpt.append_jsonl(self.run_dir / "metrics.jsonl", record)
            meta = {**self.meta, "epoch": self.epoch, f"{self.eval_name}_acc": metrics["accuracy"]}
            ckpt.save_model(self.run_dir, "last", model, meta)
            if metrics["accuracy"] > self.best_acc:
                self.best_acc = metrics["accuracy"]
                ckpt.save_model(self.run_dir, "model", model, meta)
        self.best_acc = max(self.best_acc, metrics["accuracy"])
        self.save_state()

    def evaluate(self, model: torch.nn.Module, split) -> dict:
        logits = predict_logits(model, split.images, self.mean, self.std, tta=bool(self.cfg.optim.tta),
                                device=self.device, channels_last=self.cfg.run.channels_last)
        return compute_metrics(logits, split.labels)

    def finish(self) -> Run:
        run = Run(self.run_dir)
        if not is_main_process():
            return run
        result = run.evaluate(split="test", device=str(self.device), dataset=self.data)
        log(f"test accuracy {100 * result['accuracy']:.2f}% ({result['num_images']:,} images, "
            f"best epoch by {self.eval_name}_acc), training {self.elapsed:.1f}s; run directory {self.run_dir}")
        if self.cfg.run.report:
            try:
                from .report import write_report
            except ImportError:
                pass
            else:
                write_report(self.run_dir, dataset=self.data)
        return run

    # --- state for resume ------------------------------------------------------------------------
    def save_state(self) -> None:
        if not is_main_process():
            return
        state = {
            "format": ckpt.FORMAT, "model": ckpt.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(), "ema": self.ema.model.state_dict() if self.ema else None,
            "step": self.step, "epoch": self.epoch, "position": self.position, "total_steps": self.total_steps,
            "epochs": self.cfg.optim.epochs, "best_acc": self.best_acc, "elapsed": self.elapsed,
            "nan_skips": self.nan_skips, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        }
        ckpt.save_state(self.run_dir / "state.pt", state)

    def load_state(self) -> None:
        state = ckpt.load_state(self.run_dir / "state.pt")
        ckpt.load_into(self.model, state["model"], str(self.run_dir / "state.pt"))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.model.load_state_dict(state["ema"])
        for key in ("step", "epoch", "position", "total_steps", "best_acc", "elapsed", "nan_skips"):
            setattr(self, key, state[key])
        self.cfg.optim.epochs = state["epochs"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        # metrics.jsonl may hold epochs written after this state was saved: drop them.
        metrics = self.run_dir / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        ckpt.atomic_write_text(metrics, "".join(line + "\n" for line in lines[:self.epoch]))
        log(f"resuming {self.run_dir} at epoch {self.epoch + 1}, step {self.step}/{self.total_steps}")

    def install_signal_handlers(self):
        def handler(signum, frame):
            self.stop_signal = signum
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. a server); no graceful stop there
                pass
        return handlers


def restore_signal_handlers(handlers) -> None:
    for sig, old in handlers.items():
        signal.signal(sig, old)


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The shuffled order of an epoch, a pure function of (seed, epoch): resume needs no RNG state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7 * epoch + 1)
    return torch.randperm(n, generator=g).to(device)


def build_optimizer(model: torch.nn.Module, cfg: Config, head_path: str, batch_size: int) -> torch.optim.Optimizer:
    """Param groups: backbone (lr × backbone_lr_mult) and head; no weight decay on biases and norms."""
    lr = cfg.optim.lr * (batch_size / 1024 if LR_PER_1024[cfg.optim.recipe] else 1.0)
    head_prefix = head_path + "."
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad and not name.startswith(head_prefix) and not cfg.model.freeze_backbone:
            continue  # frozen by the model itself (fastnet's whitening layer)
        is_head = name.startswith(head_prefix)
        decay = param.ndim > 1
        groups.setdefault((is_head, decay), []).append(param)
    param_groups = []
    for (is_head, decay), params in sorted(groups.items()):
        mult = 1.0 if is_head else cfg.model.backbone_lr_mult
        param_groups.append({"params": params, "lr": lr * mult, "weight_decay": cfg.optim.weight_decay if decay else 0.0,
                             "is_head": is_head})
    name = cfg.optim.optimizer
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=cfg.optim.momentum, nesterov=bool(cfg.optim.nesterov),
                               foreach=True)
    # foreach: one kernel per op over all tensors; PyTorch's CPU default is a Python loop per tensor
    if name == "adam":
        return torch.optim.Adam(param_groups, lr=lr, foreach=True)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, foreach=True)
    return torch.optim.Adagrad(param_groups, lr=lr, foreach=True)


class EMA:
    """Exponential moving average of weights (and a copy of BatchNorm buffers), used for evaluation."""

    def __init__(self, model: torch.nn.Module, decay: float):
        import copy

        self.model = copy.deepcopy(ckpt.unwrap(model)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # Warm-up so early averages are not dominated by the random init.
        decay = min(self.decay, (1 + step) / (10 + step))
        source = ckpt.unwrap(model)
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in source.parameters()], 1 - decay)
        for ema_buffer, buffer in zip(self.model.buffers(), source.buffers()):
            ema_buffer.copy_(buffer)


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, unit="step", dynamic_ncols=True)
