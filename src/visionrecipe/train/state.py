"""Exact resume: what may change on `--resume`, and the state.pt that makes it bit for bit.

    run_dir, cfg, changed = plan_resume("runs/x", {"progress": False})
    write_state(run_dir / "state.pt", state, world, weights=learned_state(model, optimizer, ema), data=fingerprint)
    saved = read_state(run_dir / "state.pt")                # a damaged file is a one-line error
    load_learned_state(saved, model, optimizer, ema, source); state = TrainState.from_saved(saved, world, device)

The data order needs no saved state (a function of seed and epoch) and augmentation is seeded by
the step; everything else that moves (weights, optimizer moments, EMA, the epoch's partial loss,
every process's RNG, the position in the epoch) is in state.pt. So is a fingerprint of the data
(`data_fingerprint`): a folder that gained or lost images would re-split and re-normalise, and the
"resumed" run would silently be another one, so a resume on changed data is refused.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from visionrecipe.config import Config, apply_overrides
from visionrecipe.errors import VisionRecipeError
from visionrecipe.models import checkpoint as ckpt
from visionrecipe.system import warn


# Settings a resume may change: how the run is watched and where it runs, plus the two remedies
# a NaN stop suggests. Anything else (epochs, lr, batch size, ...) would silently make a
# different run than the one planned, so it is refused.
RESUME_SETTINGS = {"progress", "device", "threads", "report", "checkpoint_every", "tensorboard", "compile",
                   "on_nan", "grad_clip", "mlflow", "cache"}


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
    # The run may have been moved since it started: out is where it is now.
    return run_dir, apply_overrides(cfg, {**changed, "out": str(run_dir)}), changed


@dataclass
class TrainState:
    """Where a run is, besides its weights, optimizer moments and RNG: saved and loaded whole."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs done
    position: int = 0  # global batches of the current epoch done
    total_steps: int = 0  # the schedule's length; a time budget re-plans it
    epochs: int = 0  # epochs planned: --epochs, or what fits in --time-budget (config.yaml keeps the bound)
    best_acc: float = -1.0  # best validation score so far (mAP for multilabel)
    best_epoch: int = 0  # the epoch that scored best_acc (--patience counts from it)
    kept_epoch: int = 0  # the epoch in model.safetensors (callbacks.keeps: the best, or at the end the last)
    stopped: str = ""  # why the run stopped before its planned end (--patience, --stop-at); "" while it goes on
    elapsed: float = 0.0  # training seconds, summed across resumes
    nan_skips: int = 0
    loss_sum: torch.Tensor | None = None  # this epoch's loss × images so far, this process, on the device
    seen: int = 0  # this epoch's images with a finite loss so far, this process

    def counters(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("loss_sum", "seen")}

    @classmethod
    def from_saved(cls, saved: dict, world, device: torch.device) -> "TrainState":
        """The state of state.pt. The epoch's partial loss goes to rank 0 alone: summed over the
        processes at the epoch's end, it then counts once."""
        state = cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved and f.name not in ("loss_sum", "seen")})
        if "kept_epoch" not in saved:  # a state.pt written before kept_epoch was: the best epoch was kept
            state.kept_epoch = state.best_epoch
        state.loss_sum = saved["loss_sum"].to(device) if world.is_main else torch.zeros((), device=device)
        state.seen = saved["seen"] if world.is_main else 0
        return state


# Every key a resume reads; a state.pt without one is refused with a one-line error.
STATE_KEYS = ("model", "optimizer", "ema", "scaler", *(f.name for f in fields(TrainState) if f.name != "kept_epoch"),
              "world_size", "rng")


def read_state(path: Path) -> dict:
    """state.pt as a dict (weights_only): a damaged or incomplete file is a one-line error."""
    return ckpt.read_resume_file(path, STATE_KEYS)


def learned_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema, scaler=None) -> dict:
    """The state_dicts of what training learns: the weights, the optimizer's moments, the EMA, and
    fp16's gradient scaler (its scale moves with the gradients: an exact resume needs it)."""
    return {"model": ckpt.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.model.state_dict() if ema is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None}


def write_state(path: Path, state: TrainState, world, *, weights: dict, data: dict) -> None:
    """state.pt: all a resume needs to continue bit for bit, mid-epoch included. Every process
    calls this (the epoch's partial loss and each process's RNG are gathered); rank 0 writes.
    `weights` is learned_state(...), `data` the data_fingerprint."""
    device = state.loss_sum.device
    partial = world.sum(torch.stack([state.loss_sum, torch.tensor(float(state.seen), device=device)]))
    rng = world.gather(rng_state(device))
    if not world.is_main:
        return
    saved = {**weights, **state.counters(), "loss_sum": partial[0].cpu(),
             "seen": int(partial[1]), "world_size": world.size, "rng": rng, "data": data}
    ckpt.write_resume_file(path, saved)


def load_learned_state(saved: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema,
                       source: str, scaler=None) -> None:
    """Load state.pt's weights, optimizer moments, EMA and gradient scaler; a mismatch with the
    config is one line."""
    ckpt.load_into(model, saved["model"], source)
    for name, mine in (("ema", ema), ("scaler", scaler)):
        if (saved[name] is None) != (mine is None):
            raise VisionRecipeError(f"{source} does not match the run's config.yaml ({name})")
    if ema is not None:
        ckpt.load_into(ema.model, saved["ema"], source)
    if scaler is not None:
        scaler.load_state_dict(saved["scaler"])
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError) as exc:
        raise VisionRecipeError(f"{source} does not match the optimizer of config.yaml ({exc})") from None


def rng_state(device: torch.device) -> dict:
    """This process's global RNG (dropout draws from it; augmentation has its own generator)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(saved: dict, world, device: torch.device) -> None:
    """Each process takes back its own RNG; with more processes than saved, the new ones keep theirs."""
    if world.rank < len(saved["rng"]):
        mine = saved["rng"][world.rank]
        torch.set_rng_state(mine["torch"])
        if mine["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], device)
    if saved["world_size"] != world.size:
        warn(f"note: resuming a {saved['world_size']}-process run with {world.size}: same batches "
             "and data order, but dropout draws differ from an uninterrupted run")


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


def check_data(run_dir: Path, saved: dict, fingerprint: dict) -> None:
    """Refuse to resume on data that changed since state.pt was written (a one-line error)."""
    if "data" not in saved:  # written before fingerprints existed
        warn(f"note: {run_dir / 'state.pt'} holds no data fingerprint; resuming without checking the data")
        return
    changes = data_changes(saved["data"], fingerprint)
    if changes:
        raise VisionRecipeError(
            f"cannot resume {run_dir}: its data changed since the run started ({'; '.join(changes)}); "
            "restore the data, or start a new run")
