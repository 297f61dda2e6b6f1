"""The run directory's format: metrics.jsonl read back after a crash, the lock, atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from visionrecipe.errors import VisionRecipeError
from visionrecipe.rundir import (LOCK, append_metrics, atomic_write_text, is_run_file, lock, locked, read_metrics,
                                 truncate_metrics, unlock)


def test_torn_last_metrics_line_is_dropped(tmp_path):
    append_metrics(tmp_path, {"epoch": 1, "val_acc": 0.5})
    append_metrics(tmp_path, {"epoch": 2, "val_acc": 0.6})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "val_a')  # a crash in the middle of the third append
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [1, 2]
    truncate_metrics(tmp_path, 2)  # what a resume does: the file is whole again, ready to append
    append_metrics(tmp_path, {"epoch": 3, "val_acc": 0.7})
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [1, 2, 3]


def test_damaged_middle_metrics_line_is_a_one_line_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(VisionRecipeError, match=r"metrics.jsonl, line 2: not a JSON record"):
        read_metrics(tmp_path)


def test_no_metrics_file_is_no_epochs(tmp_path):
    assert read_metrics(tmp_path) == []


def test_run_files_and_their_temporary_files_are_known(tmp_path):
    for name in ("model.safetensors", ".model.safetensors.k2j_x9.tmp", ".model.onnx.123.int8.tmp", LOCK):
        assert is_run_file(tmp_path / name), name
    for name in ("main.py", ".notes.tmp", "model.safetensors.bak"):
        assert not is_run_file(tmp_path / name), name


def test_failed_atomic_write_names_the_file_and_keeps_the_old_one(tmp_path):
    import resource

    target = tmp_path / "eval.json"
    atomic_write_text(target, "old")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))  # `ulimit -f`: Python ignores SIGXFSZ, writes fail
    try:
        with pytest.raises(VisionRecipeError) as caught:
            atomic_write_text(target, "new" * 100)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(caught.value) == f"could not write {target}: File too large"
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


HOLDER = """
import sys, time
from visionrecipe.rundir import lock
lock(sys.argv[1], "visionrecipe train --out somewhere")
print("locked", flush=True)
sys.stdin.read()  # hold until the test closes stdin
"""


def test_lock_held_by_another_process_is_refused_naming_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(VisionRecipeError) as caught:
            lock(tmp_path)
        assert str(caught.value) == (f"run directory {tmp_path} is in use by pid {holder.pid} "
                                     "(visionrecipe train --out somewhere); wait for it to finish or choose "
                                     "another directory")
    finally:
        holder.communicate("", timeout=30)
    with locked(tmp_path, "visionrecipe evaluate"):  # the holder is gone: the lock is free again
        with locked(tmp_path):  # nested in one process (train, then its own evaluate): allowed
            pass
        assert (tmp_path / LOCK).read_text() == f"pid {os.getpid()} (visionrecipe evaluate)\n"
    unlock(tmp_path)  # not held any more: a no-op


def test_lock_is_released_for_the_next_process(tmp_path):
    with locked(tmp_path):
        pass
    proc = subprocess.run([sys.executable, "-c", "import sys; from visionrecipe.rundir import lock; lock(sys.argv[1])",
                           str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_metrics_records_are_json_lines(tmp_path):
    append_metrics(tmp_path, {"epoch": 1, "lr": 0.1})
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps({"epoch": 1, "lr": 0.1}) + "\n"
