"""DistributedDataParallel on CPU (gloo): torchrun with 2 processes against one process.

--batch-size is the global batch, so 2 processes take the same steps on the same images with
the same learning rate as one; seedcnn has no BatchNorm or dropout, so the two runs differ only
by the order of floating-point sums in the gradient all-reduce.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from visionrecipe import train
from visionrecipe.models.checkpoint import load_model
from visionrecipe.data import load_dataset
from visionrecipe.train.launch import without_nproc, workers_status
from visionrecipe.evaluate.scoring import compute_metrics, predict_logits

SETTINGS = dict(data="digits", model="seedcnn", epochs=4, batch_size=64, seed=0)


def flags(settings: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


def torchrun(*args, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "visionrecipe", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_torchrun_two_processes_match_one_process_and_load_in_one(tmp_path):
    single = train(**SETTINGS, out=str(tmp_path / "single"), progress=False, report=False)
    proc = torchrun("train", *flags(SETTINGS), "--out", tmp_path / "ddp", "--no-progress", "--no-report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test accuracy") == 1  # only rank 0 prints
    assert "2 processes" in proc.stdout

    ddp_metrics = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ddp_metrics] == [m["step"] for m in single.metrics]  # global batch: same steps
    for mine, theirs in zip(ddp_metrics, single.metrics):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
        assert mine["lr"] == pytest.approx(theirs["lr"])
    ddp_eval = json.loads((tmp_path / "ddp" / "eval.json").read_text())
    single_eval = json.loads((tmp_path / "single" / "eval.json").read_text())
    assert abs(ddp_eval["accuracy"] - single_eval["accuracy"]) <= 0.01
    assert ddp_eval["num_images"] == single_eval["num_images"] == 359  # each test image once

    # The checkpoint loads in one process and predicts exactly what rank 0 scored.
    model, meta = load_model(tmp_path / "ddp")
    test = load_dataset("digits").test
    logits = predict_logits(model, test.images, meta["mean"], meta["std"], tta=meta["tta"])
    again = compute_metrics(logits, test.labels)
    assert again["confusion_matrix"] == ddp_eval["confusion_matrix"]
    assert again["num_correct"] == ddp_eval["num_correct"]
    state = torch.load(tmp_path / "ddp" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == ddp_metrics[-1]["step"]


def test_nproc_launcher_passes_worker_exit_status_through(digits_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    (run / "state.pt").write_bytes(b"damaged")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "visionrecipe", "train", "--resume", str(run), "--nproc", "2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2  # the workers' status, not torchrun's generic 1
    assert f"error: {run / 'state.pt'} is not a readable visionrecipe checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_nproc_launcher_checks_before_starting_processes(tmp_path, capsys):
    from visionrecipe.cli import main

    assert main(["train", "--data", "digits", "--model", "seedcnn", "--batch-size", "63", "--nproc", "2",
                 "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == "error: --batch-size 63 is the global batch and must be a multiple of --nproc 2"
    assert not (tmp_path / "run").exists()


def test_without_nproc_and_status_choice(tmp_path):
    argv = ["train", "--nproc", "2", "--data", "digits", "--nproc=4", "--npr", "3", "--epochs", "2"]
    assert without_nproc(argv) == ["train", "--data", "digits", "--epochs", "2"]
    (tmp_path / "rank-1").write_text("143")
    (tmp_path / "rank-0").write_text("0")
    assert workers_status(tmp_path, 1) == 143
    (tmp_path / "rank-0").write_text("2")
    assert workers_status(tmp_path, 1) == 2
    assert workers_status(tmp_path / "nothing", 1) == 1
