"""MLflow tracking of a run (`train --mlflow [URI]`): the resolved config as params, each epoch's
metrics, and the model, report and card as artifacts.

    tracker = open_tracker(run_dir, cfg)     # None unless cfg.run.mlflow; rank 0 only (the loop's choice)
    tracker.log_epoch(record)                # a metrics.jsonl record: its numbers, at step = epoch
    tracker.close(run_dir)                   # training ended: the artifacts, then the MLflow run ends FINISHED
    tracker.end(error)                       # in `finally`: KILLED or FAILED unless closed

`--mlflow` alone is MLflow's own choice when MLFLOW_TRACKING_URI is set, else a local ./mlruns
folder; any tracking URI works (http://host:5000, sqlite:///mlflow.db, a folder). The MLflow run's
id and store are kept in the run's mlflow.json, so `--resume` goes on logging into the same MLflow
run. The client is mlflow-skinny (the `track` extra); a server is the user's own.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

from visionrecipe.errors import VisionRecipeError
from visionrecipe.rundir import atomic_write_text
from visionrecipe.system import log

RECORD = "mlflow.json"  # in the run directory: {"tracking_uri", "experiment_id", "run_id"}
DEFAULT = "default"  # the value of a bare --mlflow (config.py)
LOCAL_STORE = "mlruns"
EXPERIMENT = "visionrecipe"  # unless MLFLOW_EXPERIMENT_NAME says otherwise
# metrics.jsonl's bookkeeping, not measurements: epoch is the step, `stopped` is text
NOT_METRICS = ("epoch", "step")
ARTIFACTS = ("model.safetensors", "model.json", "report.html", "MODEL_CARD.md", "config.yaml", "metrics.jsonl")
PARAM_BATCH = 100  # MLflow's most params per log_batch


def tracking_uri(value: str) -> str:
    """The store a --mlflow value names: tracking_uri("default") is $MLFLOW_TRACKING_URI or the
    ./mlruns folder as a file: URI; a path without a scheme becomes a file: URI; others pass."""
    if value == DEFAULT:
        value = os.environ.get("MLFLOW_TRACKING_URI") or LOCAL_STORE
    scheme = urlsplit(value).scheme
    if scheme and len(scheme) > 1:  # not a Windows drive letter
        return value
    return Path(value).expanduser().resolve().as_uri()


def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise VisionRecipeError("--mlflow needs the MLflow client: pip install 'visionrecipe[track]'") from None
    if uri.startswith("file:"):
        # MLflow 3 keeps its folder store in maintenance mode behind this opt-in; --mlflow FOLDER is one.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as exc:  # an unknown scheme, a store that cannot open
        raise VisionRecipeError(f"MLflow ({uri}): {_one_line(exc)}") from None


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class Tracker:
    """One MLflow run, fed by the training loop on rank 0; every call's failure is one line."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self.closed = False

    def log_epoch(self, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, record["epoch"]) for key, value in record.items()
                   if key not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)]
        self._call(self.client.log_batch, self.run_id, metrics=metrics)

    def close(self, run_dir: Path) -> None:
        """Training ended: upload what the run wrote, then the MLflow run ends FINISHED."""
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                self._call(self.client.log_artifact, self.run_id, str(run_dir / name))
        self._call(self.client.set_terminated, self.run_id, "FINISHED")
        self.closed = True

    def end(self, error: BaseException | None) -> None:
        """After close, nothing; else the run was interrupted (KILLED: a --resume reopens it) or
        failed (FAILED). Best effort: the error that ended training is the one to show."""
        if self.closed:
            return
        from visionrecipe.errors import TrainingInterrupted

        status = "KILLED" if isinstance(error, (TrainingInterrupted, KeyboardInterrupt)) else "FAILED"
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception:  # noqa: BLE001 - the store may be what failed
            pass
        self.closed = True

    def _call(self, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except Exception as exc:  # the store's errors (HTTP, SQL, files) have no common base class
            raise VisionRecipeError(f"MLflow ({self.client.tracking_uri}): {_one_line(exc)}") from None


def open_tracker(run_dir: Path, cfg) -> Tracker | None:
    """The MLflow run of this run directory: the one mlflow.json names (a resume), else a new one
    with the resolved config as its params. None without --mlflow."""
    if not cfg.run.mlflow:
        return None
    record_path = run_dir / RECORD
    try:
        saved = json.loads(record_path.read_text())
    except (OSError, ValueError):
        saved = None
    uri = saved["tracking_uri"] if saved else tracking_uri(cfg.run.mlflow)
    client = _client(uri)
    if saved:
        tracker = Tracker(client, saved["run_id"])
        tracker._call(client.update_run, saved["run_id"], status="RUNNING")
        return tracker
    tracker = Tracker(client, "")
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    experiment = tracker._call(client.get_experiment_by_name, name)
    experiment_id = experiment.experiment_id if experiment else tracker._call(client.create_experiment, name)
    run = tracker._call(client.create_run, experiment_id, run_name=run_dir.name,
                        tags={"visionrecipe.run_dir": str(run_dir.resolve())})
    tracker.run_id = run.info.run_id
    log_params(tracker, cfg.flat())
    atomic_write_text(record_path, json.dumps({"tracking_uri": uri, "experiment_id": experiment_id,
                                               "run_id": tracker.run_id}, indent=2) + "\n")
    log(f"mlflow: run {tracker.run_id} in experiment {name!r} at {uri}")
    return tracker


def log_params(tracker: Tracker, settings: dict) -> None:
    """Every setting of config.yaml, by its YAML key (`lr`, `batch_size`); None is "None"."""
    from mlflow.entities import Param

    params = [Param(key, str(value)) for key, value in settings.items()]
    for start in range(0, len(params), PARAM_BATCH):
        tracker._call(tracker.client.log_batch, tracker.run_id, params=params[start:start + PARAM_BATCH])
