"""The training loop: one readable function from data to a finished run directory.

    run = train(Config.from_dict({"data": "digits", "epochs": 5}))
    run = train(data="digits", model="seedcnn", epochs=5)      # same, keyword settings
    run.evaluate()["accuracy"]

What happens, in order: resolve the recipe, load the data as uint8 tensors (decoded once, cached),
build the model, then loop over steps. Each step gathers a batch from the device-resident data,
augments it on the device, runs forward/backward under bf16 autocast on CUDA, and steps the
optimizer with the learning rate of the schedule at that step. Each epoch ends with validation,
`metrics.jsonl`, the best and last models, and `state.pt` for an exact resume.

    run = resume("runs/x")      # bit for bit where it stopped, mid-epoch included (README: Survive faults)

SIGINT/SIGTERM finish the step, save and raise TrainingInterrupted (exit 130/143); a NaN loss
raises TrainingStopped (or skips the batch with --on-nan skip). Under torchrun each process trains
a DDP copy on its slice of every global batch; decisions one process could take alone (stop,
skip, save) are agreed by all at each step, and only rank 0 writes.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch

from visionrecipe.models import checkpoint as ckpt
from visionrecipe.train.augment import BatchAugment, epoch_order
from visionrecipe.config import Config, apply_overrides, resolve_device_defaults, resolve_crop_padding, resolve_recipe, save_config
from visionrecipe.data import channel_stats, load_dataset
from visionrecipe.errors import TrainingInterrupted, TrainingStopped, VisionRecipeError
from visionrecipe.evaluate.sharded import sharded_logits
from visionrecipe.evaluate.scoring import compute_metrics
from visionrecipe.models import create_model, get_spec
from visionrecipe.train.callbacks import nan_injection_steps, open_tensorboard, progress_bar
from visionrecipe.train.tasks import check_task, compute_multilabel_metrics, init_prior_bias, task_loss
from visionrecipe.train.optim import EMA, build_optimizer, small_data_batch
from visionrecipe.train.state import STATE_KEYS, data_fingerprint, load_state, plan_resume, save_state
from visionrecipe.rundir import Run
from visionrecipe.rundir import append_metrics, check_run_dir, ensure_room, prepare_run_dir, truncate_metrics, unlock
from visionrecipe.train.schedule import lr_factor
from visionrecipe.system import local_rank, log, select_device, set_threads, shutdown, warn, world


def train(config: Config | None = None, *, on_epoch=None, evaluate_test: bool = True, **settings) -> Run:
    """Train and return the Run (None in torchrun processes other than rank 0).
    `on_epoch(record)` is called after each epoch with the
    metrics.jsonl record (tune uses it to report to its pruner; it may raise to stop).
    `evaluate_test=False` skips the test split at the end (tune's trials must never see it)."""
    cfg = apply_overrides(Config.from_dict(config.to_dict()) if config else Config(), settings)
    return Trainer(cfg, on_epoch=on_epoch, evaluate_test=evaluate_test).fit()


def resume(run_dir: str | Path, **settings) -> Run:
    """Continue a run from its `state.pt` exactly where it stopped."""
    run_dir, cfg, changed = plan_resume(run_dir, settings)
    return Trainer(cfg, resume_dir=run_dir, changed=changed).fit()


class Trainer:
    def __init__(self, cfg: Config, resume_dir: Path | None = None, on_epoch=None, evaluate_test: bool = True,
                 changed: dict | None = None):
        self.recipe_batch = cfg.optim.batch_size is None  # the recipe's batch may shrink to fit small data
        self.cfg = resolve_recipe(cfg)
        self.resume_dir = resume_dir
        self.changed = changed or {}  # settings a resume changed (RESUME_SETTINGS), for config.yaml
        self.on_epoch = on_epoch
        self.evaluate_test = evaluate_test
        self.stop_signal: int | None = None

    # --- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.device = select_device(cfg.run.device, local_rank=local_rank())
        resolve_device_defaults(cfg, self.device.type)
        self.world = world(self.device)
        set_threads(cfg.run.threads, self.device)
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(cfg.run.seed)
        spec = get_spec(cfg.model.model)  # unknown model: fail before decoding any data
        if cfg.model.weights and cfg.data.image_size is None:
            from visionrecipe.train.finetune import pretrained_image_size

            # Decode at the size the weights were trained at (also checks they exist, before decoding).
            cfg.data.image_size = pretrained_image_size(cfg, spec)

        if self.resume_dir is not None:  # locked before its state is read: no other process writes it
            self.open_run_dir(resume=True)
        elif self.world.is_main:
            check_run_dir(cfg)  # a refused --out fails now, before any data is decoded; nothing is written
        # The resume state is read before any data is decoded: a damaged file fails in a second.
        state = ckpt.read_resume_file(self.resume_dir / "state.pt", STATE_KEYS) if self.resume_dir is not None else None
        with self.world.main_first():  # rank 0 decodes and caches a folder; the others read the cache
            self.data = load_dataset(cfg.data.data, data_dir=cfg.data.data_dir, image_size=cfg.data.image_size,
                                     val_fraction=cfg.data.val_fraction, seed=cfg.run.seed,
                                     strict=cfg.data.strict, progress=cfg.run.progress and self.world.is_main,
                                     workers=cfg.data.workers, allow_outside_paths=cfg.data.allow_outside_paths)
        if self.data.skipped:
            names = ", ".join(path for path, _ in self.data.skipped[:5])
            more = f" and {len(self.data.skipped) - 5} more" if len(self.data.skipped) > 5 else ""
            warn(f"warning: skipped {len(self.data.skipped)} unreadable image(s): {names}{more}")
        train_split = self.data.train
        _, channels, height, width = train_split.images.shape
        self.classes = self.data.classes
        check_task(cfg, self.data)
        if self.resume_dir is None:
            self.open_run_dir()  # every input is good: only now is the folder created, or cleared by --overwrite
        self.tensorboard = open_tensorboard(self.run_dir) if cfg.run.tensorboard and self.world.is_main else None
        self.mean, self.std = channel_stats(train_split.images)
        self.data_fingerprint = data_fingerprint(self.data, self.mean, self.std)  # a resume must find the same
        options = {k: v for k, v in (("width", cfg.model.width), ("depth", cfg.model.depth)) if v is not None}
        self.model = create_model(cfg.model.model, len(self.classes), in_channels=channels,
                                  image_size=height, head=cfg.model.head, **options)
        self.meta = {
            "architecture": cfg.model.model, "model_options": options, "head": cfg.model.head,
            "family": spec.family, "classes": list(self.classes), "input_size": [channels, height, width],
            "mean": self.mean, "std": self.std, "tta": bool(cfg.optim.tta), "task": cfg.model.task,
            "data": cfg.data.data, "threshold": cfg.model.threshold,
        }
        if cfg.model.task == "multilabel":
            init_prior_bias(self.model, spec.head_path, train_split.labels)
        self.loss_fn = task_loss(cfg)
        if cfg.model.weights:
            from visionrecipe.train.finetune import load_initial_weights

            preprocessing = load_initial_weights(self.model, cfg, spec, len(self.classes), classes=list(self.classes),
                                                 resume_dir=self.resume_dir)
            self.meta.update(preprocessing or {})
            self.mean, self.std = self.meta["mean"], self.meta["std"]
        from visionrecipe.train.finetune import backbone_freezer

        self.freezer = backbone_freezer(self.model, cfg, spec.head_path)  # None unless --freeze-backbone
        self.head_path = spec.head_path
        if self.world.is_main:
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
            from visionrecipe.models.fastnet import init_whitening

            sample = self.augment.normalise(self.train_images[:5000])
            init_whitening(self.model, sample.float())
        if self.data.val is not None:
            self.eval_split, self.eval_name = self.data.val, "val"
        else:
            self.eval_split, self.eval_name = self.data.test, "test"
            log("note: --val-fraction 0: validating on the test split each epoch (model selection sees test)")

        if self.recipe_batch:
            cfg.optim.batch_size = small_data_batch(cfg.optim.batch_size, len(self.train_labels), self.world.size)
        # --batch-size is the global batch: each of the world's processes takes an equal slice of
        # it, so 2 processes train on the same batches, with the same lr, as one.
        if cfg.optim.batch_size % self.world.size:
            raise VisionRecipeError(f"--batch-size {cfg.optim.batch_size} is the global batch and must be a "
                                    f"multiple of the {self.world.size} processes")
        n = len(self.train_labels)
        self.global_batch = min(cfg.optim.batch_size, n - n % self.world.size)
        self.batch_size = self.global_batch // self.world.size  # per process
        # The last partial batch is dropped: a batch of 1 breaks BatchNorm, and equal batches keep
        # the schedule's step count exact.
        self.steps_per_epoch = max(1, n // self.global_batch)
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        self.optimizer = build_optimizer(self.model, cfg, self.head_path, self.global_batch)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.ema = EMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema else None
        self.train_model = self.wrap_model()
        if self.world.rank:
            # Dropout masks should differ between processes as they do between images of a batch;
            # the weights are already identical (DDP broadcast rank 0's).
            torch.manual_seed(cfg.run.seed * 1_000_003 + self.world.rank)
        self.step = 0
        self.epoch = 0
        self.position = 0  # global batches of the current epoch already done
        self.loss_sum = torch.zeros((), device=self.device)  # this epoch's loss × images, so far
        self.seen = 0  # this epoch's images with a finite loss, so far (this process)
        self.best_acc = -1.0
        self.elapsed = 0.0  # training seconds, summed across resumes
        self.nan_skips = 0
        self.inject_nan = nan_injection_steps()
        if state is not None:
            self.load_state(state)
        elif self.world.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
            truncate_metrics(self.run_dir, 0)  # an empty metrics.jsonl: no epoch yet

    def open_run_dir(self, resume: bool = False) -> None:
        """Rank 0 prepares and locks the directory (the default name holds the time); the others follow it."""
        self.run_dir = Path(self.world.broadcast(str(prepare_run_dir(self.cfg, resume=resume))))
        self.cfg.run.out = str(self.run_dir)

    def wrap_model(self) -> torch.nn.Module:
        model = self.model
        if self.world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # A frozen backbone gets no gradients, which DDP must be told to expect.
            model = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=self.freezer is not None)
        want = self.cfg.run.compile
        if want == "on" or (want == "auto" and self.device.type == "cuda"):
            model = torch.compile(model)
        return model

    # --- the loop ----------------------------------------------------------------------------
    def fit(self) -> Run | None:
        """Train to the end and return the Run (None in processes other than rank 0)."""
        try:
            self.setup()
            cfg = self.cfg
            old_handlers = self.install_signal_handlers()
            log(f"training {cfg.model.model} ({sum(p.numel() for p in self.model.parameters()):,} parameters) on "
                f"{cfg.data.data}: {len(self.train_labels):,} train, {len(self.eval_split.labels):,} {self.eval_name}, "
                f"{len(self.data.test.labels):,} test images, {len(self.classes)} classes, device {self.device}"
                + (f", {self.world.size} processes" if self.world.size > 1 else "")
                + (f", decode {self.data.decode_seconds:.1f}s" if self.data.decode_seconds else ""))
            try:
                while self.epoch < cfg.optim.epochs and self.step < self.total_steps:
                    self.run_epoch()
            finally:
                restore_signal_handlers(old_handlers)
            return self.finish()
        finally:
            unlock(getattr(self, "run_dir", None))  # a no-op where this process holds no lock
            shutdown()

    def run_epoch(self) -> None:
        cfg, epoch = self.cfg, self.epoch
        self.model.train()
        if self.freezer is not None:
            self.freezer.apply(epoch)  # after train(): frozen BatchNorm goes back to eval mode
        order = epoch_order(len(self.train_labels), cfg.run.seed, epoch, self.device)
        rank, size = self.world.rank, self.world.size
        steps = min(self.steps_per_epoch, self.total_steps - self.step + self.position)
        generator = torch.Generator(device=self.device)
        bar = progress_bar(steps, f"Epoch {epoch + 1}/{cfg.optim.epochs}", cfg.run.progress and self.world.is_main,
                           initial=self.position)
        start = epoch_start = time.perf_counter()
        last_save = time.monotonic()
        images = 0  # trained on by this process in this session: for images per second
        # total_steps can shrink mid-epoch when a time budget is planned, hence both bounds.
        while self.position < steps and self.step < self.total_steps:
            # Every process augments the same global batch (the generator is seeded by the step)
            # and trains on its slice [rank::size], which over the epoch is order[rank::size]: the
            # batches and augmentations are those of one process, whatever the world size.
            index = order[self.position * self.global_batch:(self.position + 1) * self.global_batch]
            generator.manual_seed(cfg.run.seed * 1_000_003 + self.step)
            x = self.augment(self.train_images[index], index, epoch, generator)[rank::size]
            y = self.train_labels[index][rank::size]
            if cfg.run.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = self.train_step(x, y)
            if loss is not None:  # None: a non-finite loss, skipped with --on-nan skip
                self.loss_sum += loss.detach() * len(y)
                self.seen += len(y)
            images += len(y)
            self.step += 1
            self.position += 1
            if bar is not None:
                bar.update(1)
                if self.position % 10 == 0 and loss is not None:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            if cfg.optim.time_budget and self.step == 8 and epoch == 0:
                self.plan_budget(time.perf_counter() - start)
            stop_signal, save_due = self.agree_on_events(last_save)
            if stop_signal or save_due:
                self.elapsed += time.perf_counter() - start
                start = time.perf_counter()
                self.save_state()
                last_save = time.monotonic()
            if stop_signal:
                raise TrainingInterrupted(128 + stop_signal, self.run_dir, self.world.size)
        if bar is not None:
            bar.close()
        self.elapsed += time.perf_counter() - start
        # The loss sum survives a resume in state.pt, so a resumed epoch reports the same mean.
        totals = self.world.sum(torch.stack([self.loss_sum, torch.tensor(float(self.seen), device=self.device)]))
        train_loss = float(totals[0] / totals[1]) if totals[1] else float("nan")
        self.end_epoch(train_loss, images * size / max(time.perf_counter() - epoch_start, 1e-9))

    def agree_on_events(self, last_save: float) -> tuple[int, bool]:
        """(signal number or 0, checkpoint due), the same in every process: they stop and save
        together, or one would wait forever for the others in the next all-reduce."""
        every = self.cfg.run.checkpoint_every
        due = bool(every) and time.monotonic() - last_save > every * 60
        signum, due = self.world.max([self.stop_signal or 0, int(due)])
        return signum, bool(due)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """One optimizer step; returns the loss, or None when a non-finite loss was skipped."""
        cfg = self.cfg
        factor = lr_factor(cfg.optim.schedule, self.step, self.total_steps,
                           warmup_steps=round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.train_model(x)
            loss = self.loss_fn(logits.float(), y)
        if self.step + 1 in self.inject_nan:  # test hook: VISIONRECIPE_INJECT_NAN_AT_STEP
            loss = loss * float("nan")
        if not self.loss_is_finite(loss):
            return None
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
        finite = bool(torch.isfinite(loss))
        if self.world.size > 1:
            # One process's NaN must stop or skip every process: a lone skip would leave the
            # others waiting in the gradient all-reduce.
            finite = self.world.max([int(not finite)]) == [0]
        if finite:
            return True
        value = loss.item() if not torch.isfinite(loss) else "non-finite in another process"
        if self.cfg.optim.on_nan == "skip":
            self.nan_skips += 1
            warn(f"warning: loss {value} at step {self.step + 1}, batch skipped ({self.nan_skips} so far)")
            return False
        # Nothing is saved: the last checkpoint (state.pt, last and best model) predates the NaN.
        raise TrainingStopped(f"loss became {value} at step {self.step + 1} (epoch {self.epoch + 1}); "
                              f"the last good checkpoint is kept in {self.run_dir}; "
                              "try a lower --lr, --grad-clip, or --on-nan skip")

    def plan_budget(self, seconds_for_first_steps: float) -> None:
        """Set the total step count so the schedule ends at the time budget.

        Measured on steps 2–8 (step 1 pays one-off costs), with the cost of each epoch's
        validation pass estimated from the data sizes and deducted.
        """
        per_step = seconds_for_first_steps / 8
        eval_fraction = len(self.eval_split.labels) / (3 * self.global_batch * self.steps_per_epoch)
        budget = self.cfg.optim.time_budget / (1 + eval_fraction)
        self.total_steps = max(self.step + 1, int(budget / per_step))
        self.cfg.optim.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        # Each process timed itself; all follow rank 0's plan so they take the same steps.
        self.total_steps, self.cfg.optim.epochs = self.world.broadcast((self.total_steps, self.cfg.optim.epochs))

    def replan_budget(self) -> None:
        """Re-measure at each epoch end: the first steps are a noisy estimate."""
        remaining = self.cfg.optim.time_budget - self.elapsed
        per_step = self.elapsed / max(self.step, 1)
        self.total_steps = self.step + max(0, int(remaining / per_step))
        self.cfg.optim.epochs = max(self.epoch, math.ceil(self.total_steps / self.steps_per_epoch))
        self.total_steps, self.cfg.optim.epochs = self.world.broadcast((self.total_steps, self.cfg.optim.epochs))

    def end_epoch(self, train_loss: float, images_per_second: float) -> None:
        cfg = self.cfg
        eval_start = time.perf_counter()
        model = self.ema.model if self.ema is not None else self.model
        metrics = self.evaluate(model, self.eval_split)
        self.epoch += 1
        self.position = 0
        self.loss_sum.zero_()
        self.seen = 0
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
        if self.world.is_main:
            append_metrics(self.run_dir, record)
            if self.tensorboard is not None:
                for name, value in record.items():
                    self.tensorboard.add_scalar(name, value, self.epoch)
                self.tensorboard.flush()
            meta = {**self.meta, "epoch": self.epoch, f"{self.eval_name}_acc": metrics["accuracy"]}
            ckpt.save_model(self.run_dir, "last", model, meta)
            if metrics["accuracy"] > self.best_acc:
                self.best_acc = metrics["accuracy"]
                ckpt.save_model(self.run_dir, "model", model, meta)
        self.best_acc = max(self.best_acc, metrics["accuracy"])
        self.save_state()
        if self.on_epoch is not None:
            self.on_epoch(record)

    def evaluate(self, model: torch.nn.Module, split) -> dict:
        # Under torchrun each process scores a share of the batches, with rank 0's weights; the
        # logits are gathered, so every image counts once and all processes agree on the metrics.
        logits = sharded_logits(self.world, model, split.images, self.mean, self.std, tta=bool(self.cfg.optim.tta),
                                device=self.device, channels_last=self.cfg.run.channels_last)
        if self.cfg.model.task == "multilabel":
            metrics = compute_multilabel_metrics(logits, split.labels, self.cfg.model.threshold)
            return {**metrics, "accuracy": metrics["mAP"]}  # val_acc is mAP: it picks the best epoch
        return compute_metrics(logits, split.labels)

    def finish(self) -> Run | None:
        if not self.world.is_main:
            return None  # rank 0 scores the test split and reports; this machine may lack the run dir
        run = Run(self.run_dir)
        if not self.evaluate_test:
            return run
        result = run.evaluate(split="test", device=str(self.device), dataset=self.data)
        score = f"mAP {100 * result['mAP']:.2f}%" if "mAP" in result else f"accuracy {100 * result['accuracy']:.2f}%"
        log(f"test {score} ({result['num_images']:,} images, "
            f"best epoch by {self.eval_name}_acc), training {self.elapsed:.1f}s; run directory {self.run_dir}")
        if self.cfg.run.report:
            try:
                from visionrecipe.evaluate.report import write_report
            except ImportError:
                pass
            else:
                write_report(self.run_dir, dataset=self.data)
        return run

    def save_state(self) -> None:
        save_state(self)

    def load_state(self, state: dict) -> None:
        load_state(self, state)

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
