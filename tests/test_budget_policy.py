"""The budget policy (recipes.py data, train/plan.py measurement) and the memory check before the first step."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import run_cli
from visionrecipe.config import Config
from visionrecipe.recipes import (DEFAULT_PHOTO_BUDGET, progressive_costs, FIXRES, min_epochs, PHOTO_CROPS, PHOTO_TIERS, PROGRESSIVE_RAMP,
                                  SMALL_TIERS, afforded_epochs, plan_tier, progressive_start, eval_side, training_side)
from visionrecipe.system import world
from visionrecipe.train import plan as plan_module
from visionrecipe.train.budget import plan_budget, replan_budget

CPU = torch.device("cpu")


def speeds_for(tiers, first: float) -> dict:
    """Speeds falling with each tier as a real device's do (each tier half as fast as the one before)."""
    return {tier: first / 2 ** i for i, tier in enumerate(tiers)}


# ---------------------------------------------------------------- the policy: a pure function of its inputs

def test_plan_is_a_pure_function_and_buys_more_with_more_budget():
    speeds = speeds_for(PHOTO_TIERS, 2000.0)
    plans = [plan_tier(PHOTO_TIERS, 9000, 224, budget, speeds) for budget in (60, 300, 900, 1800, 7200)]
    assert plans[2] == plan_tier(PHOTO_TIERS, 9000, 224, 900, dict(speeds))  # same inputs, same plan
    order = [PHOTO_TIERS.index(p.tier) for p in plans]
    assert order == sorted(order) and order[0] < order[-1]  # a longer budget never buys a cheaper net
    for p in plans:
        need = min_epochs(p.tier)
        assert p.epochs >= need or PHOTO_TIERS.index(p.tier) == 0  # affords the epochs, or is the cheapest
        if PHOTO_CROPS:
            # FixRes: evaluated above the final training side; progressive: starting below it
            assert p.train_size <= p.image_size <= 224 and p.image_size == eval_side(p.train_size, 224)
            assert p.train_size_start == progressive_start(p.train_size) < p.train_size
        else:
            assert p.image_size == p.tier.size and p.train_size is None


def test_plan_never_trains_above_the_images_own_side_and_takes_the_cheapest_when_nothing_affords():
    speeds = speeds_for(PHOTO_TIERS, 1e6)  # everything affordable
    small = plan_tier(PHOTO_TIERS, 1000, 100, 3600, speeds)
    assert small.tier.size <= 100 and small.image_size <= 100
    starved = plan_tier(PHOTO_TIERS, 10**6, 224, 10, speeds_for(PHOTO_TIERS, 100.0))
    assert starved.tier == PHOTO_TIERS[0] and "cheapest" in starved.reason


def test_small_images_choose_fastnet_width_from_the_budget():
    speeds = {SMALL_TIERS[0]: 1270.0, SMALL_TIERS[1]: 674.0, SMALL_TIERS[2]: 411.0}  # measured, 2 cores
    short = plan_tier(SMALL_TIERS, 45000, 32, 300, speeds)
    long = plan_tier(SMALL_TIERS, 45000, 32, 600, speeds)
    assert short.tier.width == 0.5 and long.tier.width == 0.75
    assert short.image_size is None and short.train_size is None  # the 32-px path: the data's own side


def test_training_side_ramps_up_in_steps_then_holds():
    sides = [training_side(128, 96, step, 1000) for step in range(1000)]
    assert sides[0] == 96 and sides[-1] == 128 and sides == sorted(sides)
    assert all(side % 16 == 0 for side in sides)
    assert sides[int(PROGRESSIVE_RAMP * 1000)] == 128 and sides[int(PROGRESSIVE_RAMP * 1000) - 50] < 128
    assert training_side(128, 128, 0, 1000) == 128  # no ramp
    assert eval_side(128, 224) == round(FIXRES * 128 / 8) * 8 and eval_side(128, 130) == 130


def test_a_budget_covers_the_costlier_late_steps_of_progressive_resizing():
    costs = partial(progressive_costs, 128, 96)
    steps = 1000
    assert np.allclose(costs(steps), [(training_side(128, 96, s, steps) / 128) ** 2 for s in range(steps)])
    assert plan_budget(100, 1.0, 50, 0.0) == (800, 16)  # equal steps: 8 steps in 1 s, 800 in 100 s
    total, _ = plan_budget(100, 1.0, 50, 0.0, costs=costs, planned=steps)
    # the 8 probe steps ran at 96 px (0.5625 of a full step): the plan's steps cost exactly the budget
    unit = 1.0 / costs(steps)[:8].sum()
    assert costs(total).sum() * unit <= 100 < costs(total + 1).sum() * unit
    assert total < 800 / 0.5625  # not the count the cheap first steps would suggest
    # at an epoch end: the steps left fill the time left at the speed measured so far
    total, _ = replan_budget(100, 50, 400, 8, 50, costs=costs, planned=800)
    unit = 50 / costs(800)[:400].sum()
    assert costs(total)[400:].sum() * unit <= 50 < costs(total + 1)[400:].sum() * unit


def test_measure_speeds_times_only_what_could_be_chosen(monkeypatch):
    timed = []

    def fake_probe(tier, side, device):
        timed.append(tier)
        return 4000.0 / 2 ** PHOTO_TIERS.index(tier)

    monkeypatch.setattr(plan_module, "probe_speed", fake_probe)
    speeds = plan_module.measure_speeds(PHOTO_TIERS, 9000, 224, 300, CPU)
    assert set(speeds) == set(PHOTO_TIERS)  # every usable tier has a speed, timed or estimated
    assert timed == list(PHOTO_TIERS[:len(timed)]) and 1 <= len(timed) < len(PHOTO_TIERS)
    need = min_epochs(PHOTO_TIERS[0])
    # every timed tier but the last afforded the epochs; the walk ended at one that did not, or the
    # next one's estimate was too far below them to be worth timing
    assert all(afforded_epochs(t, speeds[t], 9000, 300) >= need for t in timed[:-1])
    nxt = PHOTO_TIERS[len(timed)]
    assert (afforded_epochs(timed[-1], speeds[timed[-1]], 9000, 300) < need
            or afforded_epochs(nxt, speeds[nxt], 9000, 300) < plan_module.PROBE_CUTOFF * need)
    # and the plan is what plan_tier makes of these speeds: the last affordable timed tier
    chosen = plan_tier(PHOTO_TIERS, 9000, 224, 300, speeds).tier
    assert chosen == max((t for t in timed if afforded_epochs(t, speeds[t], 9000, 300) >= need), key=PHOTO_TIERS.index)


# ---------------------------------------------------------------- the policy in a run

def write_photos(root: Path, per_class: int = 12, side: int = 100) -> None:
    """Photos of 100 px and more (both orientations), two classes told apart by colour."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (side + 30, side) if i % 2 else (side, side + 20)
            pixels = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
            pixels[..., label] += 120
            Image.fromarray(pixels).save(root / name / f"{i:02d}.jpg")


@pytest.fixture(scope="module")
def planned_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("policy")
    write_photos(base / "photos")
    out = base / "run"
    result = run_cli("train", "--data", base / "photos", "--data-dir", base / "cache", "--out", out,
                     "--time-budget", "6", "--no-progress", "--no-report")
    assert result.returncode == 0, result.stderr[-2000:]
    return base, out, result.stdout


def test_the_plan_is_the_first_line_and_its_choice_is_in_config_yaml(planned_run):
    base, out, stdout = planned_run
    first = stdout.strip().splitlines()[0]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    optim, data, model = cfg["optim"], cfg["data"], cfg["model"]
    assert first.startswith(f"plan: {model['model']} (width {model['width']:g})"), first
    assert model["model"] == PHOTO_TIERS[0].model and optim["recipe"] == "fast"
    if PHOTO_CROPS:
        assert "progressive" in first and "FixRes" in first and optim["crop_scale"] > 0
        assert optim["train_size_start"] < optim["train_size"] < data["image_size"] <= 100
        assert f"{optim['train_size_start']}→{optim['train_size']} px" in first
        assert f"evaluated at {data['image_size']} px" in first
        # the budget planned the growing steps' cost: the schedule reached its low end within the budget
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["lr"] < 0.3 * max(r["lr"] for r in records) and records[-1]["elapsed_s"] < 6 * 1.25
    else:
        assert optim["crop_scale"] == 0 and f"at {data['image_size']} px" in first
    # evaluation, predict and export see the stored (FixRes) side
    meta = json.loads((out / "model.json").read_text())
    assert meta["preprocess"] == {"resize": data["image_size"], "crop": data["image_size"]}
    result = run_cli("predict", out, base / "photos" / "cat", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 12


def test_a_planned_run_replays_its_config_without_measuring_again(planned_run, monkeypatch):
    _, out, _ = planned_run
    from visionrecipe.config import load_config

    cfg = load_config(out / "config.yaml")
    monkeypatch.setattr(plan_module, "probe_speed", lambda *a: pytest.fail("a resolved config measured again"))
    again, line = plan_module.plan_run(cfg, CPU, world(CPU))
    assert line is None and again.to_dict() == cfg.to_dict()


def test_photos_without_budget_or_epochs_get_the_default_budget(tmp_path, monkeypatch):
    write_photos(tmp_path / "photos", per_class=4)
    monkeypatch.setattr(plan_module, "probe_speed", lambda tier, side, device: 1000.0 / (tier.size or 32))
    cfg, line = plan_module.plan_run(Config.from_dict({"data": str(tmp_path / "photos")}), CPU, world(CPU))
    assert cfg.optim.time_budget == DEFAULT_PHOTO_BUDGET and "the default for photos" in line
    assert cfg.model.model == PHOTO_TIERS[0].model and cfg.data.image_size <= 100
    # a given model, or given epochs on small images, are left to the recipe
    given = Config.from_dict({"data": str(tmp_path / "photos"), "model": "seedcnn"})
    assert plan_module.plan_run(given, CPU, world(CPU)) == (given, None)
    digits = Config.from_dict({"data": "digits", "epochs": 3})
    assert plan_module.plan_run(digits, CPU, world(CPU)) == (digits, None)


# ---------------------------------------------------------------- memory: checked before the first step

def test_a_step_too_big_for_memory_is_split_into_micro_batches(tmp_path):
    out = tmp_path / "run"
    # fastnet (width 0.5) at 32 px keeps about 1.1 MiB per image: a batch of 64 does not fit 60 MiB "free"
    result = run_cli("train", "--data", "digits", "--image-size", "32", "--model", "fastnet", "--batch-size", "64",
                     "--epochs", "1", "--out", out, "--no-progress", "--no-report", "--data-dir", tmp_path / "c",
                     env={"VISIONRECIPE_FREE_MEMORY": str(60 * 2**20)})
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("memory:"))
    accum = yaml.safe_load((out / "config.yaml").read_text())["optim"]["grad_accum"]
    assert accum > 1 and f"--grad-accum {accum}" in line and yaml.safe_load(
        (out / "config.yaml").read_text())["optim"]["batch_size"] == 64


def test_a_plan_that_cannot_fit_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--data", "digits", "--image-size", "64", "--model", "fastnet", "--epochs", "1",
                     "--out", out, "--no-progress", "--data-dir", tmp_path / "c",
                     env={"VISIONRECIPE_FREE_MEMORY": str(2**20)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: not enough memory: training fastnet at 64 px")
    assert "Traceback" not in result.stderr and not out.exists()


def test_memory_estimate_grows_with_the_side_and_the_batch():
    cfg = Config.from_dict({"data": "digits", "model": "photonet"})
    small, weights = plan_module.step_memory(cfg, 3, 10, 64)
    large, same_weights = plan_module.step_memory(cfg, 3, 10, 128)
    assert weights == same_weights > 0 and 3.5 < large / small < 4.5  # activations ∝ side²


def test_fastnet_whitening_reads_a_bounded_number_of_pixels():
    """The whitening layer's patches are counted in pixels: 5,000 CIFAR images, or far fewer photos (5,000 photos at
    160 px unfold into 6 GB of float patches, which killed a run)."""
    from visionrecipe.train.build import WHITENING_PIXELS, whitening_images

    assert whitening_images(32) == 5000
    for side in (64, 112, 160, 224, 512):
        assert whitening_images(side) == 64 or whitening_images(side) * side * side <= WHITENING_PIXELS
        assert whitening_images(side) < 5000


def test_auto_on_photos_trains_every_trial_and_the_final_run_at_the_policy_sides(tmp_path):
    """`auto` plans like `train --time-budget`: its plan stage fixes the sides and crops for the
    final run's budget, and the search explores the rest at them."""
    pytest.importorskip("optuna")
    write_photos(tmp_path / "photos")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"include_defaults": False, "model": "fastnet", "width": 0.25, "epochs": 1,
                                     "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}))
    out = tmp_path / "auto"
    result = run_cli("auto", "--data", tmp_path / "photos", "--data-dir", tmp_path / "cache", "--search-budget", 40,
                     "--space", space, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("plan:") and "every trial and the final run train at these sides" in lines[0]
    final = yaml.safe_load((out / "final" / "config.yaml").read_text())
    trial = yaml.safe_load(next((out / "tune" / "trials").glob("*/config.yaml")).read_text())
    for cfg in (final, trial):
        assert cfg["model"]["model"] == "fastnet"  # the space's model, at the plan's sides
        assert 0 < cfg["optim"]["train_size"] <= cfg["data"]["image_size"] <= 100
    sides = lambda c: (c["data"]["image_size"], c["optim"]["train_size"], c["optim"]["train_size_start"],  # noqa: E731
                       c["optim"]["crop_scale"])
    assert sides(final) == sides(trial)
    assert f"→{final['optim']['train_size']} px, evaluated at {final['data']['image_size']} px" in lines[0]


def test_a_fixed_input_net_trains_at_the_stored_side(tmp_path, capsys):
    """seedcnn's classifier is sized for one input side: given the policy's training sides (auto's
    plan stage gives them to every trial) it trains at the stored side instead, and says so."""
    from visionrecipe.data import load_dataset
    from visionrecipe.train.build import resolve

    write_photos(tmp_path / "photos", per_class=4)
    data = load_dataset(str(tmp_path / "photos"), data_dir=tmp_path / "cache", image_size=72, progress=False)
    settings = {"data": str(tmp_path / "photos"), "image_size": 72, "train_size": 64, "train_size_start": 48}
    resolved = resolve(Config.from_dict({**settings, "model": "seedcnn"}), "cpu", data)
    assert (resolved.optim.train_size, resolved.optim.train_size_start) == (None, None)
    assert "seedcnn takes 72 px inputs only" in capsys.readouterr().err
    fastnet = resolve(Config.from_dict({**settings, "model": "fastnet"}), "cpu", data)
    assert fastnet.optim.train_size == 64  # a net that takes any side keeps them
