"""The training loop: one readable class from settings to a finished run directory.

    run = train(Config.from_dict({"data": "digits", "epochs": 5}))
    run = train(data="digits", model="seedcnn", epochs=5)      # same, keyword settings
    run.evaluate()["accuracy"]
    run = resume("runs/x")      # bit for bit where it stopped, mid-epoch included (README: Survive faults)

What happens, in order (Trainer.fit): resolve the settings and load the data as uint8 tensors
(decoded once, cached), build the model, normalisation and augmentation (train/build.py), then
for each epoch: training steps, validation, and the epoch's records (train/callbacks.py:
metrics.jsonl, best and last model, TensorBoard) and state.pt for an exact resume (train/state.py).
Each step gathers a batch from the device-resident data (or, with --cache disk, from the record
cache read ahead by train/feed.py), augments it on the device, runs
forward/backward under --precision's autocast (bf16 on CUDA by default; fp16 with a gradient
scaler) in --grad-accum micro-batches, and steps the optimizer with the learning rate of the
schedule at that step. --patience and --stop-at end a run early at an epoch end (metrics.jsonl's
last line says why). At the end the test split is scored once, and the report is drawn from
those numbers.

SIGINT/SIGTERM finish the step, save and raise TrainingInterrupted (exit 130/143); a NaN loss
raises TrainingStopped (or skips the batch with --on-nan skip). Under torchrun each process trains
a DDP copy on its slice of every global batch; decisions one process could take alone (stop,
skip, save) are agreed by all at each step, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

import torch

from visionrecipe.config import Config, apply_overrides, load_config, save_config
from visionrecipe.errors import TrainingInterrupted, TrainingStopped, VisionRecipeError
from visionrecipe.evaluate.scoring import compute_metrics, recalibrate_batchnorm
from visionrecipe.evaluate.sharded import sharded_logits
from visionrecipe.models.checkpoint import unwrap
from visionrecipe.recipes import copy_config, lr_unit, progressive_costs, training_side
from visionrecipe.rundir import (Run, check_run_dir, default_run_dir, ensure_room, prepare_run_dir, truncate_metrics,
                                 unlock)
from visionrecipe.system import local_rank, log, select_device, set_threads, shutdown, warn, world
from visionrecipe.train.augment import SEED_STRIDE
from visionrecipe.train.budget import BUDGET_PROBE_STEPS, eval_fraction, plan_budget, replan_budget
from visionrecipe.train.build import build_run, load_data, resolve
from visionrecipe.train.callbacks import (epoch_record, keeps, log_epoch, open_tensorboard, progress_bar, save_models,
                                          write_epoch)
from visionrecipe.train.feed import open_feed
from visionrecipe.train.finetune import backbone_freezer
from visionrecipe.train.lr_find import resolve_auto_lr
from visionrecipe.train.optim import EMA, build_optimizer
from visionrecipe.train.plan import fit_memory, plan_run
from visionrecipe.train.schedule import lr_factor
from visionrecipe.train.state import (TrainState, check_data, data_fingerprint, learned_state, load_learned_state,
                                      plan_resume, read_state, restore_rng, write_state)
from visionrecipe.train.tasks import check_task, compute_multilabel_metrics
from visionrecipe.train.tracking import open_tracker


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
    def __init__(self, settings: Config, resume_dir: Path | None = None, on_epoch=None, evaluate_test: bool = True,
                 changed: dict | None = None):
        self.settings = settings  # as given; setup resolves them once into self.cfg
        self.resume_dir = resume_dir
        self.changed = changed or {}  # settings a resume changed (RESUME_SETTINGS), for config.yaml
        self.on_epoch = on_epoch
        self.evaluate_test = evaluate_test
        self.stop_signal: int | None = None
        self.tracker = None  # MLflow, opened by fit() on rank 0 when --mlflow is given

    # --- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        self.device = select_device(self.settings.run.device, local_rank=local_rank())
        self.world = world(self.device)
        loading = resolve(self.settings, self.device.type)  # enough to load the data (and fail early)
        set_threads(loading.run.threads, self.device)
        if loading.optim.stop_at is not None and loading.optim.stop_at > 1:
            raise VisionRecipeError(f"--stop-at is a val_acc between 0 and 1 (e.g. 0.95), got {loading.optim.stop_at:g}")
        if self.resume_dir is None:  # the budget policy: net, sides, batch from the data and this device's speed
            self.settings, plan_line = plan_run(self.settings, self.device, self.world)
            if plan_line:
                log(plan_line)  # the run's first line
                loading = resolve(self.settings, self.device.type)
        if loading.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(loading.run.seed)
        # The default name holds the time: rank 0 chooses it and every process uses it.
        out = loading.run.out or self.world.broadcast(default_run_dir(loading))
        self.settings = copy_config(self.settings, out=out)
        if self.resume_dir is not None:  # locked before its state is read: no other process writes it
            self.open_run_dir(copy_config(loading, out=out), resume=True)
        elif self.world.is_main:
            check_run_dir(copy_config(loading, out=out))  # a refused --out fails now, before any decoding
        # The resume state is read before any data is decoded: a damaged file fails in a second.
        saved = read_state(self.resume_dir / "state.pt") if self.resume_dir is not None else None
        with self.world.main_first():  # rank 0 decodes and caches a folder; the others read the cache
            self.data = load_data(loading, progress=loading.run.progress and self.world.is_main, device=self.device)
        check_task(loading, self.data)

        # From here on the config is complete, and nothing changes it: config.yaml is what runs.
        self.cfg = cfg = resolve(self.settings, self.device.type, self.data, self.world.size)
        # --batch-size is the global batch: each of the world's processes takes an equal slice of
        # it, so 2 processes train on the same batches, with the same lr, as one. Checked before
        # the run directory is made.
        if cfg.optim.batch_size % self.world.size:
            raise VisionRecipeError(f"--batch-size {cfg.optim.batch_size} is the global batch and must be a "
                                    f"multiple of the {self.world.size} processes")
        n = len(self.data.train.labels)
        self.global_batch = min(cfg.optim.batch_size, n - n % self.world.size)
        self.batch_size = self.global_batch // self.world.size  # per process
        # The last partial batch is dropped: a batch of 1 breaks BatchNorm, and equal batches keep
        # the schedule's step count exact.
        self.steps_per_epoch = max(1, n // self.global_batch)
        if self.batch_size % cfg.optim.grad_accum:
            raise VisionRecipeError(f"--grad-accum {cfg.optim.grad_accum} must divide the batch of "
                                    f"{self.batch_size} images" + (" per process" if self.world.size > 1 else "")
                                    + " (--batch-size is the batch of one optimizer step)")
        if self.resume_dir is None:
            self.cfg, memory_line = fit_memory(cfg, self.data, self.device, self.world.size)  # before the first step
            if memory_line:
                log(memory_line)
            cfg = self.cfg
            self.open_run_dir(cfg)  # every input is good: only now is the folder created, or cleared by --overwrite
        self.tensorboard = open_tensorboard(self.run_dir) if cfg.run.tensorboard and self.world.is_main else None
        self.built = built = build_run(cfg, self.data, self.device, resume_dir=self.resume_dir)
        self.cfg = cfg = resolve_auto_lr(built, self.world)  # --lr auto: the range test's pick, before config.yaml
        self.model, self.mean, self.std = built.model, built.mean, built.std
        self.data_fingerprint = data_fingerprint(self.data, *built.data_stats)  # a resume must find the same
        self.freezer = backbone_freezer(self.model, cfg, built.head_path)  # None unless --freeze-backbone
        if self.world.is_main:
            # best + last model, and the state with optimizer moments: about 4 copies of the weights
            ensure_room(self.run_dir, 4 * 4 * sum(p.numel() for p in self.model.parameters()))
        if cfg.run.channels_last and self.device.type != "mps":
            self.model.to(memory_format=torch.channels_last)
        if self.data.val is not None:
            self.eval_split, self.eval_name = self.data.val, "val"
        else:
            self.eval_split, self.eval_name = self.data.test, "test"
            log("note: --val-fraction 0: validating on the test split each epoch (model selection sees test)")
        # --recalibrate-bn: the train images (a seeded subset, in file order) that re-estimate the evaluated
        # model's BatchNorm statistics before each validation; not while a backbone's BatchNorm is frozen.
        self.recalibration = None
        if cfg.optim.recalibrate_bn and self.freezer is None:
            chosen = torch.randperm(len(built.labels), generator=torch.Generator().manual_seed(cfg.run.seed))
            self.recalibration = chosen[:cfg.optim.recalibrate_bn].sort().values
            if isinstance(built.images, torch.Tensor):  # resident: index where the images are
                self.recalibration = self.recalibration.to(built.images.device)

        # fp16's narrow range needs the loss scaled up (and the gradients back down); bf16 does not.
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.run.precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.run.precision == "fp16" else None
        if cfg.run.precision == "fp16" and self.device.type == "cpu":
            warn("warning: --precision fp16 on a CPU is tens of times slower than fp32 (PyTorch has few fp16 CPU "
                 "kernels); bf16 is the CPU's half precision")
        self.optimizer = build_optimizer(self.model, cfg, built.head_path, self.global_batch)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.ema = EMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema else None
        self.train_model = self.wrap_model()
        if self.world.rank:
            # Dropout masks should differ between processes as they do between images of a batch;
            # the weights are already identical (DDP broadcast rank 0's).
            torch.manual_seed(cfg.run.seed * SEED_STRIDE + self.world.rank)
        self.inject_nan = nan_injection_steps()
        if saved is not None:
            self.restore(saved)
        else:
            self.state = TrainState(total_steps=self.steps_per_epoch * cfg.optim.epochs, epochs=cfg.optim.epochs,
                                    loss_sum=torch.zeros((), device=self.device))
            if self.world.is_main:
                save_config(cfg, self.run_dir / "config.yaml")
                truncate_metrics(self.run_dir, 0)  # an empty metrics.jsonl: no epoch yet

    def open_run_dir(self, cfg: Config, resume: bool = False) -> None:
        """Rank 0 prepares and locks the directory; the others follow it."""
        self.run_dir = Path(self.world.broadcast(str(prepare_run_dir(cfg, resume=resume))))

    def wrap_model(self) -> torch.nn.Module:
        model = self.model
        self.no_sync = contextlib.nullcontext  # one process: no gradient all-reduce to hold back
        if self.world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # A frozen backbone gets no gradients, which DDP must be told to expect.
            model = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=self.freezer is not None)
            self.no_sync = model.no_sync
        want = self.cfg.run.compile
        if want == "on" or (want == "auto" and self.device.type == "cuda"):
            model = torch.compile(model)
        return model

    # --- the loop ----------------------------------------------------------------------------
    def fit(self) -> Run | None:
        """Train to the end and return the Run (None in processes other than rank 0)."""
        try:
            self.setup()
            cfg, state = self.cfg, self.state
            if self.finished:  # a resume of a run that ended: say so, touch nothing (exit status 0)
                log(f"{self.run_dir} is already finished ({state.stopped or f'{state.epoch}/{state.epochs} epochs'}); "
                    "nothing to resume")
                return Run(self.run_dir) if self.world.is_main else None
            old_handlers = self.install_signal_handlers()
            # --mlflow: rank 0 opens the MLflow run (a resume reopens its own) and feeds it each epoch
            self.tracker = open_tracker(self.run_dir, cfg) if self.world.is_main else None
            log(f"training {cfg.model.model} ({sum(p.numel() for p in self.model.parameters()):,} parameters) on "
                f"{cfg.data.data}: {len(self.built.labels):,} train, {len(self.eval_split.labels):,} {self.eval_name}, "
                f"{len(self.data.test.labels):,} test images, {len(self.data.classes)} classes, device {self.device}"
                + (f", {self.world.size} processes" if self.world.size > 1 else "")
                + (f", decode {self.data.decode_seconds:.1f}s" if self.data.decode_seconds else "")
                + f", cache {cfg.data.cache} ({self.data.cache_reason})")
            try:
                while not self.finished:
                    self.run_epoch()
            finally:
                restore_signal_handlers(old_handlers)
            run = self.finish()
            if self.tracker is not None:
                self.tracker.close(self.run_dir)  # the model, report and card, then the MLflow run ends
            return run
        finally:
            if self.tracker is not None:
                self.tracker.end(sys.exc_info()[1])  # interrupted (KILLED) or failed; a no-op after close
            unlock(getattr(self, "run_dir", None))  # a no-op where this process holds no lock
            shutdown()

    @property
    def finished(self) -> bool:
        """The planned epochs and steps are done, or the run stopped early (state.stopped says why)."""
        state = self.state
        return bool(state.stopped) or not (state.epoch < state.epochs and state.step < state.total_steps)

    def run_epoch(self) -> None:
        """The rest of the current epoch: its training steps, then validation and the records."""
        train_loss, images_per_second = self.train_epoch()
        self.end_epoch(train_loss, images_per_second)

    def train_epoch(self) -> tuple[float, float]:
        """The rest of the current epoch's steps; (mean train loss, images per second)."""
        cfg, state, built = self.cfg, self.state, self.built
        epoch = state.epoch
        self.model.train()
        if self.freezer is not None:
            self.freezer.apply(epoch)  # after train(): frozen BatchNorm goes back to eval mode
        order = built.epoch_order(epoch)  # shuffled, or class-balanced with --sampler balanced
        rank, size = self.world.rank, self.world.size
        steps = min(self.steps_per_epoch, state.total_steps - state.step + state.position)
        generator = torch.Generator(device=self.device)
        # the device-resident split, or (--cache disk) this process's rows read ahead from the cache
        feed = open_feed(built, order, self.global_batch, start=state.position, rank=rank, size=size)
        bar = progress_bar(steps, f"Epoch {epoch + 1}/{state.epochs}", cfg.run.progress and self.world.is_main,
                           initial=state.position)
        start = epoch_start = time.perf_counter()
        last_save = time.monotonic()
        images = 0  # trained on by this process in this session: for images per second
        # total_steps can shrink mid-epoch when a time budget is planned, hence both bounds.
        try:
            while state.position < steps and state.step < state.total_steps:
                # Every process augments the same global batch (the generator is seeded by the step)
                # and trains on its slice [rank::size], which over the epoch is order[rank::size]: the
                # batches and augmentations are those of one process, whatever the world size.
                index = order[state.position * self.global_batch:(state.position + 1) * self.global_batch]
                generator.manual_seed(cfg.run.seed * SEED_STRIDE + state.step)
                x = built.augment(feed.take(index), index, epoch, generator, size=self.training_side(state.step))
                # --mixup/--cutmix pair image i with image N-1-i of the global batch, before the slicing
                x, y = built.augment.mix(x, built.labels[index], generator)
                x, y = x[rank::size], y[rank::size]
                if cfg.run.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                loss = self.train_step(x, y)
                if loss is not None:  # None: a non-finite loss, skipped with --on-nan skip
                    state.loss_sum += loss.detach() * len(y)
                    state.seen += len(y)
                images += len(y)
                state.step += 1
                state.position += 1
                if bar is not None:
                    bar.update(1)
                    if state.position % 10 == 0 and loss is not None:
                        bar.set_postfix(loss=f"{loss.item():.4f}")
                if cfg.optim.time_budget and state.step == BUDGET_PROBE_STEPS and epoch == 0:
                    recalibrated = 0 if self.recalibration is None else len(self.recalibration)
                    share = eval_fraction(len(self.eval_split.labels) + recalibrated, self.global_batch,
                                          self.steps_per_epoch)
                    plan = plan_budget(cfg.optim.time_budget, time.perf_counter() - start, self.steps_per_epoch, share,
                                       state.step, costs=self.step_costs(), planned=state.total_steps)
                    # Each process timed itself; all follow rank 0's plan so they take the same steps.
                    state.total_steps, state.epochs = self.world.broadcast(plan)
                stop_signal, save_due = self.agree_on_events(last_save)
                if stop_signal or save_due:
                    state.elapsed += time.perf_counter() - start
                    start = time.perf_counter()
                    self.save_state()
                    last_save = time.monotonic()
                if stop_signal:
                    raise TrainingInterrupted(128 + stop_signal, self.run_dir, self.world.size)
        finally:
            feed.close()  # its reader threads stop with the epoch, or with an interrupt
        if bar is not None:
            bar.close()
        state.elapsed += time.perf_counter() - start
        # The loss sum survives a resume in state.pt, so a resumed epoch reports the same mean.
        totals = self.world.sum(torch.stack([state.loss_sum, torch.tensor(float(state.seen), device=self.device)]))
        train_loss = float(totals[0] / totals[1]) if totals[1] else float("nan")
        return train_loss, images * size / max(time.perf_counter() - epoch_start, 1e-9)

    def training_side(self, step: int) -> int | None:
        """The side step `step` trains at (progressive resizing), None: the stored side."""
        optim = self.cfg.optim
        if not optim.train_size:
            return None
        return training_side(optim.train_size, optim.train_size_start or optim.train_size, step, self.state.total_steps)

    def step_costs(self):
        """Each step's relative cost for a plan of N steps (None: equal), so a budget covers the larger
        late steps of progressive resizing."""
        optim = self.cfg.optim
        if not optim.train_size or not optim.train_size_start or optim.train_size_start >= optim.train_size:
            return None
        return partial(progressive_costs, optim.train_size, optim.train_size_start)

    def agree_on_events(self, last_save: float) -> tuple[int, bool]:
        """(signal number or 0, checkpoint due), the same in every process: they stop and save
        together, or one would wait forever for the others in the next all-reduce."""
        every = self.cfg.run.checkpoint_every
        due = bool(every) and time.monotonic() - last_save > every * 60
        signum, due = self.world.max([self.stop_signal or 0, int(due)])
        return signum, bool(due)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """One optimizer step on the batch; returns its mean loss, or None when a non-finite loss
        was skipped. With --grad-accum K the batch goes through forward/backward in K equal
        micro-batches whose gradients add up: each loss is its micro-batch's mean divided by K,
        so the step is the whole batch's (BatchNorm aside, which sees the micro-batches)."""
        cfg, step = self.cfg, self.state.step
        factor = lr_factor(cfg.optim.schedule, step, self.state.total_steps,
                           warmup_steps=round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self.optimizer.zero_grad(set_to_none=True)
        parts = cfg.optim.grad_accum
        loss = torch.zeros((), device=self.device)
        for i, (x_part, y_part) in enumerate(zip(x.chunk(parts), y.chunk(parts))):
            # Under DDP the gradients are all-reduced once, in the last micro-batch's backward.
            with self.no_sync() if i < parts - 1 else contextlib.nullcontext():
                with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                    enabled=self.autocast_dtype is not None):
                    logits = self.train_model(x_part)
                part = self.built.loss_fn(logits.float(), y_part) / parts
                if step + 1 in self.inject_nan:  # test hook: VISIONRECIPE_INJECT_NAN_AT_STEP
                    part = part * float("nan")
                (self.scaler.scale(part) if self.scaler is not None else part).backward()
            loss += part.detach()
        if not self.loss_is_finite(loss):
            return None  # the gradients are dropped by the next step's zero_grad
        if self.scaler is not None and cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped (and the scale lowered) when a gradient overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, step)
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
        state = self.state
        value = loss.item() if not torch.isfinite(loss) else "non-finite in another process"
        if self.cfg.optim.on_nan == "skip":
            state.nan_skips += 1
            warn(f"warning: loss {value} at step {state.step + 1}, batch skipped ({state.nan_skips} so far)")
            return False
        # Nothing is saved: the last checkpoint (state.pt, last and best model) predates the NaN.
        raise TrainingStopped(f"loss became {value} at step {state.step + 1} (epoch {state.epoch + 1}); "
                              f"the last good checkpoint is kept in {self.run_dir}; "
                              "try a lower --lr, --grad-clip, or --on-nan skip")

    def end_epoch(self, train_loss: float, images_per_second: float) -> None:
        """Validate, then record the epoch: its line, metrics.jsonl, the models and state.pt."""
        cfg, state = self.cfg, self.state
        eval_start = time.perf_counter()
        model = self.ema.model if self.ema is not None else self.model
        if self.recalibration is not None:  # in place: the EMA copies the live buffers again at its next update
            recalibrate_batchnorm(unwrap(model), self.built.images[self.recalibration], self.mean, self.std,
                                  device=self.device, channels_last=self.cfg.run.channels_last)
        metrics = self.evaluate(model, self.eval_split)
        state.epoch += 1
        state.position = 0
        state.loss_sum.zero_()
        state.seen = 0
        state.elapsed += time.perf_counter() - eval_start  # the budget covers validation too
        if cfg.optim.time_budget:
            plan = replan_budget(cfg.optim.time_budget, state.elapsed, state.step, state.epoch, self.steps_per_epoch,
                                 costs=self.step_costs(), planned=state.total_steps)
            state.total_steps, state.epochs = self.world.broadcast(plan)
        score = metrics["accuracy"]
        final = state.epoch >= state.epochs or state.step >= state.total_steps  # the schedule's planned end
        keep = keeps(score, state.best_acc, len(self.eval_split.labels), final and self.cfg.model.task != "multilabel")
        if keep:
            state.kept_epoch = state.epoch
        if score > state.best_acc:
            state.best_epoch = state.epoch
        best = max(state.best_acc, score)
        state.stopped = self.stop_reason(score, best)
        record = epoch_record(epoch=state.epoch, step=state.step, train_loss=train_loss, val=metrics,
                              lr=cfg.optim.lr * max(g["lr"] for g in self.optimizer.param_groups) / max(self.base_lrs),
                              images_per_second=images_per_second,
                              elapsed=state.elapsed, nan_skips=state.nan_skips, stopped=state.stopped)
        log_epoch(record, state.epochs, self.eval_name, lr_unit(cfg))
        if state.stopped:
            log(f"stopped early: {state.stopped}; the model of epoch {state.kept_epoch} is kept")
        if self.world.is_main:
            write_epoch(self.run_dir, record, self.tensorboard, self.tracker)
            meta = {**self.built.meta, "epoch": state.epoch, f"{self.eval_name}_acc": score}
            save_models(self.run_dir, model, meta, keep)
        state.best_acc = best
        self.save_state()
        if self.on_epoch is not None:
            self.on_epoch(record)

    def stop_reason(self, score: float, best: float) -> str:
        """Why the run stops at this epoch's end (--stop-at, --patience), or "" to go on; every
        process decides alike, from the same gathered validation metrics."""
        optim, state, name = self.cfg.optim, self.state, f"{self.eval_name}_acc"
        if state.epoch >= state.epochs or state.step >= state.total_steps:
            return ""  # the planned end: nothing stopped it early
        if optim.stop_at is not None and score >= optim.stop_at:
            return f"{name} {score:.4f} reached --stop-at {optim.stop_at:g}"
        if optim.patience and state.epoch - state.best_epoch >= optim.patience:
            return f"no better {name} for {optim.patience} epochs (best {best:.4f} at epoch {state.best_epoch})"
        return ""

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
        """Score the test split once (best model), then draw the report from those very numbers."""
        if not self.world.is_main:
            return None  # rank 0 scores the test split and reports; this machine may lack the run dir
        run = Run(self.run_dir)
        if not self.evaluate_test:
            return run
        result, logits = run.evaluate(split="test", device=str(self.device), dataset=self.data, return_logits=True)
        score = f"mAP {100 * result['mAP']:.2f}%" if "mAP" in result else f"accuracy {100 * result['accuracy']:.2f}%"
        log(f"test {score} ({result['num_images']:,} images, "
            f"the model of epoch {self.state.kept_epoch}, kept by {self.eval_name}_acc), training {self.state.elapsed:.1f}s; run directory {self.run_dir}")
        if self.cfg.run.report:
            try:
                from visionrecipe.evaluate.report import write_report
            except ImportError:  # matplotlib is an extra
                pass
            else:
                write_report(self.run_dir, dataset=self.data, scored=(result, logits))
        from visionrecipe.deploy.card import write_model_card

        write_model_card(self.run_dir)  # MODEL_CARD.md, from the files just written (eval.json included)
        return run

    # --- state.pt ----------------------------------------------------------------------------
    def save_state(self) -> None:
        """state.pt for an exact resume (every process calls it; rank 0 writes)."""
        write_state(self.run_dir / "state.pt", self.state, self.world,
                    weights=learned_state(self.model, self.optimizer, self.ema, self.scaler),
                    data=self.data_fingerprint)

    def restore(self, saved: dict) -> None:
        """Continue from state.pt (read in setup). The data order needs no state: it is a function
        of (seed, epoch), and `position` says how many global batches of the epoch are done."""
        source = str(self.run_dir / "state.pt")
        check_data(self.run_dir, saved, self.data_fingerprint)  # first: other data makes another model too
        load_learned_state(saved, self.model, self.optimizer, self.ema, source, self.scaler)
        self.state = state = TrainState.from_saved(saved, self.world, self.device)
        restore_rng(saved, self.world, self.device)
        if self.world.is_main:
            # metrics.jsonl may hold epochs written after this state was saved (or a torn line): drop them.
            truncate_metrics(self.run_dir, state.epoch)
            if self.changed:
                path = self.run_dir / "config.yaml"
                save_config(load_config(path, self.changed), path)
        changes = "".join(f", {k} now {v}" for k, v in self.changed.items())
        if not self.finished:  # else fit says the run is finished, in one line
            log(f"resuming {self.run_dir} at epoch {state.epoch + 1}, step {state.step}/{state.total_steps}"
                f" ({state.position}/{self.steps_per_epoch} of the epoch){changes}")

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


def nan_injection_steps() -> set[int]:
    """Test hook: VISIONRECIPE_INJECT_NAN_AT_STEP=12 (or 12,15) makes the loss of those steps
    (1-based) NaN, so the NaN handling can be tested on a healthy run. Read once, here."""
    value = os.environ.get("VISIONRECIPE_INJECT_NAN_AT_STEP", "")
    try:
        return {int(part) for part in value.split(",") if part.strip()}
    except ValueError:
        raise VisionRecipeError(f"VISIONRECIPE_INJECT_NAN_AT_STEP={value!r}: expected step numbers, "
                                "e.g. 12,15") from None
