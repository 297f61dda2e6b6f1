"""The streamed path (--cache disk): splits stay in the record cache (MappedImages) and train/feed.py
reads each batch ahead of the step. Every test compares it with the resident path (--cache memory)
on a tiny generated PNG folder: the same batches, weights, metrics and resume, bit for bit."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from visionrecipe import train
from visionrecipe.cli import main
from visionrecipe.data import cache, channel_stats, load_dataset
from visionrecipe.data.cache import MappedImages, cat_images
from visionrecipe.errors import TrainingInterrupted
from visionrecipe.train.augment import BatchAugment
from visionrecipe.train.feed import StreamFeed, own_rows
from visionrecipe.train.loop import Trainer, resume

from test_cache import make_folder

TIMING = {"img_per_s", "elapsed_s"}
SETTINGS = dict(model="seedcnn", epochs=2, batch_size=16, seed=3, progress=False, report=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes of 60 random 8×8 PNGs, pooled: the test and validation carves are scattered rows."""
    root = tmp_path_factory.mktemp("streaming") / "pets"
    make_folder(root, 60, classes=("a", "b", "c"))
    return root


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def assert_same_run(a: Path, b: Path) -> None:
    assert metrics(a) == metrics(b)
    for name in ("model.safetensors", "last.safetensors"):
        left, right = load_file(str(a / name)), load_file(str(b / name))
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left), name
    left, right = (json.loads((run / "eval.json").read_text()) for run in (a, b))
    assert left["confusion_matrix"] == right["confusion_matrix"] and left["loss"] == right["loss"]


# --- MappedImages: the split on disk ----------------------------------------------------------------
def test_mapped_images_read_what_the_map_holds(folder, tmp_path):
    data = load_dataset(str(folder), data_dir=tmp_path, cache="disk")
    resident = load_dataset(str(folder), data_dir=tmp_path, cache="memory")
    assert data.cache == "disk" and resident.cache == "memory"
    for name in ("train", "val", "test"):
        mapped, tensor = getattr(data, name).images, getattr(resident, name).images
        assert isinstance(mapped, MappedImages) and isinstance(tensor, torch.Tensor)
        assert mapped.shape == tensor.shape and len(mapped) == len(tensor)
        index = torch.tensor([5, 0, 5, len(tensor) - 1, 2, -1])  # repeats, negative, unsorted
        assert torch.equal(mapped[index], tensor[index])
        assert torch.equal(mapped[3], tensor[3]) and torch.equal(mapped[2:9], tensor[2:9])
        assert torch.equal(torch.stack(list(mapped)), tensor)
        assert channel_stats(mapped) == channel_stats(tensor)
        assert torch.equal(pickle.loads(pickle.dumps(mapped))[index], tensor[index])  # another process's copy
    out = torch.full((4, *tensor.shape[1:]), 7, dtype=torch.uint8)
    data.test.images.read([4, 1], out, [3, 0])  # into chosen rows, the others untouched
    assert torch.equal(out[3], resident.test.images[4]) and torch.equal(out[0], resident.test.images[1])
    assert (out[1:3] == 7).all()
    pool = cat_images([data.train.images, data.val.images])
    assert isinstance(pool, MappedImages)  # still on disk
    assert torch.equal(pool[:], torch.cat([resident.train.images, resident.val.images]))


def test_doctor_data_checks_agree_on_disk(tmp_path):
    from visionrecipe.doctor.data_checks import data_checks

    root = tmp_path / "pets"
    make_folder(root, 30, classes=("a", "b"))
    for i in range(6):  # copies: some land in train and val (duplicates), some in test (leakage)
        shutil.copy(root / "a" / f"{i:04d}.png", root / "b" / f"copy{i}.png")
    checks = {c: data_checks(load_dataset(str(root), data_dir=tmp_path, cache=c)) for c in ("disk", "memory")}
    assert [(c.name, c.verdict, c.figure, c.values) for c in checks["disk"]] == \
        [(c.name, c.verdict, c.figure, c.values) for c in checks["memory"]]
    found = {c.name: c.values for c in checks["disk"]}
    assert found["train duplicates"]["exact"] + found["train/test leakage"]["exact"] >= 6


# --- --cache: the choice, before anything is decoded ------------------------------------------------
def test_cache_memory_that_cannot_fit_is_one_line_error_before_decoding(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cache, "free_memory", lambda: 10_000)  # 180 images of 3×8×8 are 34,560 bytes
    code = main(["train", "--data", str(folder), "--cache", "memory", "--data-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "run"), "--no-progress", "--no-report"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["error: --cache memory: 180 images of 3x8x8 are 35 kB but only 10 kB of RAM is free "
                   "(use --cache disk or auto to stream them from disk, or a smaller --image-size)"]
    assert not (tmp_path / "cache" / "records").exists()  # nothing decoded, nothing written
    assert not (tmp_path / "run").exists()


def test_auto_streams_when_memory_is_small_and_says_why(folder, tmp_path, monkeypatch, capsys):
    need = 180 * 3 * 8 * 8
    monkeypatch.setattr(cache, "free_memory", lambda: 2 * need + 1)  # fits in half the free RAM
    assert load_dataset(str(folder), data_dir=tmp_path, cache="auto").cache == "memory"
    assert load_dataset(str(folder), data_dir=tmp_path, cache="auto", device_free=need).cache == "disk"  # the GPU's
    monkeypatch.setattr(cache, "free_memory", lambda: 2 * need - 1)
    data = load_dataset(str(folder), data_dir=tmp_path, cache="auto")
    assert data.cache == "disk" and isinstance(data.train.images, MappedImages)

    # the step's own memory check (train/plan.py) sees a machine where a step fits; the data does not
    monkeypatch.setenv("VISIONRECIPE_FREE_MEMORY", str(2**30))
    train(data=str(folder), data_dir=str(tmp_path), out=str(tmp_path / "run"), **{**SETTINGS, "epochs": 1})
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("training seedcnn") and first.endswith(
        "cache disk (auto: 180 images of 3x8x8 are 35 kB, more than half the 69 kB of RAM free: "
        "read batch by batch)")
    assert "cache: disk" in (tmp_path / "run" / "config.yaml").read_text()  # resolved: what ran


def test_free_memory_respects_the_memory_cgroup(tmp_path):
    """In a container (a memory cgroup) the limit kills, not the host's free RAM: auto must see the limit."""
    v1 = Path("/sys/fs/cgroup/memory")
    root = v1 if v1.is_dir() else Path("/sys/fs/cgroup")
    group = root / f"visionrecipe-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / ("memory.limit_in_bytes" if v1.is_dir() else "memory.max")).write_text(str(512 * 2**20))
    except OSError:
        pytest.skip("cannot create a memory cgroup here (needs root and a writable cgroup fs)")
    try:
        code = "from visionrecipe.data.cache import free_memory; print(free_memory())"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        assert proc.returncode == 0, proc.stderr
        assert 0 < int(proc.stdout) <= 512 * 2**20 < cache.free_memory()
    finally:
        group.rmdir()


# --- the feed: the resident path's batches -----------------------------------------------------------
@pytest.mark.parametrize("mirror", [False, True])
def test_feed_reads_each_process_share_of_the_resident_batches(folder, tmp_path, mirror):
    mapped = load_dataset(str(folder), data_dir=tmp_path, cache="disk").train.images
    resident = mapped[:]
    order = torch.randperm(len(resident), generator=torch.Generator().manual_seed(0))
    batch, start = 16, 2
    for rank in range(2):
        feed = StreamFeed(mapped, order, batch, start=start, rank=rank, size=2, device=torch.device("cpu"),
                          mirror=mirror, ahead=2)
        rows = own_rows(batch, rank, 2, mirror)
        for position in range(start, len(order) // batch):
            index = order[position * batch:(position + 1) * batch]
            got, want = feed.take(index), resident[index]
            assert torch.equal(got[rows], want[rows])  # own rows (and their mixing partners) as resident
            others = np.setdiff1d(np.arange(batch), rows)
            assert (got[others] == 0).all()  # the other process's rows are not read
        with pytest.raises(RuntimeError):
            feed.take(order[:batch])  # past the epoch's end
        feed.close()
    assert set(own_rows(16, 0, 2, False)) | set(own_rows(16, 1, 2, False)) == set(range(16))
    assert set(own_rows(16, 0, 2, True)) == set(range(16))  # i and 15-i are on different processes


@pytest.mark.parametrize("options", [dict(crop_padding=2, flip=True), dict(crop_scale=0.35, flip=True),
                                     dict(crop_padding=1, auto_augment="trivial")])
def test_augmenting_zeroed_rows_leaves_own_rows_bit_identical(options):
    """The feed leaves the other processes' rows zero: each image's augmentation must not depend
    on the others' pixels (the random draws depend on the batch size only)."""
    try:
        augment = BatchAugment([0.5] * 3, [0.25] * 3, n_train=64, seed=0, **options)
    except TypeError:
        pytest.skip(f"BatchAugment has no {options}")
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    index = torch.arange(32)
    zeroed = images.clone()
    zeroed[1::2] = 0
    full = augment(images, index, 0, torch.Generator().manual_seed(5))
    part = augment(zeroed, index, 0, torch.Generator().manual_seed(5))
    assert torch.equal(full[0::2], part[0::2])


# --- whole runs: streamed equals resident -------------------------------------------------------------
def test_streamed_run_equals_resident_run(folder, tmp_path):
    for name in ("memory", "disk"):
        train(data=str(folder), data_dir=str(tmp_path / "cache"), cache=name, out=str(tmp_path / name), **SETTINGS)
    assert "cache: disk" in (tmp_path / "disk" / "config.yaml").read_text()
    assert_same_run(tmp_path / "disk", tmp_path / "memory")


def test_streamed_run_with_the_fast_recipe_equals_resident_run(folder, tmp_path):
    """fastnet: whitening from the first train images, translate and alternating flips."""
    settings = {**SETTINGS, "model": None, "epochs": 1}
    for name in ("memory", "disk"):
        train(data=str(folder), data_dir=str(tmp_path / "cache"), cache=name, out=str(tmp_path / name), **settings)
    assert_same_run(tmp_path / "disk", tmp_path / "memory")


def test_streamed_resume_mid_epoch_matches_uninterrupted_run(folder, tmp_path, monkeypatch):
    settings = dict(data=str(folder), data_dir=str(tmp_path / "cache"), cache="disk", **{**SETTINGS, "epochs": 3})
    train(out=str(tmp_path / "reference"), **settings)

    agree = Trainer.agree_on_events

    def stop_mid_epoch_two(self, last_save):  # as a SIGTERM after 13 steps: 9 of epoch 1, 4 of epoch 2
        return (signal.SIGTERM, False) if self.state.step == 13 else agree(self, last_save)

    monkeypatch.setattr(Trainer, "agree_on_events", stop_mid_epoch_two)
    with pytest.raises(TrainingInterrupted):
        train(out=str(tmp_path / "stopped"), **settings)
    monkeypatch.setattr(Trainer, "agree_on_events", agree)
    state = torch.load(tmp_path / "stopped" / "state.pt", weights_only=True)
    assert (state["epoch"], state["position"]) == (1, 4)  # mid-epoch: the feed starts at batch 4
    resume(tmp_path / "stopped")
    assert_same_run(tmp_path / "stopped", tmp_path / "reference")


def test_torchrun_two_streamed_processes_match_one(folder, tmp_path):
    # With MixUp/CutMix on, each process also reads the rows its own are mixed with (own_rows' mirror):
    # the path where a wrong row would show (the plain split is the unit tests' above).
    data_dir, settings = tmp_path / "cache", {**SETTINGS, "epochs": 3, "mixup": 0.2, "cutmix": 1.0}
    single = train(data=str(folder), data_dir=str(data_dir), cache="disk", out=str(tmp_path / "single"), **settings)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items() if k not in ("progress", "report")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "visionrecipe", "train", "--data", str(folder), "--data-dir", str(data_dir),
                           "--cache", "disk", "--out", str(tmp_path / "ddp"), "--no-progress", "--no-report", *flags],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout and "cache disk" in proc.stdout
    ddp = metrics(tmp_path / "ddp")
    assert [m["step"] for m in ddp] == [m["step"] for m in single.metrics]
    for mine, theirs in zip(ddp, single.metrics):  # only the all-reduce's order of sums differs
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
    ddp_eval, single_eval = (json.loads((run / "eval.json").read_text()) for run in (tmp_path / "ddp",
                                                                                     tmp_path / "single"))
    assert abs(ddp_eval["accuracy"] - single_eval["accuracy"]) <= 0.06  # one of 18 test images
