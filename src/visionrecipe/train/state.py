"""Exact resume: what may change on `--resume`, and the state.pt that makes it bit for bit.

    run_dir, cfg, changed = plan_resume("runs/x", {"progress": False})
    save_state(trainer); load_state(trainer, ckpt.read_resume_file(path))

The data order needs no saved state (a function of seed and epoch) and augmentation is seeded by
the step; everything else that moves (weights, optimizer moments, EMA, the epoch's partial loss,
every process's RNG, the position in the epoch) is in state.pt. So is a fingerprint of the data
(`data_fingerprint`): a folder that gained or lost images would re-split and re-normalise, and the
"resumed" run would silently be another one, so a resume on changed data is refused.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from visionrecipe.models import checkpoint as ckpt
from visionrecipe.config import Config, apply_overrides, save_config
from visionrecipe.errors import VisionRecipeError
from visionrecipe.rundir import truncate_metrics
from visionrecipe.system import log, warn


# Settings a resume may change: how the run is watched and where it runs, plus the two remedies
# a NaN stop suggests. Anything else (epochs, lr, batch size, ...) would silently make a
# different run than the one planned, so it is refused.
RESUME_SETTINGS = {"progress", "device", "threads", "report", "checkpoint_every", "tensorboard", "compile",
                   "on_nan", "grad_clip"}


def plan_resume(run_dir: str | Path, settings: dict) -> tuple[Path, Config, dict]:
    """(run dir, its config with the changes a resume may make, those changes); others are refused."""
    from visionrecipe.config import coerce, load_config

    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.yaml").is_file():
        raise VisionRecipeError(f"cannot resume {run_dir}: no config.yaml (not a run directory)")
    cfg = load_config(run_dir / "config.yaml")
    planned = cfg.flat()
    changed = {}
    for name, value in settings.items():
        value = coerce(name, value) if name in planned else value  # CLI values arrive as strings
        if name == "out" and value is not None and Path(value).expanduser() == run_dir:
            continue
        if value == planned.get(name):
            continue
        if name not in RESUME_SETTINGS:
            raise VisionRecipeError(
                f"cannot change {name} on resume (the run was planned with {planned.get(name)!r}); "
                "start a new run, or use --weights to fine-tune from it")
        changed[name] = value
    apply_overrides(cfg, changed)
    cfg.run.out = str(run_dir)  # the run may have been moved since it started
    return run_dir, cfg, changed


# Every key a resume reads; a state.pt without one is refused with a one-line error.
STATE_KEYS = ("model", "optimizer", "ema", "step", "epoch", "position", "total_steps", "epochs", "best_acc",
              "elapsed", "nan_skips", "loss_sum", "seen", "world_size", "rng")


def data_fingerprint(data, mean: list[float], std: list[float]) -> dict:
    """What must not change under a resume: the classes, the images of each split (count, and a
    hash of their paths and labels) and the train split's mean/std, which moves when pixels do.

        fingerprint = data_fingerprint(trainer.data, *channel_stats(trainer.data.train.images))
    """
    splits = {"train": data.train, "val": data.val, "test": data.test}
    digest = hashlib.sha256()
    for name, split in splits.items():
        if split is not None:
            digest.update(f"{name}\0{len(split)}\0".encode())
            digest.update("\0".join(split.paths or []).encode("utf-8", "surrogateescape"))
            digest.update(split.labels.cpu().numpy().tobytes())
    return {"classes": list(data.classes), "images": {k: len(v) for k, v in splits.items() if v is not None},
            "files": digest.hexdigest(), "mean": list(mean), "std": list(std)}


def data_changes(saved: dict, now: dict) -> list[str]:
    """How `now` differs from `saved` (data_fingerprint dicts), in words; empty when it does not."""
    if saved["classes"] != now["classes"]:
        added = [c for c in now["classes"] if c not in saved["classes"]]
        removed = [c for c in saved["classes"] if c not in now["classes"]]
        if added or removed:
            return [f"classes added: {added or 'none'}, removed: {removed or 'none'}"]
        return ["the classes are in another order"]
    counts = [f"{name} images {saved['images'].get(name, 0)} → {now['images'].get(name, 0)}"
              for name in ("train", "val", "test") if saved["images"].get(name, 0) != now["images"].get(name, 0)]
    if counts:
        return counts
    if saved["files"] != now["files"]:
        return ["other images, or images in other splits or classes"]
    stats = saved["mean"] + saved["std"], now["mean"] + now["std"]
    if len(stats[0]) != len(stats[1]) or not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(*stats)):
        return ["the pixels of the training images (their mean/std)"]
    return []


def check_data(trainer, state: dict) -> None:
    """Refuse to resume on data that changed since state.pt was written (a one-line error)."""
    if "data" not in state:  # written before fingerprints existed
        warn(f"note: {trainer.run_dir / 'state.pt'} holds no data fingerprint; resuming without checking the data")
        return
    changes = data_changes(state["data"], trainer.data_fingerprint)
    if changes:
        raise VisionRecipeError(
            f"cannot resume {trainer.run_dir}: its data changed since the run started ({'; '.join(changes)}); "
            "restore the data, or start a new run")


def rng_state(device: torch.device) -> dict:
    """This process's global RNG (dropout draws from it; augmentation has its own generator)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def save_state(trainer) -> None:
    """state.pt: all a resume needs to continue bit for bit, mid-epoch included. Every process
    calls this (the epoch's partial loss and each process's RNG are gathered); rank 0 writes."""
    partial = trainer.world.sum(torch.stack([trainer.loss_sum, torch.tensor(float(trainer.seen), device=trainer.device)]))
    rng = trainer.world.gather(rng_state(trainer.device))
    if not trainer.world.is_main:
        return
    state = {
        "model": ckpt.unwrap(trainer.model).state_dict(),
        "optimizer": trainer.optimizer.state_dict(), "ema": trainer.ema.model.state_dict() if trainer.ema else None,
        "step": trainer.step, "epoch": trainer.epoch, "position": trainer.position, "total_steps": trainer.total_steps,
        "epochs": trainer.cfg.optim.epochs, "best_acc": trainer.best_acc, "elapsed": trainer.elapsed,
        "nan_skips": trainer.nan_skips, "loss_sum": partial[0].cpu(), "seen": int(partial[1]),
        "world_size": trainer.world.size, "rng": rng, "data": trainer.data_fingerprint,
    }
    ckpt.write_resume_file(trainer.run_dir / "state.pt", state)

def load_state(trainer, state: dict) -> None:
    """Continue from `state` (read in setup). The data order needs no state: it is a function
    of (seed, epoch), and `position` says how many global batches of the epoch are done."""
    check_data(trainer, state)  # first: other data also makes a model of another shape
    source = str(trainer.run_dir / "state.pt")
    ckpt.load_into(trainer.model, state["model"], source)
    if (state["ema"] is None) != (trainer.ema is None):
        raise VisionRecipeError(f"{source} does not match the run's config.yaml (ema)")
    if trainer.ema is not None:
        ckpt.load_into(trainer.ema.model, state["ema"], source)
    try:
        trainer.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as exc:
        raise VisionRecipeError(f"{source} does not match the optimizer of config.yaml ({exc})") from None
    for key in ("step", "epoch", "position", "total_steps", "best_acc", "elapsed", "nan_skips"):
        setattr(trainer, key, state[key])
    trainer.cfg.optim.epochs = state["epochs"]  # a --time-budget run re-plans its epochs
    # The partial sum goes to rank 0 alone: summed over processes at the epoch's end it counts once.
    if trainer.world.is_main:
        trainer.loss_sum = state["loss_sum"].to(trainer.device)
        trainer.seen = state["seen"]
    if trainer.world.rank < len(state["rng"]):
        mine = state["rng"][trainer.world.rank]
        torch.set_rng_state(mine["torch"])
        if mine["cuda"] is not None and trainer.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], trainer.device)
    if state["world_size"] != trainer.world.size:
        warn(f"note: resuming a {state['world_size']}-process run with {trainer.world.size}: same batches "
             "and data order, but dropout draws differ from an uninterrupted run")
    if trainer.world.is_main:
        # metrics.jsonl may hold epochs written after this state was saved (or a torn line): drop them.
        truncate_metrics(trainer.run_dir, trainer.epoch)
        if trainer.changed:
            from visionrecipe.config import load_config

            save_config(load_config(trainer.run_dir / "config.yaml", trainer.changed), trainer.run_dir / "config.yaml")
    changes = "".join(f", {k} now {v}" for k, v in trainer.changed.items())
    log(f"resuming {trainer.run_dir} at epoch {trainer.epoch + 1}, step {trainer.step}/{trainer.total_steps}"
        f" ({trainer.position}/{trainer.steps_per_epoch} of the epoch){changes}")
