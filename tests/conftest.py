"""Shared fixtures: one small trained digits run reused by many tests (training is the slow part)."""

from __future__ import annotations

import os
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
