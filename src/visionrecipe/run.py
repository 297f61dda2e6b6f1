"""A run directory and what can be done with it.

    run = Run("runs/digits")
    run.metrics            # the epochs of metrics.jsonl
    run.evaluate()         # test-split metrics; writes eval.json
    run.predict(["a.png"]) # top-k classes per image

Layout: config.yaml, metrics.jsonl, model.safetensors + model.json (best epoch),
last.safetensors + last.json (last epoch), state.pt (resume), eval.json, report.html;
rundir.py owns it (the file names, the marker, the lock, metrics.jsonl).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from visionrecipe.errors import VisionRecipeError
from visionrecipe.rundir import read_metrics


class Run:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if not (self.path / "model.json").is_file():
            raise VisionRecipeError(f"{self.path} is not a run directory with a trained model (model.json missing)")

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def meta(self) -> dict:
        return json.loads((self.path / "model.json").read_text())

    @property
    def metrics(self) -> list[dict]:
        return read_metrics(self.path)

    def evaluate(self, split: str = "test", **kwargs) -> dict:
        from visionrecipe.evaluate.scoring import evaluate_run

        return evaluate_run(self.path, split=split, **kwargs)

    def predict(self, images, topk: int = 5, **kwargs) -> list[dict]:
        from visionrecipe.deploy.predict import predict

        return predict(self.path, images, topk=topk, **kwargs)
