"""visionrecipe push: the upload plan, checked against a fake HfApi that records its calls (no
network here), and the one-line errors (no token, HF_HUB_OFFLINE, a refused request)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("huggingface_hub")

from conftest import run_cli  # noqa: E402
from visionrecipe.deploy.hub import push  # noqa: E402
from visionrecipe.errors import VisionRecipeError  # noqa: E402


class FakeApi:
    """HfApi's two calls push makes; upload_folder keeps a copy of what the folder held."""

    def __init__(self, token="hf_test", fail: Exception | None = None):
        self.token, self.fail, self.calls, self.uploaded = token, fail, [], {}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.fail:
            raise self.fail
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        self.uploaded = {p.name: p.read_bytes() for p in Path(kwargs["folder_path"]).iterdir()}


@pytest.fixture(autouse=True)
def _online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_push_uploads_weights_meta_card_and_a_working_onnx(digits_run):
    import onnxruntime as ort

    api = FakeApi()
    result = push(digits_run, "me/digits", private=True, api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == "me/digits" and api.calls[0][2]["exist_ok"] and api.calls[0][2]["private"]
    assert api.calls[1][1]["repo_id"] == "me/digits" and api.calls[1][1]["repo_type"] == "model"
    assert set(api.uploaded) == set(result["files"]) == {"model.safetensors", "model.json", "README.md", "model.onnx"}
    assert api.uploaded["README.md"] == (digits_run / "MODEL_CARD.md").read_bytes()
    for name in ("model.safetensors", "model.json"):
        assert api.uploaded[name] == (digits_run / name).read_bytes()
    session = ort.InferenceSession(api.uploaded["model.onnx"], providers=["CPUExecutionProvider"])
    shape = json.loads((digits_run / "model.json").read_text())["input_size"]  # [channels, height, width]
    logits = session.run(None, {session.get_inputs()[0].name: np.zeros((2, *shape), np.float32)})[0]
    assert logits.shape == (2, 10)
    assert not Path(api.calls[1][1]["folder_path"]).exists()  # the staging folder is gone
    assert result["url"] == "https://huggingface.co/me/digits"


def test_no_onnx_uploads_three_files(digits_run):
    api = FakeApi()
    push(digits_run, "me/digits", onnx=False, api=api)
    assert set(api.uploaded) == {"model.safetensors", "model.json", "README.md"}
    assert api.calls[0][2]["private"] is False


def test_missing_token_offline_and_refusals_are_one_line(digits_run, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no stored token either
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    api = FakeApi(token=None)
    with pytest.raises(VisionRecipeError, match="no Hugging Face token"):
        push(digits_run, "me/digits", onnx=False, api=api)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VisionRecipeError, match="HF_HUB_OFFLINE"):
        push(digits_run, "me/digits", onnx=False, api=FakeApi())
    monkeypatch.delenv("HF_HUB_OFFLINE")
    refused = FakeApi(fail=RuntimeError("401 Unauthorized: invalid token\nmore detail"))
    with pytest.raises(VisionRecipeError) as err:
        push(digits_run, "me/digits", onnx=False, api=refused)
    assert str(err.value) == "push to me/digits failed: 401 Unauthorized: invalid token"
    assert api.calls == [] and refused.uploaded == {}
    with pytest.raises(VisionRecipeError, match="not a run directory"):
        push(tmp_path, "me/digits", api=FakeApi())


def test_cli_push_offline_says_so_in_one_line(digits_run):
    done = run_cli("push", digits_run, "me/digits", "--no-onnx", env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    assert done.stderr.strip() == "error: HF_HUB_OFFLINE is set: push needs the network (unset it to upload)"
