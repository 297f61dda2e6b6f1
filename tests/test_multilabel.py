"""Multilabel: CSV manifests, BCE training, mAP/F1 against scikit-learn, predictions above threshold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score

from visionrecipe import train
from visionrecipe.data import load_dataset
from visionrecipe.errors import VisionRecipeError
from visionrecipe.evaluate.scoring import predict_logits
from visionrecipe.train.tasks import compute_multilabel_metrics

from conftest import run_cli

COLOURS = {"red": 0, "green": 1, "blue": 2}


def write_manifest(folder: Path, n: int = 150, size: int = 12, seed: int = 0, header: bool = True) -> Path:
    """Images with up to three coloured squares; an image's labels are the colours it shows."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    lines = ["path,labels"] if header else []
    for i in range(n):
        image = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
        present = [name for name in COLOURS if rng.random() < 0.4]
        for name in present:
            y, x = rng.integers(0, size - 4, 2)
            image[y:y + 4, x:x + 4, COLOURS[name]] = 230
        Image.fromarray(image).save(folder / "images" / f"{i}.png")
        lines.append(f"images/{i}.png,{';'.join(present)}")
    path = folder / "labels.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- metrics against the reference ----------------------------------------------------------------
def test_metrics_match_sklearn_with_ties_and_an_absent_class():
    g = torch.Generator().manual_seed(0)
    targets = (torch.rand(60, 5, generator=g) < 0.3).float()
    targets[:, 4] = 0  # a class with no positives: AP undefined, left out of mAP
    logits = torch.randn(60, 5, generator=g) + 2 * targets
    logits[:20, 1] = 0.25  # ties in the scores
    m = compute_multilabel_metrics(logits, targets, threshold=0.5, classes=list("abcde"))
    probs, y = logits.sigmoid().numpy(), targets.numpy().astype(int)
    reference_ap = [average_precision_score(y[:, c], probs[:, c]) for c in range(4)]
    assert m["mAP"] == pytest.approx(np.mean(reference_ap), abs=1e-12)
    assert [row["ap"] for row in m["per_class"][:4]] == pytest.approx(reference_ap, abs=1e-12)
    assert m["per_class"][4]["ap"] is None and m["num_classes_scored"] == 4
    predicted = (probs > 0.5).astype(int)
    assert m["f1_micro"] == pytest.approx(f1_score(y, predicted, average="micro", zero_division=0))
    assert m["f1_macro"] == pytest.approx(f1_score(y, predicted, average="macro", zero_division=0))
    assert m["loss"] == pytest.approx(float(torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)))


def test_metrics_by_hand_on_a_tiny_example():
    # Class 0: scores 0.9 (pos), 0.8 (neg), 0.7 (pos) -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    # Class 1: scores 0.2 (neg), 0.6 (pos), 0.1 (neg) -> AP = 1.
    probs = torch.tensor([[0.9, 0.2], [0.8, 0.6], [0.7, 0.1]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    m = compute_multilabel_metrics(torch.logit(probs), targets, threshold=0.85)
    assert m["mAP"] == pytest.approx((5 / 6 + 1) / 2)
    # Above 0.85 only (row 0, class 0): TP 1, FP 0, FN 2 -> micro F1 = 2/(2 + 0 + 2) = 1/2.
    # Class 0: F1 = 2/(2 + 0 + 1) = 2/3; class 1: no TP -> 0; macro = 1/3.
    # Exact match: row 0 ({0} and {0}) only -> 1/3.
    assert m["f1_micro"] == pytest.approx(0.5) and m["f1_macro"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(1 / 3)


# --- the manifest loader -----------------------------------------------------------------------------
def test_manifest_loads_multi_hot_labels_and_random_splits(tmp_path):
    path = write_manifest(tmp_path / "m", n=50)
    data = load_dataset(str(path), data_dir=tmp_path / "cache", val_fraction=0.2, seed=3, progress=False)
    assert data.classes == ["blue", "green", "red"]
    assert data.train.labels.dtype == torch.float32 and data.train.labels.shape[1] == 3
    assert (len(data.train), len(data.val), len(data.test)) == (32, 8, 10)
    rows = {line.split(",")[0]: line.split(",")[1] for line in path.read_text().splitlines()[1:]}
    for image_path, labels in zip(data.train.paths, data.train.labels):
        names = {data.classes[i] for i in torch.nonzero(labels).flatten().tolist()}
        assert names == set(filter(None, rows[str(Path(image_path).relative_to(path.parent))].split(";")))
    again = load_dataset(str(path), data_dir=tmp_path / "cache", val_fraction=0.2, seed=4, progress=False)
    assert again.from_cache and again.test.paths == data.test.paths  # the test split never moves
    assert again.val.paths != data.val.paths


def test_manifest_split_column_and_errors(tmp_path):
    folder = tmp_path / "m"
    write_manifest(folder, n=6, header=False)
    rows = [f"images/{i}.png,red,{'test' if i < 2 else 'train'}" for i in range(6)]
    (folder / "split.csv").write_text("\n".join(rows) + "\n")
    data = load_dataset(str(folder / "split.csv"), data_dir=tmp_path / "cache", val_fraction=0, progress=False)
    assert (len(data.train), len(data.test), data.val) == (4, 2, None)
    (folder / "bad.csv").write_text("images/0.png,red,holdout\n")
    with pytest.raises(VisionRecipeError, match="holdout"):
        load_dataset(str(folder / "bad.csv"), data_dir=tmp_path / "cache", progress=False)
    (folder / "missing.csv").write_text("images/0.png,red\nimages/nope.png,blue\n")
    with pytest.raises(VisionRecipeError, match="nope.png"):
        load_dataset(str(folder / "missing.csv"), data_dir=tmp_path / "cache", strict=True, progress=False)


# --- training, evaluation and prediction --------------------------------------------------------------
@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("manifest")
    path = write_manifest(folder, n=160)
    out = folder / "run"
    train(data=str(path), task="multilabel", model="seedcnn", epochs=4, batch_size=32, lr=3e-3, out=str(out),
          progress=False, report=False, data_dir=str(folder / "cache"))
    return out, path


def test_multilabel_run_learns_and_its_metrics_are_the_reference_ones(multilabel_run):
    run_dir, manifest = multilabel_run
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["task"] == "multilabel" and result["mAP"] > 0.9, result["mAP"]
    # Recompute from the saved model on the test split with scikit-learn as the reference.
    from visionrecipe.models.checkpoint import load_model

    model, meta = load_model(run_dir)
    data = load_dataset(str(manifest), data_dir=manifest.parent / "cache", val_fraction=0.1, progress=False)
    logits = predict_logits(model, data.test.images, meta["mean"], meta["std"])
    probs, y = logits.sigmoid().numpy(), data.test.labels.numpy().astype(int)
    assert result["mAP"] == pytest.approx(np.mean([average_precision_score(y[:, c], probs[:, c]) for c in range(3)]))
    assert result["f1_micro"] == pytest.approx(f1_score(y, (probs > 0.5).astype(int), average="micro", zero_division=0))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert meta["val_acc"] == max(m["val_acc"] for m in metrics)  # best epoch chosen by validation mAP
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]


def test_predict_returns_every_label_above_threshold(multilabel_run):
    from visionrecipe.deploy.predict import predict

    run_dir, manifest = multilabel_run
    images = sorted((manifest.parent / "images").glob("*.png"))[:8]
    rows = predict(run_dir, images, threshold=0.5)
    truth = {line.split(",")[0]: set(filter(None, line.split(",")[1].split(";")))
             for line in manifest.read_text().splitlines()[1:]}
    right = 0
    for row in rows:
        assert row["labels"] == [t["class"] for t in row["top"]]
        assert all(t["probability"] > 0.5 for t in row["top"])
        right += set(row["labels"]) == truth[f"images/{Path(row['path']).name}"]
    assert right >= 6
    assert all(r["labels"] == [] for r in predict(run_dir, images, threshold=1.0))  # nothing is above 1


def test_evaluate_cli_prints_map(multilabel_run):
    run_dir, _ = multilabel_run
    proc = run_cli("evaluate", run_dir)
    assert proc.returncode == 0, proc.stderr
    assert "mAP" in proc.stdout and "F1 micro" in proc.stdout


def test_task_and_data_must_agree(tmp_path):
    path = write_manifest(tmp_path / "m", n=20)
    with pytest.raises(VisionRecipeError, match="--task multilabel"):
        train(data=str(path), model="seedcnn", epochs=1, out=str(tmp_path / "a"), progress=False, report=False,
              data_dir=str(tmp_path / "cache"))
    with pytest.raises(VisionRecipeError, match="CSV manifest"):
        train(data="digits", task="multilabel", model="seedcnn", epochs=1, out=str(tmp_path / "b"), progress=False,
              report=False, data_dir=str(tmp_path / "cache"))


def test_head_bias_starts_at_each_label_frequency():
    from visionrecipe.models import create_model
    from visionrecipe.train.tasks import PRIOR_CLAMP, init_prior_bias

    model = create_model("seedcnn", 3, image_size=8, head="mlp:16")
    targets = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    init_prior_bias(model, "head", targets)
    torch.testing.assert_close(model.head[-1].bias.sigmoid(), torch.tensor([0.75, 0.25, PRIOR_CLAMP]))
