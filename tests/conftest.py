"""Shared fixtures: one small trained digits run reused by many tests (training is the slow part)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh process, as a user runs it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "visionrecipe", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=full_env)


def run_cli_with_file_limit(*args, max_bytes: int, timeout=600) -> subprocess.CompletedProcess:
    """run_cli under `ulimit -f`: writing a file past `max_bytes` fails with EFBIG (Python ignores
    SIGXFSZ), as a full disk fails a write."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return subprocess.run([sys.executable, "-m", "visionrecipe", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=limit)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """seedcnn trained on digits for a few epochs: the run directory."""
    from visionrecipe import train

    out = tmp_path_factory.mktemp("runs") / "digits"
    train(data="digits", model="seedcnn", epochs=6, out=str(out), progress=False, report=False,
          data_dir=str(tmp_path_factory.mktemp("cache")))
    return out


# --- exact resume ------------------------------------------------------------------------------------
TIMING = ("img_per_s", "elapsed_s")  # metrics.jsonl's wall-clock fields: all else must match on resume


def metrics_without_timing(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def assert_same_tensors(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    import torch

    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), f"{a.name}: {key} differs"


def assert_interrupted_run_resumes_exactly(settings: dict, tmp_path: Path, before_resume=None) -> Path:
    """Trains `settings` whole, then again interrupted (SIGINT at the end of the first epoch: it stops
    one step into the second), resumed; the resumed run's metrics and weights equal the whole run's,
    bit for bit. `before_resume(run_dir)`: checks on the interrupted run. Returns the resumed run."""
    from visionrecipe import train
    from visionrecipe.config import Config
    from visionrecipe.train.loop import Trainer, TrainingInterrupted, resume

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    train(**settings, out=str(reference))
    trainer = Trainer(Config.from_dict({**settings, "out": str(killed)}),
                      on_epoch=lambda record: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    if before_resume is not None:
        before_resume(killed)
    resume(killed)
    assert metrics_without_timing(killed) == metrics_without_timing(reference)
    for name in ("model.safetensors", "last.safetensors"):
        assert_same_tensors(killed / name, reference / name)
    return killed
