"""train --mlflow: what lands in an MLflow store, read back with MLflow's own client (a folder store
in tmp_path; `mlflow server` needs flask, which mlflow-skinny leaves out, so no server here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from visionrecipe.cli import build_parser  # noqa: E402
from visionrecipe.config import Config  # noqa: E402
from visionrecipe.errors import TrainingInterrupted, VisionRecipeError  # noqa: E402
from visionrecipe.rundir import read_metrics  # noqa: E402
from visionrecipe.train.tracking import open_tracker, tracking_uri  # noqa: E402


@pytest.fixture(autouse=True)
def _file_store(monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


def test_a_run_logs_its_config_epochs_and_files_to_mlflow(tmp_path):
    from visionrecipe import train

    store, out = tmp_path / "store", tmp_path / "run"
    train(data="digits", model="seedcnn", epochs=2, out=str(out), progress=False, mlflow=str(store),
          data_dir=str(tmp_path / "cache"))
    saved = json.loads((out / "mlflow.json").read_text())
    assert saved["tracking_uri"] == store.resolve().as_uri()
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    # params: every setting of config.yaml (what ran), by its YAML key
    config = yaml.safe_load((out / "config.yaml").read_text())
    flat = {k: str(v) for section in config.values() for k, v in section.items()}
    assert run.data.params == flat
    # metrics: each epoch of metrics.jsonl, at step = epoch
    records = read_metrics(out)
    assert len(records) == 2
    for key in ("train_loss", "val_loss", "val_acc", "lr", "img_per_s"):
        history = client.get_metric_history(saved["run_id"], key)
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
               [(r["epoch"], pytest.approx(r[key])) for r in records]
    artifacts = {a.path for a in client.list_artifacts(saved["run_id"])}
    assert {"model.safetensors", "model.json", "report.html", "MODEL_CARD.md", "config.yaml"} <= artifacts
    local = Path(client.download_artifacts(saved["run_id"], "model.json", str(tmp_path / "down")))
    assert local.read_bytes() == (out / "model.json").read_bytes()


def test_reopening_continues_the_same_mlflow_run_and_an_interrupt_is_killed(tmp_path):
    cfg = Config()
    cfg.run.mlflow = str(tmp_path / "store")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = open_tracker(run_dir, cfg)
    first.log_epoch({"epoch": 1, "step": 10, "train_loss": 1.0, "val_acc": 0.5, "stopped": "text"})
    first.end(TrainingInterrupted(130, run_dir))
    client = first.client
    assert client.get_run(first.run_id).info.status == "KILLED"
    again = open_tracker(run_dir, cfg)  # what --resume does: mlflow.json names the run
    assert again.run_id == first.run_id and client.get_run(first.run_id).info.status == "RUNNING"
    again.log_epoch({"epoch": 2, "step": 20, "train_loss": 0.5, "val_acc": 0.7})
    again.close(run_dir)
    again.end(None)  # after close: nothing changes
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and set(run.data.metrics) == {"train_loss", "val_acc"}
    assert [m.step for m in client.get_metric_history(first.run_id, "val_acc")] == [1, 2]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_bare_flag_means_the_environment_or_a_local_mlruns(tmp_path, monkeypatch):
    args = build_parser().parse_args(["train", "--mlflow", "--epochs", "1"])
    assert args.mlflow == "default" and args.epochs == 1
    assert build_parser().parse_args(["train", "--mlflow", "http://h:5000"]).mlflow == "http://h:5000"
    assert not hasattr(build_parser().parse_args(["train"]), "mlflow")  # untyped: config.yaml's or off
    monkeypatch.chdir(tmp_path)
    assert tracking_uri("default") == (tmp_path / "mlruns").resolve().as_uri()
    assert tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_uri("default") == "http://tracking:5000"


def test_without_mlflow_installed_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    cfg = Config()
    cfg.run.mlflow = "default"
    with pytest.raises(VisionRecipeError, match=r"pip install 'visionrecipe\[track\]'"):
        open_tracker(tmp_path, cfg)


def test_an_unreachable_store_is_one_line(tmp_path):
    cfg = Config()
    cfg.run.mlflow = "nosuchscheme://x"
    with pytest.raises(VisionRecipeError) as err:
        open_tracker(tmp_path, cfg)
    assert "\n" not in str(err.value) and "MLflow" in str(err.value)
