"""Training on real data (scikit-learn's digits): accuracy, run directory, reproducibility."""

from __future__ import annotations

import json
import re

import pytest
import torch

from visionrecipe import train
from visionrecipe.train.augment import BatchAugment, random_translate
from visionrecipe.config import Config, load_config
from visionrecipe.errors import VisionRecipeError
from visionrecipe.train.schedule import lr_factor

from conftest import run_cli


def test_digits_run_reaches_95_percent_and_writes_run_dir(digits_run):
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "model.json", "last.safetensors",
                 "last.json", "state.pt", "eval.json"):
        assert (digits_run / name).is_file(), name
    metrics = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, 7))
    assert set(metrics[0]) >= {"epoch", "train_loss", "val_loss", "val_acc", "lr", "img_per_s", "elapsed_s"}
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    result = json.loads((digits_run / "eval.json").read_text())
    assert result["accuracy"] >= 0.95
    meta = json.loads((digits_run / "model.json").read_text())
    assert meta["classes"] == [str(i) for i in range(10)] and meta["input_size"] == [1, 8, 8]


def test_evaluate_in_new_process_reproduces_training_exactly(digits_run):
    trained = json.loads((digits_run / "eval.json").read_text())
    proc = run_cli("evaluate", digits_run, "--json")
    assert proc.returncode == 0, proc.stderr
    fresh = json.loads(proc.stdout)
    assert fresh["num_correct"] == trained["num_correct"] and fresh["num_images"] == trained["num_images"] == 359
    assert fresh["accuracy"] == trained["accuracy"]
    assert {"accuracy", "top5_accuracy", "loss", "num_images"} <= set(fresh)


def test_evaluate_with_or_without_tta_scores_a_variant_and_keeps_eval_json(digits_run):
    before = (digits_run / "eval.json").read_text()
    assert json.loads(before)["tta"] is False  # digits train without mirror TTA (a mirrored digit is another)
    proc = run_cli("evaluate", digits_run, "--tta")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("test accuracy") and "(no TTA)" not in proc.stdout
    mirrored = json.loads(run_cli("evaluate", digits_run, "--tta", "--json").stdout)
    assert mirrored["tta"] is True and mirrored["loss"] != json.loads(before)["loss"]  # other logits
    assert (digits_run / "eval.json").read_text() == before  # a variant never replaces the run's scoring
    plain = run_cli("evaluate", digits_run, "--no-tta")
    assert "(no TTA)" in plain.stdout and plain.returncode == 0


def test_val_accuracy_of_best_epoch_reproduced(digits_run):
    meta = json.loads((digits_run / "model.json").read_text())
    before = (digits_run / "eval.json").read_text()
    proc = run_cli("evaluate", digits_run, "--split", "val", "--json")
    assert json.loads(proc.stdout)["accuracy"] == meta["val_acc"]
    assert (digits_run / "eval.json").read_text() == before  # the val split is a variant: eval.json stays test's


def test_same_seed_same_result(tmp_path):
    losses = []
    for name in ("a", "b"):
        run = train(data="digits", model="seedcnn", epochs=1, out=str(tmp_path / name), progress=False,
                    report=False, deterministic=True, data_dir=str(tmp_path / "cache"))
        losses.append(run.metrics[0]["train_loss"])
    assert losses[0] == losses[1]


def test_config_yaml_roundtrip_trains_same_settings(digits_run, tmp_path):
    cfg = load_config(digits_run / "config.yaml")
    assert cfg.model.model == "seedcnn" and cfg.optim.epochs == 6 and cfg.optim.recipe == "standard"
    flat = Config.from_dict({"data": "digits", "lr": 0.1, "optim": {"epochs": 3}})
    assert flat.optim.lr == 0.1 and flat.optim.epochs == 3 and flat.data.data == "digits"


def test_fast_recipe_default_on_digits(tmp_path):
    run = train(data="digits", out=str(tmp_path / "fast"), progress=False, report=False,
                data_dir=str(tmp_path / "cache"))
    # digits are not mirror-symmetric: the recipe turns flips (and with them flip-TTA) off
    assert run.meta["architecture"] == "fastnet" and run.meta["tta"] is False
    assert run.evaluate()["accuracy"] >= 0.95


def test_time_budget_ends_within_5_percent(tmp_path):
    budget = 6.0
    run = train(data="digits", model="seedcnn", time_budget=budget, out=str(tmp_path / "b"), progress=False,
                report=False, data_dir=str(tmp_path / "cache"), batch_size=32)
    elapsed = run.metrics[-1]["elapsed_s"]
    assert abs(elapsed - budget) <= 0.05 * budget, elapsed


def test_translate_keeps_content_and_labels():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    g = torch.Generator().manual_seed(0)
    y = random_translate(x, 2, g)
    assert y.shape == x.shape
    # every output row of each image is a contiguous window of its own reflect-padded rows
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(2):
        found = any(torch.equal(y[i, 0], padded[i, 0, dy:dy + 6, dx:dx + 6]) for dy in range(5) for dx in range(5))
        assert found


def test_alternating_flip_covers_both_views():
    aug = BatchAugment([0.5], [0.25], flip=True, alternate_flip=True, n_train=100, seed=3)
    index = torch.arange(100)
    g = torch.Generator()
    even, odd = aug.flip_mask(index, 0, g), aug.flip_mask(index, 1, g)
    assert torch.equal(even, ~odd) and 20 < int(even.sum()) < 80
    assert torch.equal(aug.flip_mask(index, 2, g), even)


def test_schedules_shape():
    assert lr_factor("constant", 5, 10) == 1.0
    assert lr_factor("cosine", 0, 100) == pytest.approx(1.0) and lr_factor("cosine", 100, 100) == pytest.approx(0.0)
    assert lr_factor("cosine", 0, 100, warmup_steps=10) == pytest.approx(0.1)
    tri = [lr_factor("triangle", s, 100) for s in range(100)]
    assert max(tri) == pytest.approx(1.0, abs=0.02) and tri[0] < 0.3 and tri[-1] < 0.1


def test_ema_weights_used_for_evaluation(tmp_path):
    from visionrecipe.models.checkpoint import load_model
    from visionrecipe.train.loop import Trainer

    cfg = Config.from_dict({"data": "digits", "model": "seedcnn", "epochs": 1, "ema": True, "out": str(tmp_path / "e"),
                            "progress": False, "report": False, "data_dir": str(tmp_path / "cache")})
    trainer = Trainer(cfg)
    trainer.fit()
    saved, _ = load_model(tmp_path / "e", stem="last")
    ema_state, raw_state = trainer.ema.model.state_dict(), trainer.model.state_dict()
    key = "fc1.weight" if "fc1.weight" in raw_state else next(k for k in raw_state if k.endswith("weight"))
    assert not torch.equal(ema_state[key], raw_state[key])
    assert torch.equal(saved.state_dict()[key], ema_state[key])


def test_lr_auto_picks_inside_the_range_tests_descent_and_trains(tmp_path):
    """`--lr auto` runs the doctor's range test on the run it built, records the numeric pick in
    config.yaml (what ran), and the epoch line speaks --lr's unit."""
    from visionrecipe.doctor.runner import prepare
    from visionrecipe.train.lr_find import range_test

    out, cache = tmp_path / "auto", tmp_path / "cache"
    proc = run_cli("train", "--data", "digits", "--epochs", "1", "--lr", "auto", "--out", out, "--data-dir", cache,
                   "--no-progress", "--no-report", "--threads", "1", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    chosen = load_config(out / "config.yaml").optim.lr
    assert isinstance(chosen, float)
    assert f"--lr auto: lr {chosen:.3g} per 1024 images" in proc.stdout
    assert "(per 1024 images)" in next(line for line in proc.stdout.splitlines() if line.startswith("Epoch 1/1"))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

    # The same range test, on the run the doctor builds from the same settings, picked it.
    built = prepare(Config.from_dict({"data": "digits", "epochs": 1, "lr": "auto", "data_dir": str(cache),
                                      "threads": 1}), device="cpu")
    found = range_test(built).suggestion
    assert chosen == pytest.approx(found.lr, rel=1e-9) and found.falls
    assert found.region[0] <= chosen < found.region[1]  # inside the descent, below the loss minimum's lr


# --------------------------------------------------------------------- training controls (issue 13)
def test_patience_stops_early_and_keeps_the_best_epoch(tmp_path):
    run = train(data="digits", model="seedcnn", epochs=30, patience=2, batch_size=32, out=str(tmp_path / "p"),
                progress=False, report=False, data_dir=str(tmp_path / "cache"))
    scores = [m["val_acc"] for m in run.metrics]
    best_epoch = scores.index(max(scores)) + 1  # the first epoch with the best score: later ties do not improve
    assert len(scores) < 30 and len(scores) - best_epoch == 2
    assert run.metrics[-1]["stopped"] == f"no better val_acc for 2 epochs (best {max(scores):.4f} at epoch {best_epoch})"
    assert not any("stopped" in m for m in run.metrics[:-1])
    assert (run.meta["epoch"], run.meta["val_acc"]) == (best_epoch, max(scores))


def test_the_planned_end_keeps_the_last_epoch_unless_validation_tells_an_earlier_one_apart():
    from visionrecipe.train.callbacks import keeps, noise_margin

    assert noise_margin(0.84, 947) == pytest.approx(2 * (0.84 * 0.16 / 947) ** 0.5)  # 2.38 points
    assert keeps(0.832, 0.843, 947, final=True)  # Imagenette's 947 images: 1.1 points is noise
    assert not keeps(0.832, 0.843, 947, final=False)  # before the end only a better score is kept
    assert not keeps(0.80, 0.843, 947, final=True)  # 4.3 points below: the earlier epoch stays
    assert not keeps(0.832, 0.843, 50_000, final=True)  # a large split tells 1.1 points apart


def test_a_finished_run_keeps_its_model_by_that_rule(tmp_path, capfd):
    from visionrecipe.train.callbacks import keeps

    run = train(data="digits", model="seedcnn", epochs=5, lr=0.03, out=str(tmp_path / "k"), progress=False,
                report=False, data_dir=str(tmp_path / "cache"))
    count = int(re.search(r"([\d,]+) val,", capfd.readouterr().out).group(1).replace(",", ""))
    scores = [m["val_acc"] for m in run.metrics]
    best = max(scores[:-1])
    expected = len(scores) if keeps(scores[-1], best, count, final=True) else scores.index(max(scores)) + 1
    assert run.meta["epoch"] == expected and run.meta["val_acc"] == scores[expected - 1]


def test_recalibrate_batchnorm_averages_the_statistics_of_the_given_images():
    from visionrecipe.evaluate.scoring import normalise, recalibrate_batchnorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.4), torch.nn.Conv2d(3, 4, 1),
                                torch.nn.BatchNorm2d(4)).eval()
    model[0].running_mean.fill_(7.0)  # stale statistics, as an EMA model carries the live model's
    images = torch.randint(0, 256, (600, 3, 8, 8), dtype=torch.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    assert recalibrate_batchnorm(model, images, mean, std, channels_last=False)
    x = normalise(images, mean, std, channels_last=False)
    # 600 images in two equal batches of 300 (eval_batch allows 500): the plain average of their statistics
    halves = x.split(300)
    torch.testing.assert_close(model[0].running_mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(model[0].running_var, sum(h.var((0, 2, 3)) for h in halves) / 2)
    assert model[0].momentum == 0.4 and model[2].momentum == 0.1 and not model.training
    assert not recalibrate_batchnorm(torch.nn.Linear(2, 2), images, mean, std)  # nothing to do


def test_the_saved_model_is_the_recalibrated_one_it_was_scored_as(tmp_path):
    run = train(data="digits", epochs=2, out=str(tmp_path / "r"), progress=False, report=False,
                data_dir=str(tmp_path / "cache"))
    assert run.meta["architecture"] == "fastnet" and load_config(tmp_path / "r" / "config.yaml").optim.recalibrate_bn == 1024
    proc = run_cli("evaluate", tmp_path / "r", "--split", "val", "--json")
    assert json.loads(proc.stdout)["accuracy"] == run.meta["val_acc"]  # the buffers it was validated with
    off = train(data="digits", epochs=2, recalibrate_bn=0, out=str(tmp_path / "o"), progress=False, report=False,
                data_dir=str(tmp_path / "cache"))
    from safetensors.torch import load_file

    stats = [load_file(str(tmp_path / name / "model.safetensors")) for name in ("r", "o")]
    key = next(k for k in stats[0] if k.endswith("running_mean"))
    assert not torch.equal(stats[0][key], stats[1][key])  # the same training, other statistics
    assert [m["train_loss"] for m in run.metrics] == [m["train_loss"] for m in off.metrics]  # training untouched


def test_stop_at_stops_once_reached_and_resume_says_finished(tmp_path, capsys):
    from visionrecipe.train.loop import resume

    out = tmp_path / "s"
    run = train(data="digits", model="seedcnn", epochs=30, stop_at=0.9, batch_size=32, out=str(out),
                progress=False, report=False, data_dir=str(tmp_path / "cache"))
    scores = [m["val_acc"] for m in run.metrics]
    assert len(scores) < 30 and scores[-1] >= 0.9 and all(s < 0.9 for s in scores[:-1])
    assert run.metrics[-1]["stopped"] == f"val_acc {scores[-1]:.4f} reached --stop-at 0.9"
    assert load_config(out / "config.yaml").run.precision == "fp32"  # the CPU default, resolved into config.yaml
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    resume(out)
    said = capsys.readouterr()
    assert f"{out} is already finished (val_acc {scores[-1]:.4f} reached --stop-at 0.9)" in said.out + said.err
    assert (out / "metrics.jsonl").read_text() == before  # nothing trained, nothing rewritten


def test_stop_at_is_a_fraction(tmp_path):
    with pytest.raises(VisionRecipeError, match=r"^--stop-at is a val_acc between 0 and 1 \(e.g. 0.95\), got 95$"):
        train(data="digits", model="seedcnn", stop_at=95, out=str(tmp_path / "x"), progress=False)
    assert not (tmp_path / "x").exists()


def test_grad_accum_steps_like_the_whole_batch(tmp_path):
    """--batch-size 32 --grad-accum 4 (four micro-batches of 8) takes the optimizer step of one
    batch of 32. seedcnn has no BatchNorm, so the weights agree to float rounding; SGD (unlike
    Adam) would show a gradient of the wrong scale."""
    from visionrecipe.rundir import unlock
    from visionrecipe.train.loop import Trainer

    weights, losses, initial = [], [], None
    for accum in (1, 4):
        cfg = Config.from_dict({"data": "digits", "model": "seedcnn", "batch_size": 32, "grad_accum": accum,
                                "optimizer": "sgd", "lr": 0.5, "momentum": 0.9, "schedule": "constant",
                                "warmup_epochs": 0, "out": str(tmp_path / f"k{accum}"),
                                "progress": False, "report": False, "data_dir": str(tmp_path / "cache")})
        trainer = Trainer(cfg)
        trainer.setup()
        try:
            built = trainer.built
            initial = initial or {k: v.clone() for k, v in trainer.model.state_dict().items()}
            for step in range(2):
                index = torch.arange(step * 32, (step + 1) * 32)
                x = built.augment(built.images[index], index, 0, torch.Generator().manual_seed(step))
                losses.append(float(trainer.train_step(x, built.labels[index])))
                trainer.state.step += 1
            weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        finally:
            unlock(trainer.run_dir)
    assert losses[:2] == pytest.approx(losses[2:], abs=1e-6)
    assert (weights[0]["head.weight"] - initial["head.weight"]).abs().max() > 5e-3  # the steps moved them
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=0, atol=1e-5)


def test_grad_accum_must_divide_the_batch(tmp_path):
    with pytest.raises(VisionRecipeError, match=r"^--grad-accum 3 must divide the batch of 32 images \(--batch-size "
                                                r"is the batch of one optimizer step\)$"):
        train(data="digits", model="seedcnn", batch_size=32, grad_accum=3, out=str(tmp_path / "x"), progress=False,
              data_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "x").exists()  # refused before the run directory is made
