"""Bad input gets one line on stderr and exit status 2; no tracebacks."""

from __future__ import annotations

import pytest
from PIL import Image

from conftest import run_cli


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("args, words", [
    (["train", "--data", "/no/such/folder"], ["/no/such/folder"]),
    (["train", "--data", "digits", "--model", "resnt18"], ["resnt18", "resnet18"]),
    (["train", "--data", "digits", "--optimizer", "sgdd"], ["optimizer", "sgdd"]),
    (["train", "--data", "digits", "--epochs", "0"], ["epochs"]),
    (["train", "--data", "digits", "--batch-size", "-3"], ["batch_size"]),
    (["train", "--data", "digits", "--lr", "abc"], ["lr", "abc"]),
    (["evaluate", "/no/such/run"], ["/no/such/run"]),
    (["predict", "/no/such/run", "x.png"], ["/no/such/run"]),
    (["train", "--config", "/no/such.yaml"], ["/no/such.yaml"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_bad_input_one_line(args, words, tmp_path):
    assert_one_line_error(run_cli(*args, cwd=tmp_path), *words)


def test_empty_folder_and_class_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("train", "--data", tmp_path / "empty", cwd=tmp_path), "empty")
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    (data / "dog").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(data / "cat" / f"{i}.png")
    assert_one_line_error(run_cli("train", "--data", data, cwd=tmp_path), "dog")


def test_existing_run_not_overwritten(digits_run, tmp_path):
    before = (digits_run / "model.safetensors").read_bytes()
    proc = run_cli("train", "--data", "digits", "--out", digits_run, "--epochs", "1", cwd=tmp_path)
    assert_one_line_error(proc, "--overwrite")
    assert (digits_run / "model.safetensors").read_bytes() == before


def test_checkpoint_mismatch(digits_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(digits_run, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert_one_line_error(run_cli("evaluate", broken), "model.safetensors")


def test_predict_prints_topk(digits_run, tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    Image.fromarray((digits.images[0] * 255 / 16).round().astype("uint8"), mode="L").save(tmp_path / "zero.png")
    (tmp_path / "bad.png").write_bytes(b"")
    proc = run_cli("predict", digits_run, tmp_path / "zero.png", tmp_path / "bad.png", "--topk", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    rows = json.loads(proc.stdout)
    assert rows[0]["top"][0]["class"] == "0" and len(rows[0]["top"]) == 3
    assert "error" in rows[1]


def test_models_lists_and_layer_table():
    proc = run_cli("models")
    assert proc.returncode == 0 and "seedcnn" in proc.stdout and "resnet18_cifar" in proc.stdout
    proc = run_cli("models", "seedcnn", "--image-size", "32")
    assert proc.returncode == 0
    # the seed's network at 32×32: the flatten is 128·8·8, so fc1 holds 8192·1024 + 1024 parameters
    assert "8,389,632" in proc.stdout and "8,475,530" in proc.stdout
