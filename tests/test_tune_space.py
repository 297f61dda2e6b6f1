"""The search space as a study stores it: every space tune can store reads back unchanged.

A continued tune (and a worker recovering a killed one) reads the space from the study, not from
the file, so `space_from_dict(space_to_dict(space)) == space` must hold for every distribution
kind, every default space, and bounds of 0 (issue 14, item 3: `0 == False` once dropped them).
"""

from __future__ import annotations

import pytest
import yaml

from conftest import run_cli

optuna = pytest.importorskip("optuna")

from visionrecipe.tune.space import Param, default_space, load_space, space_from_dict, space_to_dict  # noqa: E402

# One entry per kind a space file can hold, with bounds at 0 where the setting allows it.
EVERY_KIND = {
    "include_defaults": False,
    "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
    "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
    "crop_padding": {"type": "int", "low": 0, "high": 2},
    "epochs": {"type": "int", "low": 1, "high": 8, "log": True},
    "batch_size": {"type": "categorical", "choices": [32, 64]},
    "model": {"type": "categorical", "choices": ["seedcnn", "fastnet"]},
    "ema_decay": {"type": "categorical", "choices": [0.0, 0.99]},
    "ema": {"type": "categorical", "choices": [False, True]},
    "weight_decay": 0.0,  # fixed: not searched
    "seed": 0,
}


def stored_and_loaded(space: dict, tmp_path) -> dict:
    """The space after a real round trip through an Optuna study's user attributes (SQLite)."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="s", load_if_exists=True)
    study.set_user_attr("space", space_to_dict(space))
    return space_from_dict(optuna.load_study(study_name="s", storage=storage).user_attrs["space"])


@pytest.mark.parametrize("recipe", ["standard", "fast"])
@pytest.mark.parametrize("max_epochs", [1, 2, 6])
@pytest.mark.parametrize("image_size", [8, 32])
def test_every_default_space_round_trips(tmp_path, recipe, max_epochs, image_size):
    space = default_space(image_size=image_size, recipe=recipe, max_epochs=max_epochs)
    assert space["label_smoothing"].low == 0.0 and space["crop_padding"].low == 0  # the bounds that broke
    assert stored_and_loaded(space, tmp_path) == space
    del space["epochs"]  # what tune searches with --time-budget
    assert stored_and_loaded(space, tmp_path) == space


def test_every_kind_from_a_space_file_round_trips(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(EVERY_KIND))
    space = load_space(path, base={})
    assert space["label_smoothing"] == Param("float", 0.0, 0.2)
    assert space["crop_padding"] == Param("int", 0, 2) and space["epochs"].log
    assert space["weight_decay"] == 0.0 and space["seed"] == 0
    assert stored_and_loaded(space, tmp_path) == space


def test_continued_tune_reads_its_stored_space(tmp_path):
    """`tune --trials 2`, then `tune --out T --trials 3` without --space: the study's space is used."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"include_defaults": False, "model": "seedcnn", "epochs": 1,
                                     "label_smoothing": {"type": "float", "low": 0.0, "high": 0.1},
                                     "crop_padding": {"type": "int", "low": 0, "high": 1}}))
    out = tmp_path / "tune"
    first = run_cli("tune", "--data", "digits", "--space", space, "--trials", 2, "--out", out)
    assert first.returncode == 0, first.stderr
    again = run_cli("tune", "--out", out, "--trials", 3)
    assert again.returncode == 0, again.stderr
    assert "2 finished trial(s), target 3" in again.stdout and "[3/3]" in again.stdout
    study = optuna.load_study(study_name="visionrecipe", storage=f"sqlite:///{out / 'study.db'}")
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3
    assert all(0.0 <= t.params["label_smoothing"] <= 0.1 and t.params["crop_padding"] in (0, 1) for t in finished)
