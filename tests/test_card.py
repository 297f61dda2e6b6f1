"""MODEL_CARD.md: written at the end of train, from the run's own files, each field matching its source."""

from __future__ import annotations

import json
import shutil

import yaml

from visionrecipe.deploy.card import model_card


def test_train_writes_a_card_whose_fields_match_the_run_files(digits_run):
    card = (digits_run / "MODEL_CARD.md").read_text()
    meta = json.loads((digits_run / "model.json").read_text())
    result = json.loads((digits_run / "eval.json").read_text())
    config = yaml.safe_load((digits_run / "config.yaml").read_text())
    assert card == model_card(digits_run)
    assert f"# {digits_run.name}: seedcnn on digits" in card
    assert f"- classes (10): {', '.join(f'`{c}`' for c in meta['classes'])}" in card
    assert f"| accuracy | {100 * result['accuracy']:.2f}% |" in card
    assert f"| loss | {result['loss']:.4f} |" in card
    for row in result["per_class"]:
        assert f"| {row['class']} | {row['precision']:.3f} | {row['recall']:.3f} |" in card
    assert f"| epochs | {config['optim']['epochs']} |" in card and f"| kept epoch (by validation) | {meta['epoch']} |" in card
    assert "## Intended use" in card and "## Limits" in card


def test_a_run_not_scored_yet_says_so(digits_run, tmp_path):
    for name in ("model.json", "config.yaml"):
        shutil.copy(digits_run / name, tmp_path / name)
    card = model_card(tmp_path)
    assert "Not scored on a test split yet" in card and "| accuracy |" not in card
