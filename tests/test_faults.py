"""Faults: kills, signals, NaN losses, bad output directories, damaged checkpoints, bad images.

The reference for resume is an uninterrupted run: a run killed with SIGKILL mid-epoch and
resumed must end with the same weights and metrics, bit for bit (CPU, --deterministic).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from visionrecipe import train
from visionrecipe.cli import main
from visionrecipe.errors import VisionRecipeError
from visionrecipe.train.loop import Trainer, TrainingInterrupted

from conftest import assert_interrupted_run_resumes_exactly, assert_same_tensors, metrics_without_timing, run_cli



def digits_args(out: Path, *extra) -> list[str]:
    """A small deterministic digits run: 40 steps per epoch, so a kill lands mid-epoch easily."""
    return ["train", "--data", "digits", "--model", "seedcnn", "--batch-size", "32", "--deterministic",
            "--no-progress", "--no-report", "--out", str(out), *map(str, extra)]


def cli(capsys, *args) -> tuple[int, list[str]]:
    """The CLI in this process (no interpreter start-up): exit status and stderr lines."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def start_cli(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "visionrecipe", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def read_state(path: Path) -> dict | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return None


# ------------------------------------------------------------------------------------ resume
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # --checkpoint-every takes fractions of a minute: 0.0005 min = 30 ms, about every step.
    victim = start_cli(*digits_args(killed, "--epochs", 3, "--checkpoint-every", 0.0005))
    state_path, seen_mtime, position = killed / "state.pt", 0, None
    deadline = time.monotonic() + 120
    while victim.poll() is None and time.monotonic() < deadline:
        mtime = state_path.stat().st_mtime_ns if state_path.exists() else 0
        if mtime != seen_mtime:
            seen_mtime, state = mtime, read_state(state_path)
            if state and state["epoch"] >= 1 and 0 < state["position"] < 40:
                victim.send_signal(signal.SIGKILL)
                position = (state["epoch"], state["position"])
                break
        time.sleep(0.005)
    victim.communicate(timeout=60)
    assert position is not None, "the run ended before a mid-epoch checkpoint after epoch 1 was seen"
    assert victim.returncode == -signal.SIGKILL
    assert main(digits_args(reference, "--epochs", 3)) == 0  # uninterrupted, same settings

    state = read_state(state_path)
    assert (state["epoch"], state["position"]) >= position and state["position"] > 0  # mid-epoch
    assert len(metrics_without_timing(killed)) == state["epoch"]
    proc = run_cli("train", "--resume", killed, "--checkpoint-every", 60)  # how often: may change
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout and f"epoch {state['epoch'] + 1}" in proc.stdout

    assert metrics_without_timing(killed) == metrics_without_timing(reference)
    for name in ("model.safetensors", "last.safetensors"):
        assert_same_tensors(killed / name, reference / name)
    ref_eval, resumed_eval = (json.loads((run / "eval.json").read_text()) for run in (reference, killed))
    assert resumed_eval["confusion_matrix"] == ref_eval["confusion_matrix"]
    assert resumed_eval["loss"] == ref_eval["loss"]
    assert not list(killed.glob(".*.tmp"))  # a write cut short by the kill is cleaned up


def test_changing_epochs_on_resume_is_refused(digits_run, capsys):
    assert cli(capsys, "train", "--resume", digits_run, "--epochs", 9) == (2, [
        "error: cannot change epochs on resume (the run was planned with 6); "
        "start a new run, or use --weights to fine-tune from it"])


def test_sigterm_finishes_step_saves_and_prints_resume_command(tmp_path):
    out = tmp_path / "run"
    proc = start_cli(*digits_args(out, "--epochs", 200))
    for line in proc.stdout:  # handlers are in place once training prints its first epoch
        if line.startswith("Epoch 1/"):
            break
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == f"interrupted; resume with: visionrecipe train --resume {out}"
    state = read_state(out / "state.pt")
    assert state["epoch"] >= 1 and state["step"] == 40 * state["epoch"] + state["position"]
    assert state["position"] > 0  # saved at the interrupted step, not only at the last epoch end


def test_sigint_in_process_saves_state_and_raises_with_exit_code_130(tmp_path):
    from visionrecipe.config import Config

    cfg = Config.from_dict({"data": "digits", "model": "seedcnn", "epochs": 50, "batch_size": 32,
                            "out": str(tmp_path / "run"), "progress": False, "report": False})
    trainer = Trainer(cfg, on_epoch=lambda record: os.kill(os.getpid(), signal.SIGINT))
    # What SIGINT did before: Python's default_int_handler, or SIG_IGN when pytest was started in the
    # background by a shell without job control.
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as caught:
        trainer.fit()
    assert caught.value.exit_code == 130 and "--resume" in str(caught.value)
    state = read_state(tmp_path / "run" / "state.pt")
    assert (state["epoch"], state["position"], state["step"]) == (1, 1, 41)  # the step after the signal
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


# --------------------------------------------------------------------------------------- NaN
def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("VISIONRECIPE_INJECT_NAN_AT_STEP", "50")
    assert cli(capsys, *digits_args(out, "--epochs", 3)) == (1, [
        f"error: loss became nan at step 50 (epoch 2); the last good checkpoint is kept in {out}; "
        "try a lower --lr, --grad-clip, or --on-nan skip"])
    monkeypatch.delenv("VISIONRECIPE_INJECT_NAN_AT_STEP")
    state = read_state(out / "state.pt")
    assert (state["epoch"], state["step"], state["position"]) == (1, 40, 0)
    assert len(metrics_without_timing(out)) == 1
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    from visionrecipe.evaluate.scoring import evaluate_run

    assert evaluate_run(out, write=False)["num_images"] == 359  # the kept checkpoint is usable


def test_on_nan_skip_counts_skipped_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONRECIPE_INJECT_NAN_AT_STEP", "3,5")
    run = train(data="digits", model="seedcnn", epochs=1, batch_size=32, on_nan="skip", grad_clip=1.0,
                out=str(tmp_path / "run"), progress=False, report=False)
    assert [m.get("nan_skips") for m in run.metrics] == [2]
    assert all(np.isfinite(m["train_loss"]) for m in run.metrics)
    assert run.evaluate()["accuracy"] > 0.5


# ---------------------------------------------------------------------------- output directory
def test_unwritable_output_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # root may write anywhere, but not under a regular file
    proc = run_cli(*digits_args(blocker / "run", "--epochs", 1))  # a real process: the user's view
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: output directory {blocker / 'run'} is not writable (Not a directory)"]
    assert "Epoch" not in proc.stdout and "training" not in proc.stdout


def test_too_little_disk_room_fails_before_training(tmp_path, monkeypatch):
    full = shutil._ntuple_diskusage(total=10 * 2**30, used=10 * 2**30 - 2**20, free=2**20)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: full)
    with pytest.raises(VisionRecipeError, match="MiB free .* too little room for checkpoints"):
        train(data="digits", model="seedcnn", epochs=1, out=str(tmp_path / "run"), progress=False, report=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_existing_run_is_not_overwritten(digits_run, capsys):
    before = (digits_run / "model.safetensors").stat().st_mtime_ns
    code, err = cli(capsys, *digits_args(digits_run, "--epochs", 1))
    assert code == 2 and len(err) == 1 and "already exists; pass --overwrite" in err[0]
    assert (digits_run / "model.safetensors").stat().st_mtime_ns == before


# --------------------------------------------------------------------------------- checkpoints
def test_corrupt_state_on_resume_is_one_line_error(digits_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    (run / "state.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    assert cli(capsys, "train", "--resume", run) == (2, [
        f"error: {run / 'state.pt'} is not a readable visionrecipe checkpoint (RuntimeError)"])
    torch.save({"format": "visionrecipe", "model": {}}, run / "state.pt")  # readable, but not a resume state
    code, err = cli(capsys, "train", "--resume", run)
    assert code == 2 and err[0].startswith(f"error: {run / 'state.pt'} is an incomplete or older visionrecipe")


def test_weights_of_another_architecture_are_one_line_error(digits_run, tmp_path, capsys):
    from visionrecipe.models import create_model

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    other = create_model("fastnet", 10, in_channels=1, image_size=8)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(run / "model.safetensors"))
    code, err = cli(capsys, "evaluate", run)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {run / 'model.safetensors'} does not match the architecture (missing: ")


# ---------------------------------------------------------------------------------------- data
def test_train_on_folder_with_bad_files_finishes_and_names_them(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path / "images"
    for i, (image, label) in enumerate(zip(digits.images[:300], digits.target[:300])):
        path = root / str(label) / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 16).clip(0, 255).astype(np.uint8)).resize((16, 16)).convert("RGB").save(path)
    bad = {"empty.png": b"", "notes.jpg": b"this is text, not a JPEG",
           "truncated.png": (root / "1" / f"{list(digits.target[:300]).index(1)}.png").read_bytes()[:60]}
    for name, data in bad.items():
        (root / "3" / name).write_bytes(data)
    proc = run_cli("train", "--data", root, "--model", "seedcnn", "--epochs", 1, "--no-progress", "--no-report",
                   "--out", tmp_path / "run", "--data-dir", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 3 unreadable image(s)" in proc.stderr
    for name in bad:
        assert name in proc.stderr
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["num_images"] > 0


# ------------------------------------------------------------------- the run directory, guarded
def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes: 'nothing was deleted or changed' is one comparison."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_run(digits_run: Path, where: Path) -> Path:
    shutil.copytree(digits_run, where)
    (where / ".visionrecipe.lock").unlink(missing_ok=True)  # a copy is not locked by anyone
    return where


def test_overwrite_never_empties_a_folder_that_is_not_a_run(tmp_path, capsys):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "config.yaml").write_text("lr: 0.1\n")  # looks like a run to a careless check
    (proj / "src" / "main.py").write_text("print('my work')\n")
    before = snapshot(proj)
    for data in (tmp_path / "does-not-exist", "digits"):
        code, err = cli(capsys, "train", "--data", data, "--model", "seedcnn", "--epochs", 1, "--no-progress",
                        "--out", proj, "--overwrite")
        assert (code, err) == (2, [f"error: --overwrite replaces only run directories made by visionrecipe train, "
                                   f"and {proj} has no .visionrecipe-run marker; choose another --out"])
        assert snapshot(proj) == before


def test_overwrite_with_bad_data_deletes_nothing(digits_run, tmp_path, capsys):
    run = copy_run(digits_run, tmp_path / "run")
    before = snapshot(run)
    code, err = cli(capsys, "train", "--data", tmp_path / "does-not-exist", "--out", run, "--overwrite")
    assert code == 2 and len(err) == 1 and "does-not-exist" in err[0]
    assert snapshot(run) == before


def test_overwrite_refuses_a_run_holding_a_users_file(digits_run, tmp_path, capsys):
    run = copy_run(digits_run, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    assert cli(capsys, *digits_args(run, "--epochs", 1, "--overwrite")) == (2, [
        f"error: --overwrite deletes only a run's own files, and {run} also holds notes.txt; "
        "move it away or choose another --out"])
    assert snapshot(run) == before


def test_overwrite_refuses_the_current_and_home_folders_and_the_datas(digits_run, tmp_path, capsys, monkeypatch):
    run = copy_run(digits_run, tmp_path / "run")
    images = run / "images"  # a folder dataset kept inside the run directory
    for label in ("a", "b"):
        (images / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(images / label / f"{i}.png")
    before = snapshot(run)
    monkeypatch.chdir(run)
    code, err = cli(capsys, *digits_args(Path("."), "--epochs", 1, "--overwrite"))
    assert (code, err) == (2, ["error: --overwrite will not clear .: it is the current folder; choose another --out"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(run))
    code, err = cli(capsys, *digits_args(run, "--epochs", 1, "--overwrite"))
    assert (code, err) == (2, [f"error: --overwrite will not clear {run}: it is your home folder; choose another --out"])
    monkeypatch.delenv("HOME")
    code, err = cli(capsys, "train", "--data", images, "--out", run, "--overwrite")
    assert (code, err) == (2, [f"error: --overwrite will not clear {run}: it holds the data {images}; "
                               "choose another --out"])
    assert snapshot(run) == before


def test_overwrite_replaces_a_previous_run(digits_run, tmp_path, capsys):
    run = copy_run(digits_run, tmp_path / "run")
    (run / "report.html").write_text("<html>old</html>")
    (run / ".model.safetensors.x1y2z3.tmp").write_bytes(b"left by a kill")
    code, _ = cli(capsys, *digits_args(run, "--epochs", 1, "--overwrite"))
    assert code == 0
    assert not (run / "report.html").exists() and not list(run.glob(".*.tmp"))  # the old run's files are gone
    assert len(metrics_without_timing(run)) == 1 and (run / ".visionrecipe-run").is_file()


def test_second_train_into_a_running_runs_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    first_args = digits_args(out, "--epochs", 200)
    first = start_cli(*first_args)
    try:
        for line in first.stdout:
            if line.startswith("Epoch 1/"):
                break
        holder = f"pid {first.pid} (visionrecipe {' '.join(map(str, first_args))})"
        second = run_cli(*digits_args(out, "--epochs", 1, "--overwrite"))
        assert second.returncode == 2 and second.stderr.strip().splitlines() == [
            f"error: run directory {out} is in use by {holder}; wait for it to finish or choose another directory"]
        code, err = cli(capsys, "evaluate", out)  # evaluate writes eval.json into the run: refused too
        assert code == 2 and err == [f"error: run directory {out} is in use by {holder}; wait for it to finish "
                                     "or choose another directory"]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    epochs = [row["epoch"] for row in metrics_without_timing(out)]
    assert epochs == list(range(1, len(epochs) + 1)) and epochs  # one writer: 1, 2, 3, never 1, 1, 2


def test_resume_checks_the_config_file_like_flags(digits_run, tmp_path, capsys):
    run = copy_run(digits_run, tmp_path / "run")
    other = tmp_path / "other.yaml"
    other.write_text("optim:\n  epochs: 9\n")
    assert cli(capsys, "train", "--resume", run, "--config", other) == (2, [
        "error: cannot change epochs on resume (the run was planned with 6); "
        "start a new run, or use --weights to fine-tune from it"])
    code, err = cli(capsys, "train", "--resume", run, "--config", run / "config.yaml")  # the run's own: no change
    assert code == 0, err


def test_write_failure_is_one_line_error_and_keeps_earlier_files(tmp_path):
    from conftest import assert_interrupted_run_resumes_exactly, assert_same_tensors, metrics_without_timing, run_cli_with_file_limit

    out = tmp_path / "run"
    # 200 KB: config.yaml and metrics.jsonl fit, the 2.4 MB weights do not (as on a full disk).
    proc = run_cli_with_file_limit(*digits_args(out, "--epochs", 2), max_bytes=200_000)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: could not write {out / 'last.safetensors'}: File too large"]
    assert [row["epoch"] for row in metrics_without_timing(out)] == [1]
    assert "seedcnn" in (out / "config.yaml").read_text()
    assert not (out / "last.safetensors").exists() and not list(out.glob(".*.tmp"))  # no partial file


# ------------------------------------------------------------------------- precision (issue 13)
def test_fp16_resume_matches_uninterrupted_run_scaler_included(tmp_path):
    """--precision fp16 trains with a gradient scaler whose scale and growth counter join state.pt:
    interrupted mid-epoch and resumed, the run ends as an uninterrupted one, bit for bit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images[:120], digits.target[:120])):
        path = tmp_path / "images" / str(label) / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 16).clip(0, 255).astype(np.uint8)).save(path)
    # fp16 on a CPU is slow (few fp16 kernels): a tiny fastnet (whitening, BatchNorm, EMA) keeps this short
    settings = {"data": str(tmp_path / "images"), "data_dir": str(tmp_path / "cache"), "model": "fastnet",
                "width": 0.125, "depth": 2, "epochs": 2, "batch_size": 16, "precision": "fp16",
                "deterministic": True, "progress": False, "report": False}

    def interrupted(killed):
        state = read_state(killed / "state.pt")
        assert (state["epoch"], state["position"]) == (1, 1)
        assert state["scaler"]["scale"] < 2.0**16  # fp16 overflowed and the scaler backed off: a resume must know

    killed = assert_interrupted_run_resumes_exactly(settings, tmp_path, before_resume=interrupted)
    reference = tmp_path / "reference"
    assert read_state(killed / "state.pt")["scaler"] == read_state(reference / "state.pt")["scaler"]
