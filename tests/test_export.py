"""export: ONNX and TorchScript files agree with PyTorch (the reference) on the whole digits test split."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli
from visionrecipe.cli import main
from visionrecipe.errors import VisionRecipeError
from visionrecipe.deploy.export import export_model


def _test_split(run_dir):
    """The run's full test split and the logits `evaluate` computes for it."""
    from visionrecipe.models.checkpoint import load_model
    from visionrecipe.data import load_dataset
    from visionrecipe.evaluate.scoring import predict_logits

    model, meta = load_model(run_dir)
    test = load_dataset("digits", image_size=meta["input_size"][1], progress=False).test
    reference = predict_logits(model, test.images, meta["mean"], meta["std"], tta=meta.get("tta", False))
    return test, meta, reference.numpy()


def _normalized(images, meta):
    from visionrecipe.deploy.onnx_runtime import normalize

    return normalize(images.numpy(), meta["mean"], meta["std"])


def _assert_agrees(reference, exported):
    assert exported.shape == reference.shape
    assert np.abs(exported - reference).max() <= 1e-4
    assert (exported.argmax(1) == reference.argmax(1)).all()


def test_onnx_export_agrees_with_pytorch(digits_run, tmp_path):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "digits.onnx"
    result = export_model(digits_run, out=out)
    assert result["path"] == str(out) and out.is_file()
    assert result["max_abs_diff"] <= 1e-4 and result["top1_agreement"] == 1.0
    assert "test images of digits" in result["verified_on"]

    test, meta, reference = _test_split(digits_run)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = _normalized(test.images, meta)
    _assert_agrees(reference, session.run(None, {"input": x})[0])  # the whole split in one batch
    one = session.run(None, {"input": x[:1]})[0]  # the batch axis is dynamic
    np.testing.assert_allclose(one, reference[:1], atol=1e-4)

    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["classes"]) == meta["classes"]
    assert json.loads(props["input_size"]) == meta["input_size"]
    assert json.loads(props["mean"]) == pytest.approx(meta["mean"])
    assert json.loads(props["std"]) == pytest.approx(meta["std"])
    assert json.loads(props["tta"]) is False and props["architecture"] == "seedcnn"


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_agrees_with_pytorch(digits_run, tmp_path):
    out = tmp_path / "digits.pt"
    result = export_model(digits_run, format="torchscript", out=out)
    assert result["max_abs_diff"] <= 1e-4

    test, meta, reference = _test_split(digits_run)
    extra = {"meta.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    described = json.loads(extra["meta.json"])
    assert described["classes"] == meta["classes"] and described["input_size"] == meta["input_size"]
    with torch.no_grad():
        exported = loaded(torch.from_numpy(_normalized(test.images, meta))).numpy()
    _assert_agrees(reference, exported)


def test_tta_is_inside_the_exported_graph(digits_run, tmp_path):
    """With tta the exported logits are the mirror average, i.e. what evaluate scores."""
    run = tmp_path / "tta_run"
    shutil.copytree(digits_run, run)
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "tta": True}))

    from visionrecipe.deploy.onnx_runtime import OnnxClassifier

    out = tmp_path / "tta.onnx"
    export_model(run, out=out)
    model = OnnxClassifier(out)
    assert model.meta["tta"] is True
    test, meta, reference = _test_split(run)
    _assert_agrees(reference, model.logits(test.images.numpy()))
    _, _, plain = _test_split(digits_run)
    assert np.abs(reference - plain).max() > 1e-3  # the mirror really changes the logits


def test_disagreement_fails_and_leaves_nothing(digits_run, tmp_path, monkeypatch):
    from visionrecipe.deploy import export

    real = export._run_onnx
    monkeypatch.setattr(export, "_run_onnx", lambda path, x: real(path, x) + 0.01)
    with pytest.raises(VisionRecipeError, match="disagrees with PyTorch.*nothing written"):
        export_model(digits_run, out=tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def test_random_inputs_when_the_data_is_gone(digits_run, tmp_path):
    run = tmp_path / "orphan"
    shutil.copytree(digits_run, run)
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "data": str(tmp_path / "deleted_dataset")}))
    result = export_model(run, format="torchscript")
    assert result["path"] == str(run / "model.torchscript.pt") and "random images" in result["verified_on"]
    assert result["accuracy_pytorch"] is None


def test_cli_quantize_reports_accuracy_change(digits_run, tmp_path, capsys):
    out = tmp_path / "digits.int8.onnx"
    assert main(["export", str(digits_run), "--quantize", "dynamic", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    quantized = result["quantized"]
    assert quantized["bytes_int8"] < quantized["bytes_fp32"] / 2
    assert abs(quantized["accuracy_change"]) < 0.05 and quantized["top1_agreement"] > 0.9

    import onnx

    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["quantization"].startswith("dynamic int8") and json.loads(props["input_size"]) == [1, 8, 8]


def test_bad_requests_are_one_line_errors(digits_run, tmp_path):
    done = run_cli("export", digits_run, "--format", "torchscript", "--quantize", "dynamic")  # the real CLI
    assert done.returncode == 2 and done.stderr.strip() == "error: --quantize dynamic needs --format onnx"
    with pytest.raises(VisionRecipeError, match="expected a run directory"):
        export_model(tmp_path / "nothing")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(VisionRecipeError, match="is a file"):
        export_model(digits_run, out=tmp_path / "a_file" / "model.onnx")
    with pytest.raises(VisionRecipeError, match="unknown export format"):
        export_model(digits_run, format="tflite")
    with pytest.raises(VisionRecipeError, match="unsupported ONNX opset 99"):
        export_model(digits_run, opset=99)


def test_write_failure_is_one_line_and_leaves_no_partial_file(digits_run, tmp_path):
    from conftest import run_cli_with_file_limit

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    before = sorted(p.name for p in run.iterdir())
    proc = run_cli_with_file_limit("export", run, max_bytes=500_000)  # the 2.4 MB graph does not fit
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: could not write {run / 'model.onnx'}: File too large"]
    assert sorted(p.name for p in run.iterdir()) == before  # no model.onnx, no temporary file


def test_out_in_a_new_folder_creates_it(digits_run, tmp_path):
    done = run_cli("export", digits_run, "--out", tmp_path / "exports" / "v1" / "model.onnx")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "exports" / "v1" / "model.onnx").stat().st_size > 0
