"""Class imbalance: --class-weights auto, --sampler balanced, and evaluate's balanced accuracy and macro-F1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from visionrecipe.cli import main
from visionrecipe.config import Config, load_config
from visionrecipe.train.augment import balanced_order
from visionrecipe.train.build import build_run, load_data, resolve
from visionrecipe.train.tasks import class_weights

COUNTS = {"many": 40, "some": 10, "few": 4}  # train images per class: ratio 10


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/ and test/ of 8×8 PNGs, imbalanced; each class has its own brightness, so it can be learnt."""
    root = tmp_path_factory.mktemp("imbalanced")
    rng = np.random.default_rng(0)
    for level, (name, count) in zip((40, 128, 215), COUNTS.items()):
        for split, n in (("train", count), ("test", max(3, count // 4))):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(level, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def built_for(folder, tmp_path, **settings):
    cfg = Config.from_dict({"data": str(folder), "data_dir": str(tmp_path / "cache"), "model": "seedcnn",
                            "val_fraction": 0, "label_smoothing": 0.0, **settings})
    data = load_data(resolve(cfg, "cpu"))
    return build_run(resolve(cfg, "cpu", data), data, torch.device("cpu"))


def test_class_weights_are_inverse_frequency_as_scikit_learn_computes_them():
    from sklearn.utils.class_weight import compute_class_weight

    labels = torch.tensor([0] * 40 + [1] * 10 + [2] * 4)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels.numpy())
    assert np.allclose(class_weights(labels, 3).numpy(), expected)
    assert class_weights(torch.tensor([0, 0, 2, 2]), 3).tolist() == [1.0, 0.0, 1.0]  # a class with no image: 0


def test_class_weights_auto_changes_the_loss_as_computed_by_hand(folder, tmp_path):
    weighted = built_for(folder, tmp_path, class_weights="auto")
    plain = built_for(folder, tmp_path)
    classes = weighted.data.classes  # ImageFolder order: few, many, some
    counts = torch.tensor([COUNTS[c] for c in classes], dtype=torch.float64)
    w = counts.sum() / (len(classes) * counts)
    logits = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 1, 1, 1, 1, 1, 2, 2, 1, 0, 1])
    nll = -logits.double().log_softmax(1)[torch.arange(12), y]
    by_hand = float((w[y] * nll).sum() / w[y].sum())
    assert float(weighted.loss_fn(logits, y)) == pytest.approx(by_hand, rel=1e-6)
    assert float(plain.loss_fn(logits, y)) == pytest.approx(float(nll.mean()), rel=1e-6)
    assert abs(by_hand - float(nll.mean())) > 0.01  # the weights do change it


def test_balanced_sampler_draws_each_class_equally_and_is_a_function_of_seed_and_epoch():
    labels = torch.tensor([0] * 80 + [1] * 15 + [2] * 5)
    order = balanced_order(labels, seed=3, epoch=0, device=torch.device("cpu"))
    assert len(order) == len(labels) and int(order.min()) >= 0 and int(order.max()) < len(labels)
    drawn = torch.bincount(labels[order], minlength=3).tolist()
    assert max(drawn) - min(drawn) <= 1 and sum(drawn) == 100  # 34/33/33 where shuffling gives 80/15/5
    assert len(set(order[labels[order] == 2].tolist())) == 5  # the small class: all its images, repeated
    assert torch.equal(order, balanced_order(labels, 3, 0, torch.device("cpu")))  # exact resume needs no state
    assert not torch.equal(order, balanced_order(labels, 3, 1, torch.device("cpu")))
    assert not torch.equal(order, balanced_order(labels, 4, 0, torch.device("cpu")))
    # The large class shows the next part of its shuffled pass each epoch: all 80 images in 3 epochs.
    seen = torch.cat([balanced_order(labels, 3, e, torch.device("cpu")) for e in range(3)])
    assert set(seen[labels[seen] == 0].tolist()) == set(range(80))
    # The remainder (100 = 3 × 33 + 1) rotates: in 3 epochs each class gets the 34th draw once.
    per_epoch = [torch.bincount(labels[balanced_order(labels, 3, e, torch.device("cpu"))], minlength=3) for e in range(3)]
    assert sorted(int(d.argmax()) for d in per_epoch) == [0, 1, 2] and all(sorted(d.tolist()) == [33, 33, 34]
                                                                            for d in per_epoch)


def test_built_run_orders_epochs_by_the_sampler(folder, tmp_path):
    balanced = built_for(folder, tmp_path, sampler="balanced")
    shuffled = built_for(folder, tmp_path)
    labels = balanced.data.train.labels
    drawn = torch.bincount(labels[balanced.epoch_order(0)], minlength=3).tolist()
    assert max(drawn) - min(drawn) <= 1
    assert sorted(shuffled.epoch_order(0).tolist()) == list(range(len(labels)))  # each image once
    x, y = next(balanced.batches(32))
    assert x.shape == (32, 3, 8, 8) and torch.bincount(y, minlength=3).min() >= 4  # 4 of 54 images are "few"


def test_train_and_evaluate_balanced_accuracy_and_macro_f1_equal_scikit_learns(folder, tmp_path, capsys):
    from sklearn.metrics import balanced_accuracy_score, f1_score

    from visionrecipe.data import load_dataset
    from visionrecipe.evaluate.scoring import predict_logits
    from visionrecipe.models.checkpoint import load_model

    run = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--model", "seedcnn", "--epochs", "2", "--val-fraction", "0",
                 "--class-weights", "auto", "--sampler", "balanced", "--out", str(run), "--data-dir",
                 str(tmp_path / "cache"), "--no-progress", "--no-report", "--threads", "1", "--device", "cpu"]) == 0
    saved = load_config(run / "config.yaml")
    assert (saved.optim.class_weights, saved.optim.sampler) == ("auto", "balanced")  # config.yaml is what ran
    capsys.readouterr()

    assert main(["evaluate", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    model, meta = load_model(run)
    test = load_dataset(str(folder), data_dir=str(tmp_path / "cache"), val_fraction=0, progress=False).test
    predicted = predict_logits(model, test.images, meta["mean"], meta["std"]).argmax(1).numpy()
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(test.labels.numpy(), predicted))
    assert result["f1_macro"] == pytest.approx(f1_score(test.labels.numpy(), predicted, average="macro"))

    assert main(["evaluate", str(run)]) == 0
    line = capsys.readouterr().out
    assert f"balanced accuracy {100 * result['balanced_accuracy']:.2f}%" in line
    assert f"macro-F1 {100 * result['f1_macro']:.2f}%" in line


def test_multilabel_runs_refuse_class_weights_and_the_balanced_sampler(tmp_path, capsys):
    images = tmp_path / "ml"
    images.mkdir()
    rows = []
    for i in range(8):
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(images / f"{i}.png")
        rows.append(f"{i}.png,{'a;b' if i % 2 else 'a'}")
    (images / "labels.csv").write_text("path,labels\n" + "\n".join(rows) + "\n")
    for flag, value in (("--class-weights", "auto"), ("--sampler", "balanced")):
        code = main(["train", "--data", str(images / "labels.csv"), "--task", "multilabel", "--model", "seedcnn",
                     flag, value, "--out", str(tmp_path / "r"), "--data-dir", str(tmp_path / "cache"),
                     "--no-progress", "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and "single-label" in err


def test_balanced_sampler_and_class_weights_resume_exactly(folder, tmp_path):
    """The balanced order is a function of (seed, epoch): a run stopped after its first epoch and
    resumed ends with the weights and metrics of the run that never stopped."""
    import os
    import signal

    from safetensors.torch import load_file

    from visionrecipe.train.loop import Trainer, TrainingInterrupted, resume

    def settings(out):
        return Config.from_dict({"data": str(folder), "data_dir": str(tmp_path / "cache"), "model": "seedcnn",
                                 "epochs": 3, "batch_size": 8, "sampler": "balanced", "class_weights": "auto",
                                 "deterministic": True, "threads": 1, "device": "cpu", "out": str(out),
                                 "progress": False, "report": False})

    Trainer(settings(tmp_path / "whole")).fit()
    stopped = Trainer(settings(tmp_path / "stopped"), on_epoch=lambda record: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(TrainingInterrupted):
        stopped.fit()
    resume(tmp_path / "stopped")

    def metrics(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if k not in ("img_per_s", "elapsed_s")} for row in rows]

    assert len(metrics(tmp_path / "whole")) == 3 and metrics(tmp_path / "stopped") == metrics(tmp_path / "whole")
    whole, resumed = (load_file(str(tmp_path / run / "last.safetensors")) for run in ("whole", "stopped"))
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
