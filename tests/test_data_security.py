"""Hostile and changing data: crafted CIFAR pickles, symlink loops, escaping manifest paths, and data
that changed under a run before --resume (issue 14, items 1, 7, 8 and 10)."""

from __future__ import annotations

import os
import pickle
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from visionrecipe.cli import main
from visionrecipe.data import load_dataset

from test_data import assert_one_line_error, load, make_classes, reference, write_cifar, write_image


def cli(capsys, *args) -> tuple[int, list[str]]:
    """The CLI in this process: exit status and stderr lines."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def train_args(data, out: Path, *extra) -> list:
    return ["train", "--data", data, "--model", "seedcnn", "--batch-size", 4, "--no-progress", "--no-report",
            "--device", "cpu", "--out", out, *extra]


# ---------------------------------------------------------------------------- 1: CIFAR pickles


class _RunsACommand:
    """Unpickling this calls os.system: the payload of a crafted batches.meta."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_crafted_cifar_pickle_runs_nothing_and_is_one_line_error(tmp_path, capsys):
    folder = tmp_path / "evil" / "cifar-10-batches-py"
    write_cifar(folder, "cifar10")
    marker = tmp_path / "pwned"
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": _RunsACommand(f"touch {shlex.quote(str(marker))}")}, f, protocol=2)

    code, err = cli(capsys, *train_args(folder, tmp_path / "run", "--epochs", 1))
    assert not marker.exists()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: refusing CIFAR file {folder / 'batches.meta'}: it would call ")
    assert "system" in err[0]
    # The data batches are checked the same way, not only the metadata file.
    write_cifar(tmp_path / "ok", "cifar10")
    os.replace(tmp_path / "ok" / "batches.meta", folder / "batches.meta")
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _RunsACommand(f"touch {shlex.quote(str(marker))}"), b"labels": []}, f)
    assert_one_line_error("refusing CIFAR file .*data_batch_3", load_dataset, str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("payload, match", [
    (42, "holds a int, expected a dict"),
    ([b"cat", b"dog"], "holds a list, expected a dict"),
    ({b"label_names": 7}, "'label_names' entry that is not a list of names"),
    (b"cat", "holds a bytes, expected a dict"),
])
def test_cifar_meta_that_is_not_a_dict_of_names_is_one_line_error(tmp_path, payload, match):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, "cifar10")
    (folder / "batches.meta").write_bytes(pickle.dumps(payload, protocol=2))
    assert_one_line_error(match, load_dataset, str(folder))


def test_cifar_batch_with_object_or_scalar_arrays_is_one_line_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, "cifar10")
    rows = np.zeros((2, 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": rows.astype(object), b"labels": [0, 1]}, f, protocol=2)
    assert_one_line_error("'data' entry that is not an array of numbers", load_dataset, str(folder))
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": rows, b"labels": 5}, f, protocol=2)
    assert_one_line_error("has 2 images but 1 labels", load_dataset, str(folder))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickles_of_every_protocol_still_load(tmp_path, protocol):
    """Python 2's files (protocol 2), and copies re-saved by Python 3 with newer protocols."""
    folder = tmp_path / "cifar-10-batches-py"
    written = write_cifar(folder, "cifar10")
    for name, record in written.items():
        record = {**record, b"filenames": [b"x.png"] * len(record[b"labels"]), b"batch_label": b"batch"}
        (folder / name).write_bytes(pickle.dumps(record, protocol=protocol))
    data = load_dataset(str(folder), val_fraction=0)
    assert data.classes[:2] == ["class0", "class1"] and len(data.train) == 20
    assert data.test.labels.tolist() == written["test_batch"][b"labels"]


# ---------------------------------------------------------------------------- 8: symlink loops


def test_symlink_loop_lists_each_image_once_with_its_own_label(tmp_path):
    root = tmp_path / "d"
    make_classes(root, per_class=3, classes=["a", "b"], extras=False)
    expected = reference(root)  # ImageFolder before the loop exists
    (root / "a" / "loop").symlink_to("..")  # a/loop/b/... would be labelled a, a/loop/a/... counted twice
    with pytest.warns(UserWarning, match="not following symlink .*loop"):
        data = load(root, tmp_path, val_fraction=0)
    paths = data.train.paths + data.test.paths
    assert len(paths) == len(set(os.path.realpath(p) for p in paths)) == 6
    labels = dict(zip(expected[3], expected[1].tolist()))
    for split in (data.train, data.test):
        assert [labels[os.path.realpath(p)] for p in split.paths] == split.labels.tolist()


def test_two_symlink_loops_finish(tmp_path):
    """With two links back to the root, os.walk branched twice per level: it never finished."""
    import subprocess
    import sys

    root = tmp_path / "d"
    make_classes(root, per_class=3, classes=["a", "b"], extras=False)
    (root / "a" / "up").symlink_to("..")
    (root / "a" / "up2").symlink_to("..")
    (root / "b" / "x").symlink_to("../a")  # and a cycle through a sibling: b/x/... → a, a/y → b
    (root / "a" / "y").symlink_to("../b")
    script = ("import sys, warnings; warnings.simplefilter('ignore'); from visionrecipe.data import load_dataset; "
              "d = load_dataset(sys.argv[1], data_dir=sys.argv[2], val_fraction=0, progress=False); "
              "print(len(d.train) + len(d.test))")
    proc = subprocess.run([sys.executable, "-c", script, str(root), str(tmp_path / "cache")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # a lists a's 3 and b's 3 (through y, as ImageFolder would); b lists its own 3, then a's
    # through x, but never a's link back to b again.
    assert int(proc.stdout) == 12


def test_symlinked_class_folder_outside_the_tree_still_works(tmp_path):
    root, outside = tmp_path / "d", tmp_path / "elsewhere"
    make_classes(root, per_class=3, classes=["a", "b"], extras=False)
    make_classes(outside, per_class=4, classes=["c", "more"], seed=40, extras=False)
    (root / "c").symlink_to(outside / "c")  # a whole class kept elsewhere
    (root / "a" / "extra").symlink_to(outside / "more")  # and more images for a
    classes, labels, _, paths = reference(root)
    data = load(root, tmp_path, val_fraction=0)
    assert data.classes == classes == ["a", "b", "c"]
    got = sorted(zip((os.path.realpath(p) for p in data.train.paths + data.test.paths),
                     data.train.labels.tolist() + data.test.labels.tolist()))
    assert got == sorted(zip(paths, labels.tolist())) and len(got) == 14


def test_class_folder_that_links_to_its_parent_is_one_line_error(tmp_path):
    root = tmp_path / "d"
    make_classes(root, per_class=3, classes=["a", "b"], extras=False)
    (root / "z").symlink_to(".")
    assert_one_line_error("class folder .*z is a link to .*which holds it", load, root, tmp_path)


# ---------------------------------------------------------------------------- 7: resume on changed data


class _Crash(Exception):
    """Raised after the first epoch: the run stops with state.pt written, as after a kill."""


def _crash(record):
    raise _Crash


@pytest.fixture
def stopped_run(tmp_path):
    """A 2-epoch run on a tiny folder that stopped after epoch 1, and a pristine copy of its data."""
    from visionrecipe.config import Config
    from visionrecipe.train.loop import Trainer

    root = tmp_path / "pics"
    make_classes(root, per_class=6, classes=["a", "b"], extras=False)
    shutil.copytree(root, tmp_path / "pristine")
    cfg = Config.from_dict({"data": str(root), "data_dir": str(tmp_path / "cache"), "model": "seedcnn", "image_size": 16,
                            "epochs": 2, "batch_size": 4, "device": "cpu", "out": str(tmp_path / "run"),
                            "progress": False, "report": False})
    with pytest.raises(_Crash):
        Trainer(cfg, on_epoch=_crash).fit()
    return root, tmp_path / "pristine", tmp_path / "run"


def _restore(root: Path, pristine: Path) -> None:
    shutil.rmtree(root)
    shutil.copytree(pristine, root)


def test_resume_on_changed_data_is_refused_and_on_the_same_data_continues(stopped_run, capsys):
    root, pristine, run = stopped_run
    metrics_before = (run / "metrics.jsonl").read_text()
    for change, said in [
        (lambda: [write_image(root / "a" / f"new{i}.png", seed=70 + i) for i in range(4)], "train images 8 → 12"),
        (lambda: write_image(root / "b" / "img1.bmp", seed=4242), "the pixels of the training images"),
        (lambda: os.rename(root / "b", root / "c"), "classes added: ['c'], removed: ['b']"),
        (lambda: os.rename(root / "b" / "img1.bmp", root / "a" / "img1.bmp.png"), "other images"),
    ]:
        change()
        code, err = cli(capsys, "train", "--resume", run)
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: cannot resume {run}: its data changed since the run started (")
        assert said in err[0]
        assert (run / "metrics.jsonl").read_text() == metrics_before  # nothing was touched
        _restore(root, pristine)

    code, err = cli(capsys, "train", "--resume", run)
    assert code == 0, err
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


# ---------------------------------------------------------------------------- 10: manifest paths


def _manifest_with(tmp_path: Path, outside_path: str) -> Path:
    """A manifest in d/ listing two images of its own and, last, outside_path (an image in secret/)."""
    folder = tmp_path / "d"
    write_image(folder / "img" / "1.png")
    write_image(folder / "img" / "2.png", seed=1)
    write_image(tmp_path / "secret" / "s.png", seed=2)
    (folder / "labels.csv").write_text(f"path,labels\nimg/1.png,x\nimg/2.png,y\n{outside_path},x;y\n")
    return folder / "labels.csv"


@pytest.mark.parametrize("how", ["../secret/s.png", "img/../../secret/s.png", "ABSOLUTE"])
def test_manifest_paths_outside_its_folder_are_refused_unless_allowed(tmp_path, capsys, how):
    written = str(tmp_path / "secret" / "s.png") if how == "ABSOLUTE" else how
    manifest = _manifest_with(tmp_path, written)
    message = assert_one_line_error("outside the manifest's folder", load, manifest, tmp_path)
    assert f"manifest {manifest}, row 3: {written!r} is outside" in message and "--allow-outside-paths" in message

    code, err = cli(capsys, *train_args(manifest, tmp_path / "run", "--task", "multilabel", "--epochs", 1))
    assert code == 2 and len(err) == 1 and f"row 3: {written!r}" in err[0]
    assert not (tmp_path / "run" / "model.safetensors").exists()

    from visionrecipe.cli import build_parser
    from visionrecipe.config import config_from_args

    args = build_parser().parse_args([str(a) for a in train_args(manifest, tmp_path / "run", "--allow-outside-paths")])
    assert config_from_args(args).data.allow_outside_paths is True
    data = load(manifest, tmp_path, val_fraction=0, allow_outside_paths=True)
    every = data.train.paths + data.test.paths
    assert len(every) == 3 and os.path.realpath(tmp_path / "secret" / "s.png") in map(os.path.realpath, every)


def test_manifest_paths_inside_its_folder_are_fine(tmp_path):
    manifest = _manifest_with(tmp_path, str(tmp_path / "d" / "img" / ".." / "img" / "1.png"))  # absolute, inside
    (tmp_path / "d" / "labels.csv").write_text((tmp_path / "d" / "labels.csv").read_text() + "./img/2.png,x\n")
    data = load(manifest, tmp_path, val_fraction=0)
    assert len(data.train) + len(data.test) == 4
