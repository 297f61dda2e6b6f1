"""The doctor: each check passes on healthy input and fails on the bug it exists to catch."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from visionrecipe.train.augment import BatchAugment
from visionrecipe.cli import main
from visionrecipe.data import channel_stats, load_dataset
from visionrecipe.doctor.checks import (check_batch_independence, check_batch_statistics, check_capacity,
                                        check_determinism, check_init_loss, check_input_dependence,
                                        check_lr_range, check_overfit_batch)
from visionrecipe.doctor.data_checks import check_leakage, data_checks, find_copies
from visionrecipe.models import create_model
from visionrecipe.train.lr_find import suggest_lr

from conftest import run_cli


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second thread only adds synchronisation, badly so on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Normalised digits tensors (train and val) and the statistics used."""
    data = load_dataset("digits", progress=False, data_dir=str(tmp_path_factory.mktemp("cache")))
    mean, std = channel_stats(data.train.images)
    augment = BatchAugment(mean, std)
    return {"data": data, "mean": mean, "std": std, "x": augment.normalise(data.train.images),
            "y": data.train.labels, "x_val": augment.normalise(data.val.images), "y_val": data.val.labels}


def seedcnn() -> nn.Module:
    return create_model("seedcnn", 10, in_channels=1, image_size=8)


def write_folder(root, *, classes=("a", "b", "c"), per_class=6, test_copies=0, seed=0):
    """train/<class>/ of random-noise PNGs; test/ has fresh images plus `test_copies` copies per class."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / "train" / c).mkdir(parents=True)
        (root / "test" / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / "train" / c / f"{i}.png")
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / "test" / c / f"new{i}.png")
        for i in range(test_copies):
            shutil.copy(root / "train" / c / f"{i}.png", root / "test" / c / f"copy{i}.png")
    return root


# --- 1. the data ----------------------------------------------------------------------------------
def test_test_files_copied_from_train_fail_leakage(tmp_path):
    leaky = load_dataset(str(write_folder(tmp_path / "leaky", test_copies=2)), data_dir=str(tmp_path / "cache"),
                         progress=False, val_fraction=0)
    checks = {c.name: c for c in data_checks(leaky)}
    assert checks["train/test leakage"].verdict == "fail"
    assert checks["train/test leakage"].values["exact"] == 6
    assert checks["class balance"].verdict == "pass" and checks["unreadable files"].verdict == "pass"
    assert "12×12" in checks["image sizes"].figure

    clean = load_dataset(str(write_folder(tmp_path / "clean")), data_dir=str(tmp_path / "cache"), progress=False,
                         val_fraction=0)
    assert {c.name: c.verdict for c in data_checks(clean)}["train/test leakage"] == "pass"


def test_near_copies_are_found_and_lookalike_digits_are_not(digits):
    train = digits["data"].train.images
    brighter = (train[:5].int() + 1).clamp(max=255).to(torch.uint8)  # a re-save: every pixel off by one
    copies = find_copies(brighter, train)
    assert [(i, j, kind) for i, j, kind in copies] == [(i, i, "near") for i in range(5)]
    # 8×8 digits share perceptual hashes by chance; the pixel check keeps them apart.
    assert check_leakage(digits["data"].test.images, train).verdict == "pass"
    assert find_copies(train) == []
    doubled = torch.cat([train[:50], train[:10]])
    assert [kind for _, _, kind in find_copies(doubled)] == ["exact"] * 10


# --- 2. the batch as the net sees it --------------------------------------------------------------
def test_wrong_normalisation_shows_in_batch_statistics(digits):
    images = digits["data"].train.images[:256]
    assert check_batch_statistics(BatchAugment(digits["mean"], digits["std"]).normalise(images)).verdict == "pass"
    zero_one = check_batch_statistics(BatchAugment([0.0], [1.0]).normalise(images))  # mean/std left at 0/1
    assert zero_one.verdict == "fail" and zero_one.values["std"][0] < 0.5
    assert check_batch_statistics(images.float()).verdict == "fail"  # raw 0–255 pixels


def test_swapped_channels_show_in_batch_statistics():
    g = torch.Generator().manual_seed(0)
    base = torch.tensor([200.0, 40.0, 120.0]).view(1, 3, 1, 1)
    spread = torch.tensor([10.0, 10.0, 40.0]).view(1, 3, 1, 1)
    images = (base + spread * torch.randn(64, 3, 8, 8, generator=g)).clamp(0, 255).to(torch.uint8)
    mean, std = channel_stats(images)
    assert check_batch_statistics(BatchAugment(mean, std).normalise(images)).verdict == "pass"
    swapped = BatchAugment(mean[::-1], std[::-1]).normalise(images)  # RGB statistics on BGR data
    assert check_batch_statistics(swapped).verdict == "fail"


# --- 3. loss at init ------------------------------------------------------------------------------
class Scaled(nn.Module):
    def __init__(self, model: nn.Module, scale: float):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x):
        return self.model(x) * self.scale


def test_loss_at_init_is_ln_classes_and_big_logits_fail(digits):
    torch.manual_seed(0)
    x, y = digits["x"][:256], digits["y"][:256]
    good = check_init_loss(seedcnn(), x, y, 10)
    assert good.verdict == "pass" and abs(good.values["loss"] - math.log(10)) < 0.1
    assert check_init_loss(Scaled(seedcnn(), 200.0), x, y, 10).verdict == "fail"
    keep = torch.cat([torch.nonzero(y == 0).reshape(-1), torch.nonzero(y != 0).reshape(-1)[:30]])
    imbalanced = check_init_loss(seedcnn(), x[keep], y[keep], 10)
    assert "--class-weights auto" in imbalanced.advice and "--sampler balanced" in imbalanced.advice
    assert imbalanced.values["loss_with_log_prior_bias"] < imbalanced.values["loss"]
    # A small batch of balanced data is uneven by chance: the train split's counts decide.
    assert check_init_loss(seedcnn(), x[:24], y[:24], 10, torch.full((10,), 130)).advice == ""


# --- 4. input-independent baseline ----------------------------------------------------------------
def test_shuffled_labels_fail_the_input_independent_baseline(digits):
    x, y = digits["x"][:512], digits["y"][:512]
    args = dict(steps=40, batch_size=64, seed=0)
    real = check_input_dependence(seedcnn, x, y, digits["x_val"], digits["y_val"], **args)
    assert real.verdict == "pass", real.figure
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    noise = check_input_dependence(seedcnn, x, shuffled, digits["x_val"], digits["y_val"], **args)
    assert noise.verdict == "fail" and "labels are noise" in noise.advice, noise.figure


# --- 5. overfit one batch -------------------------------------------------------------------------
def test_overfit_one_batch_passes_and_a_frozen_model_fails(digits):
    x, y = digits["x"][:20], digits["y"][:20]
    torch.manual_seed(0)
    assert check_overfit_batch(seedcnn(), x, y).verdict == "pass"
    assert check_overfit_batch(seedcnn(), x, y, lr=1e-9, max_steps=5).verdict == "fail"


# --- 6. backprop dependencies ---------------------------------------------------------------------
class MixesBatch(nn.Module):
    """The classic bug: a reshape or roll that lets one example's output see another's input."""

    def __init__(self, model: nn.Module, how: str):
        super().__init__()
        self.model, self.how = model, how

    def forward(self, x):
        if self.how == "roll":
            x = x + x.roll(1, 0)
        else:  # a wrong view: channels and batch swapped before a flatten
            x = x.transpose(0, 1).reshape(x.shape)
        return self.model(x)


@pytest.mark.parametrize("how", ["roll", "view"])
def test_a_model_that_mixes_the_batch_fails_backprop_check(digits, how):
    x, y = digits["x"][:16], digits["y"][:16]
    x3 = x.repeat(1, 3, 1, 1)  # the view bug needs more than one channel to mix anything
    model3 = create_model("seedcnn", 10, in_channels=3, image_size=8)
    assert check_batch_independence(model3, x3, y).verdict == "pass"
    assert check_batch_independence(MixesBatch(model3, how), x3, y).verdict == "fail"


def test_batchnorm_models_pass_backprop_check_in_eval_mode(digits):
    model = create_model("fastnet", 10, in_channels=1, image_size=8, width=0.25)
    assert check_batch_independence(model, digits["x"][:16], digits["y"][:16]).verdict == "pass"


# --- 7. learning-rate range -----------------------------------------------------------------------
def test_suggested_lr_is_the_steepest_descent_and_ignores_an_early_spike():
    lrs = list(np.logspace(-5, 1, 100))
    log_lr = np.log10(lrs)
    # Flat, then falling fastest at lr 1e-2 (log -2), a minimum near 1e-1, then divergence.
    losses = 2.3 - 1.5 / (1 + np.exp(-(log_lr + 2) * 3)) + np.where(log_lr > -0.7, 20 * (log_lr + 0.7) ** 2, 0)
    losses[3] = 9.0  # an early spike
    found = suggest_lr(lrs, list(losses))
    assert 2e-3 < found.lr < 5e-2 and found.falls
    assert found.region[0] <= found.lr <= found.region[1] and found.stop < 100


def test_suggested_lr_stays_off_the_noisy_start_and_the_cliff_edge():
    """fastai's known failure: the steepest point of a noisy curve lies on the noisy start, or on
    the plunge right before the divergence. The pick stays in the descending region, at least 10×
    below the lr of the lowest loss."""
    rng = np.random.default_rng(0)
    lrs = list(np.logspace(-5, 1, 100))
    log_lr = np.log10(lrs)
    # Noisy and flat up to 1e-3, a gentle fall, a plunge just before the minimum at ~1, then divergence.
    losses = 2.3 - 0.3 * np.clip(log_lr + 3, 0, None) - 1.0 / (1 + np.exp(-(log_lr + 0.3) * 25))
    losses = losses + np.where(log_lr > 0.05, 40 * (log_lr - 0.05) ** 2, 0)
    losses[:25] += rng.normal(0, 0.4, 25)  # noise at the start, larger than the gentle slope
    found = suggest_lr(lrs, list(losses))
    assert found.lr <= found.lr_at_minimum / 10 + 1e-12  # not on the cliff edge (the plunge is at ~0.5)
    assert found.region[0] <= found.lr <= found.region[1] and found.region[0] > 1e-3  # not on the noisy start
    check = check_lr_range(lrs, list(losses), configured=found.lr_at_minimum * 2, unit="per batch")
    assert check.verdict == "warn" and f"--lr {found.lr:.2g}" in check.advice and "per batch" in check.figure


# --- 8. capacity ----------------------------------------------------------------------------------
def test_capacity_compares_widths_and_skips_models_without_one(digits):
    assert check_capacity(None, digits["x"], digits["y"]).verdict == "skip"
    make = lambda width: create_model("fastnet", 10, in_channels=1, image_size=8, width=width / 4)  # noqa: E731
    check = check_capacity(make, digits["x"][:256], digits["y"][:256], steps=15)
    assert check.verdict in ("pass", "warn") and len(check.values["train_loss"]) == 2


# --- 9. determinism -------------------------------------------------------------------------------
def test_determinism_fails_for_an_unseeded_run():
    assert check_determinism(lambda: [2.3, 2.1, 1.9]).verdict == "pass"
    rng = np.random.default_rng()
    assert check_determinism(lambda: list(rng.random(3))).verdict == "fail"


# --- the command ----------------------------------------------------------------------------------
def test_doctor_cli_on_a_leaky_folder_exits_1_and_writes_doctor_json(tmp_path):
    root = write_folder(tmp_path / "leaky", test_copies=2)
    out = tmp_path / "doc"
    proc = run_cli("doctor", "--data", root, "--model", "seedcnn", "--val-fraction", "0", "--out", out, "--json",
                   "--data-dir", tmp_path / "cache", timeout=300)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    verdicts = {c["name"]: c["verdict"] for c in report["checks"]}
    assert verdicts["train/test leakage"] == "fail" and not report["passed"]
    assert len(verdicts) == 13 and verdicts["capacity"] == "skip"
    assert json.loads((out / "doctor.json").read_text())["checks"] == report["checks"]
    for name in ("samples.png", "batch.png", "lr_range.png"):
        assert (out / name).stat().st_size > 1000


def test_doctor_cli_rejects_bad_input_in_one_line(tmp_path, capsys):
    assert main(["doctor", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "doc")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert main(["doctor", "--model", "nonet"]) == 2 and "unknown model" in capsys.readouterr().err


def test_doctor_passes_every_check_on_digits(tmp_path):
    proc = run_cli("doctor", "--data", "digits", "--out", tmp_path / "doc", "--data-dir", tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "doc" / "doctor.json").read_text())
    assert all(c["verdict"] == "pass" for c in report["checks"]), proc.stdout


def test_doctor_builds_the_run_training_builds_on_small_data(tmp_path):
    """One build_run for both: on 1,293 digits the recipe's batch of 512 shrinks to 64 for the
    doctor as for the trainer, with the task's smoothed loss and the same normalisation."""
    from visionrecipe.config import Config, load_config
    from visionrecipe.doctor.runner import prepare
    from visionrecipe.rundir import unlock
    from visionrecipe.train.loop import Trainer

    settings = Config.from_dict({"data": "digits", "data_dir": str(tmp_path / "cache"), "device": "cpu", "threads": 1,
                                 "out": str(tmp_path / "run"), "progress": False})
    trainer = Trainer(settings)
    trainer.setup()
    unlock(trainer.run_dir)
    doctor = prepare(settings, device="cpu")

    assert trainer.cfg.optim.batch_size == doctor.cfg.optim.batch_size == 64  # the recipe's 512, shrunk
    assert doctor.cfg == trainer.cfg == load_config(tmp_path / "run" / "config.yaml")  # config.yaml is what runs
    assert (doctor.mean, doctor.std) == (trainer.mean, trainer.std) == channel_stats(doctor.data.train.images)
    logits, y = torch.randn(8, 10), torch.arange(8)
    smoothed = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.2)  # the fast recipe's
    assert torch.equal(doctor.loss_fn(logits, y), smoothed) and torch.equal(trainer.built.loss_fn(logits, y), smoothed)
    assert settings.optim.batch_size is None and settings.model.width is None  # resolving copies, never mutates


def test_every_flag_the_doctor_recommends_exists_on_train():
    """The doctor's advice names flags (`--sampler balanced`, `--lr 0.02`): each must be a flag of
    `train`, spelled exactly, read from the doctor's source so a new message is checked too."""
    import ast
    import re
    from pathlib import Path

    import visionrecipe.doctor
    from visionrecipe.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices
    train_flags = set(commands["train"]._option_string_actions)
    named = {}
    for path in Path(visionrecipe.doctor.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", node.value):
                    named.setdefault(flag, path.name)
    assert {"--sampler", "--class-weights", "--lr", "--image-size", "--deterministic"} <= set(named)
    missing = {flag: where for flag, where in named.items() if flag not in train_flags}
    assert not missing, f"the doctor recommends flags train does not have: {missing}"
