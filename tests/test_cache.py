"""Tests for the disk-backed record cache (data/cache.py, data/records.py) on small PNG folders:
every cached result is compared with a fresh decode into an empty data_dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionrecipe.data import cache, decode, load_dataset, read_image
from visionrecipe.errors import VisionRecipeError


def write_png(path: Path, seed: int, size=(8, 8)) -> None:  # square: stored as it is
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def make_folder(root: Path, per_class: int, classes=("a", "b")) -> None:
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_png(root / name / f"{i:04d}.png", seed=1000 * c + i)


@pytest.fixture
def decodes(monkeypatch):
    """Counts files decoded (the loader runs in-process below MIN_FILES_FOR_POOL files)."""
    calls = []
    real = decode._decode_array

    def counting(source, image_size, channels):
        calls.append(source)
        return real(source, image_size, channels)

    monkeypatch.setattr(decode, "_decode_array", counting)
    return calls


def load(root: Path, data_dir: Path, **kwargs):
    kwargs.setdefault("val_fraction", 0)
    return load_dataset(str(root), data_dir=data_dir, progress=False, **kwargs)


def assert_same(cached, fresh) -> None:
    for a, b in ((cached.train, fresh.train), (cached.test, fresh.test)):
        assert a.paths == b.paths and torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)


def fresh_decode(root: Path, tmp_path: Path, **kwargs):
    return load(root, tmp_path / f"fresh{time.monotonic_ns()}", **kwargs)


def cache_dir(data_dir: Path) -> Path:
    (found,) = (data_dir / "records").iterdir()
    return found


def test_incremental_add_change_remove(tmp_path, decodes):
    root, data_dir = tmp_path / "d", tmp_path / "cache"
    make_folder(root, per_class=10)
    first = load(root, data_dir)
    assert len(decodes) == 20 and not first.from_cache
    for image, path in zip(first.train.images, first.train.paths):
        assert torch.equal(image, read_image(path, image_size=None))
    decodes.clear()
    assert load(root, data_dir).from_cache and not decodes

    write_png(root / "a" / "0003x.png", seed=7)  # sorts in the middle of class a
    write_png(root / "b" / "9999.png", seed=8)
    added = load(root, data_dir)
    assert sorted(Path(p).name for p in decodes) == ["0003x.png", "9999.png"]
    decodes.clear()
    assert_same(added, fresh_decode(root, tmp_path))

    changed = root / "b" / "0005.png"
    write_png(changed, seed=99)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    decodes.clear()
    again = load(root, data_dir)
    assert decodes == [str(changed)]
    assert_same(again, fresh_decode(root, tmp_path))

    (root / "a" / "0001.png").unlink()
    decodes.clear()
    removed = load(root, data_dir)
    assert not decodes and str(root / "a" / "0001.png") not in removed.train.paths + removed.test.paths
    assert_same(removed, fresh_decode(root, tmp_path))

    # Most of the records dead: the live ones are rewritten, in listing order, into a new file.
    before = {p.name for p in cache_dir(data_dir).glob("data-*.u8")}
    for path in sorted((root / "b").glob("*.png"))[:-1] + sorted((root / "a").glob("*.png"))[:-2]:
        path.unlink()
    decodes.clear()
    compacted = load(root, data_dir)
    after = {p.name for p in cache_dir(data_dir).glob("data-*.u8")}
    assert not decodes and len(after) == 1 and after != before
    assert_same(compacted, fresh_decode(root, tmp_path))
    manifest = json.loads((cache_dir(data_dir) / "manifest.json").read_text())
    assert manifest["records"] == len(manifest["files"]) == 3


def test_unreadable_files_are_remembered_then_redecoded_when_fixed(tmp_path, decodes):
    root, data_dir = tmp_path / "d", tmp_path / "cache"
    make_folder(root, per_class=4)
    (root / "a" / "0001x.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="0001x.png"):
        load(root, data_dir)
    decodes.clear()
    with pytest.warns(UserWarning, match="0001x.png"):
        assert load(root, data_dir).from_cache and not decodes  # still reported, never re-read
    write_png(root / "a" / "0001x.png", seed=5)
    fixed = load(root, data_dir)
    assert [Path(p).name for p in decodes] == ["0001x.png"] and not fixed.skipped
    assert_same(fixed, fresh_decode(root, tmp_path))


KILLED_LOADER = """
import sys, time
from visionrecipe.data import decode, load_dataset
decode.CHUNK_FILES = 10
real = decode._decode_array
def slow(*args):
    time.sleep(0.01)  # 400 files take 4 s: time for the test to kill it mid-way
    return real(*args)
decode._decode_array = slow
load_dataset(sys.argv[1], data_dir=sys.argv[2], val_fraction=0, progress=False)
"""


def test_sigkill_during_decoding_resumes_where_it_stopped(tmp_path, decodes):
    root, data_dir = tmp_path / "d", tmp_path / "cache"
    make_folder(root, per_class=200)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_LOADER, str(root), str(data_dir)])
    try:
        deadline = time.monotonic() + 60
        journal = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = list((data_dir / "records").glob("*/journal.jsonl"))
            if found and len(found[0].read_text().splitlines()) >= 3:  # three chunks committed
                journal = found[0]
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert journal is not None, "the loader finished or never committed a chunk"
    assert not (journal.parent / "manifest.json").exists()  # killed before the first full commit

    resumed = load(root, data_dir)
    assert 0 < len(decodes) <= 400 - 30  # only what was never committed
    assert not journal.exists()  # folded into the manifest
    decodes.clear()
    assert_same(resumed, fresh_decode(root, tmp_path))


def test_plan_that_cannot_fit_is_a_one_line_error(tmp_path, decodes, monkeypatch):
    root = tmp_path / "d"
    make_folder(root, per_class=5)
    monkeypatch.setattr(cache, "free_bytes", lambda path: 10 * 2**20)  # a 10 MB disk
    with pytest.raises(VisionRecipeError, match=r"10 images of 64x64 need 0\.00 GB, only 0\.01 GB free") as info:
        load(root, tmp_path / "cache", image_size=64)
    assert "\n" not in str(info.value) and not decodes  # refused before decoding anything
    monkeypatch.setattr(cache, "MIN_FREE", 0)
    monkeypatch.setattr(cache, "free_bytes", lambda path: 10 * 3 * 8 * 8 - 1)  # no size: from the PNG headers
    with pytest.raises(VisionRecipeError, match=r"10 images of 8x8 need"):
        load(root, tmp_path / "cache")


def test_opening_a_cache_maps_the_records(tmp_path):
    root, data_dir = tmp_path / "d", tmp_path / "cache"
    make_folder(root / "train", per_class=50)
    make_folder(root / "test", per_class=5)
    load(root, data_dir)
    data = load(root, data_dir)
    assert data.from_cache
    # The train split is a view of the record file's mapping, not a copy read into memory.
    address = data.train.images.data_ptr()
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    mapped = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            mapped.append(fields[5] if len(fields) == 6 else "")
    assert mapped and mapped[0].startswith(str(cache_dir(data_dir))) and mapped[0].endswith(".u8")
    assert torch.equal(data.train.images.to("cpu", copy=True), fresh_decode(root, tmp_path).train.images)
    data.train.images[0] += 1  # copy-on-write: a caller's in-place op never reaches the file
    assert_same(load(root, data_dir), fresh_decode(root, tmp_path))


def test_new_image_of_another_size_is_stored_at_the_folder_size(tmp_path):
    root, data_dir = tmp_path / "d", tmp_path / "cache"
    make_folder(root, per_class=3)
    first = load(root, data_dir)
    write_png(root / "b" / "big.png", seed=1, size=(9, 9))
    data = load(root, data_dir)  # the sampled headers still agree: the folder's size stays
    assert data.train.images.shape[1:] == first.train.images.shape[1:]
    assert len(data.train) + len(data.test) == len(first.train) + len(first.test) + 1


CONCURRENT_LOADER = """
import sys, hashlib
from visionrecipe.data import load_dataset
d = load_dataset(sys.argv[1], data_dir=sys.argv[2], val_fraction=0, progress=False)
print(hashlib.sha256(d.train.images.numpy().tobytes() + d.test.images.numpy().tobytes()).hexdigest())
"""


def test_two_processes_at_once_agree(tmp_path):
    root, data_dir = tmp_path / "d", tmp_path / "cache"
    make_folder(root, per_class=40)
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_LOADER, str(root), str(data_dir)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert outputs[0] == outputs[1]
    manifest = json.loads((cache_dir(data_dir) / "manifest.json").read_text())
    assert manifest["records"] == 80  # decoded once: the second waited on the lock, then read
