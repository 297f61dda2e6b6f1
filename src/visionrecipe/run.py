"""A run directory and what can be done with it.

    run = Run("runs/digits")
    run.metrics            # the epochs of metrics.jsonl
    run.evaluate()         # test-split metrics; writes eval.json
    run.predict(["a.png"]) # top-k classes per image

Layout: config.yaml, metrics.jsonl, model.safetensors + model.json (best epoch),
last.safetensors + last.json (last epoch), state.pt (resume), eval.json, report.html.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .errors import VisionRecipeError


class Run:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if not (self.path / "model.json").is_file():
            raise VisionRecipeError(f"{self.path} is not a run directory with a trained model (model.json missing)")

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def meta(self) -> dict:
        return json.loads((self.path / "model.json").read_text())

    @property
    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def evaluate(self, split: str = "test", **kwargs) -> dict:
        from .evaluate import evaluate_run

        return evaluate_run(self.path, split=split, **kwargs)

    def predict(self, images, topk: int = 5, **kwargs) -> list[dict]:
        from .predict import predict

        return predict(self.path, images, topk=topk, **kwargs)


def default_run_dir(data: str, model: str) -> Path:
    name = Path(data.rstrip("/")).name or "data"
    return Path("runs") / f"{name}-{model.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(cfg, resume: bool = False) -> Path:
    """Create (or check) the output directory before any work: writable, room for checkpoints,
    and never overwriting an existing run without --overwrite. Only rank 0 checks and writes;
    under torchrun the others just learn the path."""
    from .system import is_main_process

    out = Path(cfg.run.out).expanduser() if cfg.run.out else default_run_dir(cfg.data.data, cfg.model.model)
    cfg.run.out = str(out)
    if not is_main_process():
        return out
    if resume:
        # A kill during an atomic write leaves its temporary file behind; the target is intact.
        for stale in out.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    else:
        if out.exists() and not out.is_dir():
            raise VisionRecipeError(f"output path {out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()):
            if not cfg.run.overwrite:
                raise VisionRecipeError(f"run directory {out} already exists; pass --overwrite to replace it "
                                        f"or --resume {out} to continue it")
            if (out / "config.yaml").exists() or (out / "model.json").exists():
                shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise VisionRecipeError(f"output directory {out} is not writable ({exc.strerror or exc})") from None
    free = shutil.disk_usage(out).free
    if free < 64 * 2**20:
        raise VisionRecipeError(f"only {free / 2**20:.0f} MiB free at {out}: too little room for checkpoints")
    return out


def ensure_room(out: Path, nbytes: int) -> None:
    """Checkpoints need room: the best, the last and the resume state, with a margin."""
    free = shutil.disk_usage(out).free
    if free < 2 * nbytes:
        raise VisionRecipeError(f"only {free / 2**20:.0f} MiB free at {out}: checkpoints need about "
                                f"{2 * nbytes / 2**20:.0f} MiB")
