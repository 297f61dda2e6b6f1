"""report.html: the same numbers as eval.json, self-contained, and it renders in a real browser."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from visionrecipe.cli import main
from visionrecipe.evaluate.scoring import calibration
from visionrecipe.evaluate.report import write_report

from conftest import run_cli

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def report_run(digits_run, tmp_path_factory) -> Path:
    """A copy of the shared digits run (the report rewrites eval.json), with a doctor.json beside it."""
    run = tmp_path_factory.mktemp("report") / "digits"
    shutil.copytree(digits_run, run)
    doctor = {"data": "digits", "model": "seedcnn", "passed": True, "checks": [
        {"name": "loss at init", "verdict": "pass", "figure": "2.303 vs ln(10) = 2.303", "advice": ""},
        {"name": "capacity", "verdict": "skip", "figure": "n/a: <no width>", "advice": ""}]}
    (run / "doctor.json").write_text(json.dumps(doctor))
    write_report(run)
    return run


def report_data(run: Path) -> dict:
    text = (run / "report.html").read_text()
    found = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)
    return json.loads(found.group(1))


def test_report_figures_equal_eval_json(report_run, digits_run):
    page, evaluated = report_data(report_run), json.loads((report_run / "eval.json").read_text())
    result = page["result"]
    for key in ("accuracy", "top5_accuracy", "loss", "num_images", "num_correct", "confusion_matrix", "per_class",
                "ece", "calibration"):
        assert result[key] == evaluated[key], key
    # ... and the scores the training run itself wrote (rewriting eval.json changed nothing but calibration).
    trained = json.loads((digits_run / "eval.json").read_text())
    assert (result["num_correct"], result["confusion_matrix"]) == (trained["num_correct"], trained["confusion_matrix"])
    text = (report_run / "report.html").read_text()
    assert f"{100 * evaluated['accuracy']:.2f}%" in text
    assert page["splits"]["test"] == evaluated["num_images"] and page["parameters"] > 0
    assert page["doctor"]["checks"][0]["name"] == "loss at init" and "n/a: &lt;no width&gt;" in text
    assert all(m["true"] != m["predicted"] for m in page["mistakes"])
    confidences = [m["confidence"] for m in page["mistakes"]]
    assert confidences == sorted(confidences, reverse=True)


def test_report_is_self_contained(report_run):
    text = (report_run / "report.html").read_text()
    for name in ("curves.png", "confusion.png", "reliability.png", "mistakes.png"):
        assert (report_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sources = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert sources and all(s.startswith("data:") for s in sources), sources
    assert "http://" not in text and "https://" not in text and "@import" not in text
    assert len(re.findall(r'<img src="data:image/png;base64,', text)) == 4


def test_calibration_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(400, 5, generator=g) * 3, torch.randint(0, 5, (400,), generator=g)
    result = calibration(logits, labels)
    confidence, predicted = logits.softmax(1).max(1)
    ece = 0.0
    for b in range(15):
        mask = (confidence >= b / 15) & (confidence < (b + 1) / 15)
        if mask.any():
            accuracy = (predicted[mask] == labels[mask]).float().mean()
            ece += mask.float().mean() * (accuracy - confidence[mask].mean()).abs()
    assert result["ece"] == pytest.approx(float(ece), abs=1e-6)
    assert sum(row["count"] for row in result["calibration"]) == 400
    sure = calibration(torch.eye(5) * 100, torch.arange(5))  # confident and right: perfectly calibrated
    assert sure["ece"] == pytest.approx(0.0, abs=1e-6)


def test_report_opens_in_headless_chromium_without_errors(report_run):
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("python playwright is not installed")
    if not CHROMIUM.exists():
        pytest.skip(f"no chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto((report_run / "report.html").resolve().as_uri())
        page.wait_for_load_state("load")
        widths = page.evaluate("[...document.images].map(img => img.complete ? img.naturalWidth : 0)")
        heading = page.text_content("h1")
        browser.close()
    assert len(widths) == 4 and all(w > 0 for w in widths), widths
    assert errors == []
    assert "digits" in heading


def test_report_cli(report_run, tmp_path, capsys):
    proc = run_cli("report", report_run)
    assert proc.returncode == 0, proc.stderr
    assert "report.html" in proc.stdout
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1


def test_evaluate_per_class_prints_a_row_per_class(report_run, capsys):
    assert main(["evaluate", str(report_run), "--per-class"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("test accuracy")
    assert lines[1].split() == ["class", "precision", "recall", "f1", "support"]
    assert [line.split()[0] for line in lines[2:12]] == [str(i) for i in range(10)]


def test_training_writes_tensorboard_events_and_the_report(tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from visionrecipe import train

    out = tmp_path / "run"
    train(data="digits", model="seedcnn", epochs=2, out=str(out), progress=False, report=True, tensorboard=True,
          threads=1, data_dir=str(tmp_path / "cache"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train_loss", "val_loss", "val_acc", "lr"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val_acc")] == [1, 2]
    assert report_data(out)["result"]["accuracy"] == json.loads((out / "eval.json").read_text())["accuracy"]


def test_torn_last_metrics_line_does_not_stop_the_report(report_run, tmp_path):
    from visionrecipe.rundir import Run

    run = tmp_path / "run"
    shutil.copytree(report_run, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 7, "train_lo')  # a crash in the middle of epoch 7's append
    assert [m["epoch"] for m in Run(run).metrics] == [1, 2, 3, 4, 5, 6]
    write_report(run)
    assert report_data(run)["epochs"] == 6


def test_report_write_failure_is_one_line_and_leaves_no_partial_file(report_run, tmp_path):
    from conftest import run_cli_with_file_limit

    run = tmp_path / "run"
    shutil.copytree(report_run, run)
    figures = {p.name: p.read_bytes() for p in run.glob("*.png")} | {"report.html": (run / "report.html").read_bytes()}
    assert len(figures) == 5
    proc = run_cli_with_file_limit("report", run, max_bytes=20_000)  # eval.json fits, the curves do not
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: could not write {run / 'curves.png'}: File too large"]
    assert {name: (run / name).read_bytes() for name in figures} == figures  # earlier files intact
    assert not list(run.glob(".*.tmp"))
