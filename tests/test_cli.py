"""Bad input gets one line on stderr and exit status 2; no tracebacks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_cli


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("args, words", [
    (["train", "--data", "/no/such/folder"], ["/no/such/folder"]),
    (["train", "--data", "digits", "--model", "resnt18"], ["resnt18", "resnet18"]),
    (["train", "--data", "digits", "--optimizer", "sgdd"], ["optimizer", "sgdd"]),
    (["train", "--data", "digits", "--epochs", "0"], ["epochs"]),
    (["train", "--data", "digits", "--batch-size", "-3"], ["batch_size"]),
    (["train", "--data", "digits", "--lr", "abc"], ["lr", "abc"]),
    (["evaluate", "/no/such/run"], ["/no/such/run"]),
    (["predict", "/no/such/run", "x.png"], ["/no/such/run"]),
    (["train", "--config", "/no/such.yaml"], ["/no/such.yaml"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_bad_input_one_line(args, words, tmp_path):
    assert_one_line_error(run_cli(*args, cwd=tmp_path), *words)


def test_empty_folder_and_class_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("train", "--data", tmp_path / "empty", cwd=tmp_path), "empty")
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    (data / "dog").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(data / "cat" / f"{i}.png")
    assert_one_line_error(run_cli("train", "--data", data, cwd=tmp_path), "dog")


def test_existing_run_not_overwritten(digits_run, tmp_path):
    before = (digits_run / "model.safetensors").read_bytes()
    proc = run_cli("train", "--data", "digits", "--out", digits_run, "--epochs", "1", cwd=tmp_path)
    assert_one_line_error(proc, "--overwrite")
    assert (digits_run / "model.safetensors").read_bytes() == before


def test_checkpoint_mismatch(digits_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(digits_run, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert_one_line_error(run_cli("evaluate", broken), "model.safetensors")


def test_predict_prints_topk(digits_run, tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    Image.fromarray((digits.images[0] * 255 / 16).round().astype("uint8"), mode="L").save(tmp_path / "zero.png")
    (tmp_path / "bad.png").write_bytes(b"")
    proc = run_cli("predict", digits_run, tmp_path / "zero.png", tmp_path / "bad.png", "--topk", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    rows = json.loads(proc.stdout)
    assert rows[0]["top"][0]["class"] == "0" and len(rows[0]["top"]) == 3
    assert "error" in rows[1]


def test_models_lists_and_layer_table():
    proc = run_cli("models")
    assert proc.returncode == 0 and "seedcnn" in proc.stdout and "resnet18_cifar" in proc.stdout
    proc = run_cli("models", "seedcnn", "--image-size", "32")
    assert proc.returncode == 0
    # the seed's network at 32×32: the flatten is 128·8·8, so fc1 holds 8192·1024 + 1024 parameters
    assert "8,389,632" in proc.stdout and "8,475,530" in proc.stdout


# ---------------------------------------------------------------------------- flags from dataclasses

def subparsers():
    import argparse

    from visionrecipe.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_command_has_its_flags_from_its_dataclasses():
    """The parser's arguments are exactly the fields of the dataclasses the command table names."""
    from visionrecipe.cli import COMMANDS, cli_fields

    parsers = subparsers()
    assert list(parsers) == [c.name for c in COMMANDS] == ["train", "evaluate", "predict", "models", "doctor",
                                                           "report", "tune", "auto", "export", "push", "serve"]
    for command in COMMANDS:
        declared = [f.name for entry in command.settings for f in cli_fields(entry)]
        assert len(declared) == len(set(declared)), f"{command.name}: a setting declared twice"
        dests = {a.dest for a in parsers[command.name]._actions if a.dest != "help"}
        assert dests == set(declared), command.name


def test_every_flag_has_help_and_enumerations_show_choices_and_defaults():
    parsers = subparsers()
    for name, parser in parsers.items():
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    train = parsers["train"].format_help()
    assert "--optimizer {sgd,adam,adamw,adagrad}" in train and "--schedule {constant,cosine,onecycle,triangle}" in train
    assert "(default: recipe fast: 1.5 per 1024 images; standard: 0.001)" in " ".join(train.split())
    assert "(default: recipe fast: sgd; standard: adamw)" in " ".join(train.split())
    tune = " ".join(parsers["tune"].format_help().split())
    assert "--pruner {median,halving,none}" in tune and "(default: median)" in tune
    assert "--search-budget" in tune and "--trial-workers" in tune and "(default: 20)" in tune
    assert "(default: recipe fast: 512; standard: 64)" in tune  # the trials' batch size
    for command, flag in [("predict", "--topk"), ("evaluate", "--split"), ("models", "--image-size")]:
        action = next(a for a in parsers[command]._actions if flag in a.option_strings)
        assert action.help


def test_a_flag_means_one_thing_everywhere():
    """One flag, one setting: it sets the same name in every command, and the settings that were
    declared several times by hand (--device, --seed, --time-budget) come from one field."""
    from visionrecipe.cli import COMMANDS, cli_fields, flag_of
    from visionrecipe.config import FIELDS

    dest_of, field_of = {}, {}
    for command in COMMANDS:
        for entry in command.settings:
            for f in cli_fields(entry):
                flag = flag_of(f)
                assert dest_of.setdefault(flag, f.name) == f.name, flag
                field_of.setdefault(flag, set()).add(f)
    for flag in ("--device", "--seed", "--threads", "--time-budget", "--decode-workers", "--data-dir", "--config"):
        assert len(field_of[flag]) == 1, flag
    assert FIELDS["time_budget"][1] in field_of["--time-budget"]  # seconds of training, in train and tune
    assert "--workers" not in dest_of and "--trial-budget" not in dest_of
    assert {f.name for f in field_of["--search-budget"]} == {"search_budget"}  # tune's and auto's whole job
    parsers = subparsers()
    assert parsers["tune"].parse_args(["--out", "t", "--time-budget", "30"]).time_budget == 30.0
    assert parsers["train"].parse_args(["--decode-workers", "2"]).workers == 2


def test_bad_values_of_any_command_are_one_line_errors(tmp_path):
    assert_one_line_error(run_cli("tune", "--data", "digits", cwd=tmp_path), "--out")
    assert_one_line_error(run_cli("auto", "--out", tmp_path / "a", cwd=tmp_path), "--search-budget")
    assert_one_line_error(run_cli("predict", "m.onnx", "a.png", "--topk", "x", cwd=tmp_path), "topk", "x")
    assert_one_line_error(run_cli("evaluate", "run", "--split", "dev", cwd=tmp_path), "split", "dev")
    assert_one_line_error(run_cli("tune", "--out", tmp_path / "t", "--workers", "2", cwd=tmp_path), "--workers")


def test_version():
    from visionrecipe import __version__

    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"visionrecipe {__version__}"


def test_piped_train_is_plain_lines_and_names_its_files(tmp_path):
    """In a pipe: no progress-bar frames, one line per epoch, a skipped image is one `warning:` line;
    the report's worst-mistakes gallery names each image's file; resuming the finished run says so."""
    import json

    import numpy as np

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    (tmp_path / "data" / "cat" / "broken.png").write_bytes(b"not an image")
    run = tmp_path / "run"
    done = run_cli("train", "--data", tmp_path / "data", "--data-dir", tmp_path / "cache", "--model", "seedcnn",
                   "--epochs", "2", "--out", run, "--device", "cpu", "--val-fraction", "0.2")
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout + done.stderr
    epochs = [line for line in done.stdout.splitlines() if line.startswith("Epoch")]
    assert len(epochs) == 2 and all(re.match(rf"Epoch {i}/2  loss \S+  val_loss", line) for i, line in enumerate(epochs, 1))
    warnings = [line for line in done.stderr.splitlines() if line.strip()]
    assert warnings == [f"warning: skipping unreadable image {tmp_path / 'data' / 'cat' / 'broken.png'}: "
                        "not an image PIL can read"], done.stderr
    page = (run / "report.html").read_text()
    mistakes = json.loads(re.search(r'id="report-data">(.*?)</script>', page, re.S).group(1))["mistakes"]
    assert mistakes and all(m["file"].startswith(str(tmp_path / "data")) and m["file"] in page for m in mistakes)
    assert all(Path(m["file"]).parent.name == m["true"] for m in mistakes)  # the file is the image's own

    again = run_cli("train", "--resume", run)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"{run} is already finished (2/2 epochs); nothing to resume"


def test_models_lists_fast_with_the_real_parameter_counts(capsys):
    import time

    from visionrecipe.cli import main
    from visionrecipe.models import count_parameters, create_model

    main(["models", "seedcnn"])  # the imports, once, outside the timing
    start = time.perf_counter()
    assert main(["models"]) == 0
    assert time.perf_counter() - start < 3.0  # it built every model (VGGs included): 12 s before
    listing = capsys.readouterr().out
    for name in ("seedcnn", "fastnet", "resnet18_cifar"):
        count = count_parameters(create_model(name, 10, image_size=32))
        assert re.search(rf"^{name}\s+\S+\s+{count:,}\s", listing, re.M), (name, count)
