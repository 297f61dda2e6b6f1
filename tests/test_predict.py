"""predict: run directory vs exported ONNX, the torch-free decoder vs the training decoder, output formats."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from visionrecipe.errors import VisionRecipeError
from visionrecipe.data.pil import read_image_array
from visionrecipe.deploy.predict import format_rows, predict


@pytest.fixture(scope="module")
def onnx_model(digits_run, tmp_path_factory):
    from visionrecipe.deploy.export import export_model

    return export_model(digits_run, out=tmp_path_factory.mktemp("onnx") / "digits.onnx")["path"]


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    """30 test digits as PNG files plus one unreadable file."""
    from visionrecipe.data.digits import load_digits_tensors

    _, _, (images, labels) = load_digits_tensors()
    folder = tmp_path_factory.mktemp("digits_png")
    for i in range(30):
        Image.fromarray(images[i, 0].numpy()).save(folder / f"{i:02d}_label{int(labels[i])}.png")
    (folder / "zz_broken.png").write_bytes(b"not a png at all")
    return folder


# ---------------------------------------------------------------- the torch-free decoder

def _image_bytes(mode: str, size=(13, 9), fmt="PNG", **save) -> bytes:
    rng = np.random.default_rng(len(mode) * 7 + size[0])
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, size[::-1]).astype(np.uint16))
    elif mode == "1":
        img = Image.fromarray(rng.integers(0, 2, size[::-1]).astype(bool))
    else:
        base = Image.fromarray(rng.integers(0, 256, (*size[::-1], 4), dtype=np.uint8), mode="RGBA")
        img = base.convert(mode)
    buffer = io.BytesIO()
    img.save(buffer, fmt, **save)
    return buffer.getvalue()


def _exif_rotated_jpeg() -> bytes:
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (10, 16, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° on display
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", exif=exif, quality=90)
    return buffer.getvalue()


CASES = {
    "rgb": _image_bytes("RGB"), "rgba": _image_bytes("RGBA"), "palette": _image_bytes("P"),
    "grey": _image_bytes("L"), "grey-alpha": _image_bytes("LA"), "bilevel": _image_bytes("1"),
    "16-bit": _image_bytes("I;16"), "cmyk-jpeg": _image_bytes("CMYK", fmt="JPEG"),
    "exif-rotated": _exif_rotated_jpeg(), "square": _image_bytes("RGB", size=(16, 16)),
}


@pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("channels,image_size", [(3, 8), (1, 8), (3, None), (1, 16)])
def test_decoder_matches_training_decoder(name, channels, image_size, tmp_path):
    from visionrecipe.data import read_image

    data = CASES[name]
    expected = read_image(data, image_size=image_size, channels=channels).numpy()
    got = read_image_array(data, image_size=image_size, channels=channels)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    path = tmp_path / "image.bin"
    path.write_bytes(data)
    np.testing.assert_array_equal(read_image_array(path, image_size=image_size, channels=channels), expected)


@pytest.mark.parametrize("data,message", [(b"", "not an image"), (b"hello", "not an image"),
                                          (CASES["rgb"][:60], "truncated")])
def test_decoder_rejects_bad_bytes_like_the_training_decoder(data, message):
    from visionrecipe.data import read_image

    with pytest.raises(VisionRecipeError) as torch_side:
        read_image(data, image_size=8)
    with pytest.raises(VisionRecipeError) as numpy_side:
        read_image_array(data, image_size=8)
    assert str(numpy_side.value) == str(torch_side.value)
    assert str(numpy_side.value).startswith("unreadable image image bytes: ") and message in str(numpy_side.value)


# ---------------------------------------------------------------- predict

def test_onnx_predict_gives_the_run_directory_labels(digits_run, onnx_model, digit_files):
    from_run = predict(digits_run, [digit_files], topk=3, batch_size=8)
    from_onnx = predict(onnx_model, [digit_files], topk=3, batch_size=8)
    assert [r["path"] for r in from_run] == [r["path"] for r in from_onnx]
    good = [r for r in from_run if "top" in r]
    assert len(good) == 30 and from_run[-1]["path"].endswith("zz_broken.png") and "error" in from_run[-1]
    assert "error" in from_onnx[-1]
    for a, b in zip(good, from_onnx):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert abs(a["top"][0]["probability"] - b["top"][0]["probability"]) < 1e-4
    correct = sum(r["top"][0]["class"] == r["path"].rsplit("label", 1)[1][0] for r in good)
    assert correct >= 25  # a ~96% model on 30 digits


def test_onnx_predict_never_imports_torch(onnx_model, digit_files):
    code = ("import sys, json; from visionrecipe.deploy.predict import predict; "
            f"rows = predict({str(onnx_model)!r}, [{str(digit_files)!r}], topk=2); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'rows': len(rows)}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"torch": False, "rows": 31}


def test_formats_and_cli(onnx_model, digit_files, tmp_path):
    rows = predict(onnx_model, [digit_files / "00_label*.png", digit_files / "zz_broken.png"], topk=2)
    table = list(csv.DictReader(io.StringIO(format_rows(rows, "csv"))))
    assert list(table[0]) == ["path", "class_1", "probability_1", "class_2", "probability_2", "error"]
    assert table[0]["class_1"] == rows[0]["top"][0]["class"] and table[1]["error"] and not table[1]["class_1"]
    assert json.loads(format_rows(rows, "json")) == rows

    out = tmp_path / "pred.csv"
    done = run_cli("predict", onnx_model, digit_files, "--format", "csv", "--out", out, "--topk", "1",
                   "--batch-size", "4")
    assert done.returncode == 0, done.stderr
    assert len(out.read_text().splitlines()) == 1 + 31

    from visionrecipe.cli import build_parser

    assert build_parser().parse_args(["predict", "m.onnx", "a.png", "--json"]).format == "json"


def test_bad_inputs_are_one_line_errors(onnx_model, tmp_path):
    with pytest.raises(VisionRecipeError, match="input not found"):
        predict(onnx_model, [tmp_path / "missing.png"])
    with pytest.raises(VisionRecipeError, match="topk"):
        predict(onnx_model, [tmp_path], topk=0)
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"not onnx")
    (tmp_path / "a.png").write_bytes(CASES["rgb"])
    with pytest.raises(VisionRecipeError, match="not a readable ONNX model"):
        predict(fake, [tmp_path / "a.png"])


def test_multilabel_run_answers_labels_above_threshold_in_both_runtimes(digits_run, digit_files, tmp_path):
    import shutil

    from visionrecipe.deploy.export import export_model

    run = tmp_path / "multilabel"
    shutil.copytree(digits_run, run)
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "task": "multilabel", "threshold": 0.0}))
    onnx_path = export_model(run, out=tmp_path / "ml.onnx")["path"]
    from_run = predict(run, [digit_files / "0*.png"], topk=3)  # the run's threshold 0: every label
    from_onnx = predict(onnx_path, [digit_files / "0*.png"], topk=3)
    for a, b in zip(from_run, from_onnx):
        assert a["labels"] == b["labels"] == [t["class"] for t in a["top"]] and len(a["labels"]) == 10
        assert sum(t["probability"] for t in a["top"]) > 1.01  # independent sigmoids, not a softmax
    strict = predict(onnx_path, [digit_files / "0*.png"], threshold=0.9)
    assert all(t["probability"] > 0.9 for row in strict for t in row["top"])


def test_torchscript_export_predicts_as_the_run_directory(digits_run, digit_files, tmp_path):
    from visionrecipe.deploy.export import export_model

    scripted = export_model(digits_run, format="torchscript", out=tmp_path / "m.torchscript.pt")["path"]
    from_run = predict(digits_run, [digit_files], topk=3, batch_size=8, device="cpu")
    from_script = predict(scripted, [digit_files], topk=3, batch_size=8, device="cpu")
    assert [r["path"] for r in from_run] == [r["path"] for r in from_script] and "error" in from_script[-1]
    for a, b in zip(from_run[:-1], from_script[:-1]):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert abs(a["top"][0]["probability"] - b["top"][0]["probability"]) < 1e-4
    not_script = tmp_path / "other.pt"
    not_script.write_bytes(b"not a torchscript file")
    with pytest.raises(VisionRecipeError, match="not a readable TorchScript model"):
        predict(not_script, [digit_files / "00_label0.png"])


def test_predict_out_counts_predictions_and_errors_apart(onnx_model, digit_files, tmp_path):
    done = run_cli("predict", onnx_model, digit_files, "--out", tmp_path / "preds.csv", "--format", "csv")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == (f"wrote 30 predictions to {tmp_path / 'preds.csv'}; "
                                   "1 image could not be read (the error is in its row)")


def test_torchscript_metadata_round_trips_as_the_onnx_file(digits_run, onnx_model, tmp_path):
    from visionrecipe.deploy.export import export_model
    from visionrecipe.deploy.onnx_runtime import OnnxClassifier
    from visionrecipe.deploy.predict import load_classifier

    scripted = export_model(digits_run, format="torchscript", out=tmp_path / "m.pt")["path"]
    model = load_classifier(scripted, device="cpu")
    assert model.backend == "torchscript" and model.meta == OnnxClassifier(onnx_model).meta
