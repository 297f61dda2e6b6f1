"""The command line: a table of commands, each with its flags generated from settings dataclasses.

    visionrecipe train --data digits --model seedcnn --epochs 10 --out runs/digits
    visionrecipe evaluate runs/digits --json
    visionrecipe predict runs/digits a.png b.jpg --topk 3
    visionrecipe models [NAME --image-size 32]
    visionrecipe doctor | report | tune | auto | export | serve ...    (`visionrecipe CMD --help`)

COMMANDS below says, for each command, which dataclasses (config.py) its flags come from and which
function runs it; a function parses nothing and computes nothing: it calls the library and prints.
A run's settings (Config's sections) keep only what was typed, so a --config file can lie beneath
them; every other option takes its dataclass default.
Every user error is a VisionRecipeError, printed as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from dataclasses import MISSING, Field, dataclass, fields
from typing import Callable

from visionrecipe.config import (FIELDS, SECTIONS, AutoOptions, DataConfig, DoctorOptions, EvaluateOptions,
                                 ExportOptions, LaunchOptions, ModelConfig, ModelsOptions, OptimConfig, PredictOptions,
                                 PushOptions, ReportOptions, RunConfig, ServeOptions, ServeSettings, TuneOptions,
                                 check_value, config_from_args, load_config, setting_type)
from visionrecipe.errors import VisionRecipeError


# --- the commands ------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from visionrecipe.train.loop import resume, train

    if args.nproc and args.nproc > 1:
        from visionrecipe.train.launch import launch

        return launch(args.nproc, args.argv, launch_config)
    if args.resume:
        resume(args.resume, **resume_settings(args))
    else:
        train(config_from_args(args))
    return 0


def launch_config(argv: list[str]) -> tuple:
    """(config, resuming) of a `train` command line, as a worker will read it: what `--nproc`
    checks once before it starts the workers (train/launch.py)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) != "train":
        raise VisionRecipeError("--nproc applies to `visionrecipe train` only")
    if args.resume:
        from visionrecipe.train.state import plan_resume

        return plan_resume(args.resume, resume_settings(args))[1], True
    return config_from_args(args), False


def resume_settings(args) -> dict:
    """The settings a `--resume` was given: the --config file's, then the flags typed over them.
    All go through the resume's "would this change the run" check, none is silently dropped."""
    from visionrecipe.config import Config, flatten, read_yaml_mapping

    settings = {}
    if args.config:
        settings = flatten(read_yaml_mapping(args.config, "config file", "hold a mapping of settings"))
        Config.from_dict(settings)  # unknown names and bad values: the same errors as without --resume
    settings.update({k: v for k, v in vars(args).items() if k in FIELDS})
    return settings


def cmd_evaluate(args) -> int:
    from visionrecipe.evaluate.scoring import evaluate_run

    result = evaluate_run(args.run, data=args.data, split=args.split, device=args.device, tta=args.tta)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if args.per_class or k != "per_class"}))
        return 0
    if result.get("task") == "multilabel":
        print(f"{result['split']} mAP {100 * result['mAP']:.2f}%  F1 micro {100 * result['f1_micro']:.2f}%  "
              f"macro {100 * result['f1_macro']:.2f}% at threshold {result['threshold']:g}  "
              f"loss {result['loss']:.4f}  ({result['num_images']:,} images)")
    else:
        print(f"{result['split']} accuracy {100 * result['accuracy']:.2f}%{'' if result['tta'] else ' (no TTA)'}  "
              f"balanced accuracy {100 * result['balanced_accuracy']:.2f}%  macro-F1 {100 * result['f1_macro']:.2f}%  "
              f"top-5 {100 * result['top5_accuracy']:.2f}%  loss {result['loss']:.4f}  "
              f"({result['num_correct']:,}/{result['num_images']:,} images)")
    if args.per_class:
        print(f"{'class':<20} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
        for row in result["per_class"]:
            print(f"{row['class']:<20} {row['precision']:>9.4f} {row['recall']:>9.4f} {row['f1']:>9.4f} {row['support']:>8}")
    return 0


def cmd_predict(args) -> int:
    from visionrecipe.deploy.predict import format_rows, predict
    from visionrecipe.rundir import atomic_write_text

    rows = predict(args.model, args.inputs, topk=args.topk, batch_size=args.batch_size, device=args.device,
                   progress=True, threshold=args.threshold)
    text = format_rows(rows, args.format)
    if args.out:
        atomic_write_text(args.out, text + "\n")
        errors = sum("error" in row for row in rows)
        unread = f"; {errors} image{'s' if errors > 1 else ''} could not be read (the error is in its row)"
        print(f"wrote {len(rows) - errors} predictions to {args.out}{unread if errors else ''}", file=sys.stderr)
    else:
        print(text)
    return 0


def cmd_models(args) -> int:
    from visionrecipe.models import format_layer_table, get_spec, layer_table, list_models, parameter_count

    if args.name:
        spec = get_spec(args.name)
        size = args.image_size or spec.default_image_size or 32
        print(format_layer_table(layer_table(args.name, num_classes=args.num_classes,
                                             in_channels=args.in_channels, image_size=size)))
        return 0
    print(f"{'name':<16} {'family':<10} {'params (32x32, 10 classes)':>27}  description")
    for name in list_models():
        spec = get_spec(name)
        size = 32 if (spec.default_image_size or 32) <= 64 else 64
        params = parameter_count(name, 10, image_size=size)
        print(f"{name:<16} {spec.family:<10} {params:>27,}  {spec.description}")
    print("timm:<name>      any timm model, when timm is installed (pip install 'visionrecipe[timm]')")
    return 0


def cmd_doctor(args) -> int:
    """Exit status 0 when no check failed, 1 otherwise (2 for bad input, as every command)."""
    from visionrecipe.doctor.runner import HEADER, format_row, run_doctor

    printed = []

    def emit(check) -> None:  # rows appear as checks finish; the header only once there is a row
        if not printed:
            print(HEADER)
        printed.append(check)
        print(format_row(check), flush=True)

    cfg = config_from_args(args, own=names(DoctorOptions))
    report = run_doctor(cfg, args.out, device=cfg.run.device, emit=None if args.json else emit,
                        progress=not args.json)
    if args.json:
        print(json.dumps(report, default=float))
    else:
        failed = [c["name"] for c in report["checks"] if c["verdict"] == "fail"]
        warned = sum(c["verdict"] == "warn" for c in report["checks"])
        verdict = (f"FAILED: {', '.join(failed)}" if failed
                   else "all checks passed" + (f" ({warned} warnings)" if warned else ""))
        print(f"\n{verdict} in {report['seconds']:.0f}s; doctor.json and pictures in {report['out']}", file=sys.stderr)
    return 0 if report["passed"] else 1


def cmd_report(args) -> int:
    try:
        from visionrecipe.evaluate.report import write_report
    except ImportError:
        raise VisionRecipeError("reports need matplotlib: pip install 'visionrecipe[report]'") from None

    from visionrecipe.deploy.card import write_model_card

    print(f"wrote {write_report(args.run)} and {write_model_card(args.run)}")
    return 0


def cmd_tune(args) -> int:
    from visionrecipe.tune.study import tune

    # The trials' settings, as the user wrote them (the study stores them): --config's, then the
    # typed flags; --out and --overwrite are the study's, and a trial's folder is tune's choice.
    typed = {k: v for k, v in vars(args).items() if k in FIELDS and k not in names(TuneOptions)}
    base = {**load_config(args.config, typed).flat(), **typed} if args.config else typed
    for name in ("out", "overwrite"):
        base.pop(name, None)
    options = options_of(args, TuneOptions)
    return interruptible(lambda: tune(base, options), "the finished trials are kept; run the same command to continue")


def cmd_auto(args) -> int:
    from visionrecipe.tune.auto import auto

    settings = {k: v for k, v in vars(args).items() if k in FIELDS and k not in names(AutoOptions)}
    options = options_of(args, AutoOptions)
    return interruptible(lambda: auto(settings, options), "run auto again with --overwrite to start over")


def interruptible(job, hint: str) -> int:
    """Ctrl-C: the trainer saved its state and optuna failed the trial; say how to go on."""
    from visionrecipe.errors import TrainingInterrupted

    try:
        result = job()
    except (TrainingInterrupted, KeyboardInterrupt) as exc:
        print(f"interrupted: {hint}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    return 0 if result is not None else 1


def cmd_export(args) -> int:
    from visionrecipe.deploy.export import export_model

    result = export_model(args.run, format=args.format, out=args.out, opset=args.opset, quantize=args.quantize,
                          data=args.data, tolerance=args.tolerance)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"verified on {result['verified_on']}: largest logit difference {result['max_abs_diff']:.2e} "
          f"(tolerance {result['tolerance'] * result['logit_scale']:.1e}), "
          f"top-1 agreement {100 * result['top1_agreement']:.2f}%")
    if result["accuracy_pytorch"] is not None:
        print(f"accuracy: PyTorch {100 * result['accuracy_pytorch']:.2f}%, "
              f"{result['format']} {100 * result['accuracy_exported']:.2f}%")
    quantized = result.get("quantized")
    if quantized:
        change = quantized["accuracy_change"]
        accuracy = ("accuracy not measured (no labelled test split)" if change is None else
                    f"accuracy {100 * quantized['accuracy']:.2f}% ({100 * change:+.2f} points vs float32)")
        print(f"int8: {accuracy}, top-1 agreement with float32 {100 * quantized['top1_agreement']:.2f}%, "
              f"size {quantized['bytes_fp32'] / 2**20:.2f} → {quantized['bytes_int8'] / 2**20:.2f} MiB")
    print(f"wrote {result['path']} ({result['bytes'] / 2**20:.2f} MiB)")
    return 0


def cmd_push(args) -> int:
    from visionrecipe.deploy.hub import push

    result = push(args.run, args.repo_id, private=args.private, onnx=args.onnx)
    print(f"pushed {', '.join(result['files'])} to {result['url']}")
    return 0


def cmd_serve(args) -> int:
    """Binds to loopback unless --host says otherwise; the address is checked before the model loads."""
    from visionrecipe.deploy.predict import load_classifier

    try:
        import uvicorn

        from visionrecipe.deploy.serve import create_app
    except ImportError:
        raise VisionRecipeError("serving needs fastapi and uvicorn: pip install 'visionrecipe[serve]'") from None
    settings = options_of(args, ServeSettings)
    check_port(settings.host, args.port)
    classifier = load_classifier(args.model, device=args.device)
    app = create_app(classifier, settings)
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    batching = (f"batches of up to {settings.max_batch}, {settings.max_wait_ms:g} ms wait" if settings.batching
                else "no batching")
    print(f"serving {classifier.name} ({classifier.backend}, {len(classifier.classes)} classes, {batching}) "
          f"on http://{shown}:{args.port}  (page /, API docs /docs; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=settings.host, port=args.port, log_level=args.log_level, access_log=args.access_log)
    return 0


def check_port(host: str, port: int) -> None:
    """Fail with one line, before the model loads, when the address cannot be bound."""
    import errno
    import socket

    if not 0 <= port <= 65535:
        raise VisionRecipeError(f"invalid port {port} (0–65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise VisionRecipeError(f"unknown host {host!r}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise VisionRecipeError(f"address {host}:{port} {reason}; choose another with --port") from None


# --- the table ---------------------------------------------------------------------------------
def pick(settings: type, *chosen: str) -> tuple[type, tuple[str, ...]]:
    """Some fields of a dataclass: a command takes only these of its flags."""
    return settings, chosen


def omit(settings: type, *left_out: str) -> tuple[type, tuple[str, ...]]:
    return settings, tuple(f.name for f in fields(settings) if f.name not in left_out)


RUN = (DataConfig, ModelConfig, OptimConfig, RunConfig)  # a training run's settings: config.yaml
CONFIG_FILE = pick(LaunchOptions, "config")
DEVICE = pick(RunConfig, "device")  # one --device for every command that runs a model


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    # Dataclasses (all their fields) or pick(dataclass, names). A command with DataConfig builds a
    # run: its Config flags hold only what was typed (see add_arguments).
    settings: tuple


COMMANDS = (
    Command("train", "train a model (from scratch or fine-tuning)", cmd_train, (LaunchOptions, *RUN)),
    Command("evaluate", "score a run on a split", cmd_evaluate, (EvaluateOptions, DEVICE)),
    Command("predict", "classify image files", cmd_predict, (PredictOptions, DEVICE)),
    Command("models", "list models, or show one model's layer table", cmd_models, (ModelsOptions,)),
    # The same data, model and optimizer settings as train: it checks the run you are about to start.
    Command("doctor", "check data and model before training (loss at init, overfit a batch, leakage, LR range, ...)",
            cmd_doctor, (CONFIG_FILE, DataConfig, ModelConfig, OptimConfig, pick(RunConfig, "seed", "device", "threads"),
                         DoctorOptions)),
    Command("report", "write a self-contained report.html for a run", cmd_report, (ReportOptions,)),
    # The training settings form the trials' base (--epochs: the most a trial trains, --time-budget:
    # each trial's seconds of training); the search space overrides them.
    Command("tune", "search hyperparameters and architecture (Optuna)", cmd_tune,
            (CONFIG_FILE, DataConfig, ModelConfig, OptimConfig, omit(RunConfig, "out", "overwrite"), TuneOptions)),
    Command("auto", "doctor, tune, train the best, evaluate, export, report: one command", cmd_auto,
            (AutoOptions, DataConfig, pick(RunConfig, "seed", "device"))),
    Command("export", "export a run's model to ONNX or TorchScript (verified)", cmd_export, (ExportOptions,)),
    Command("push", "upload a run to the Hugging Face Hub: weights, model.json, model card, ONNX", cmd_push,
            (PushOptions,)),
    Command("serve", "serve a model over HTTP (JSON API and a web page)", cmd_serve,
            (ServeOptions, ServeSettings, DEVICE)),
)


# --- flags from dataclasses ------------------------------------------------------------------------
def cli_fields(entry) -> list[Field]:
    """The fields of one COMMANDS settings entry that are flags or arguments."""
    settings, chosen = entry if isinstance(entry, tuple) else (entry, None)
    return [f for f in fields(settings) if f.metadata.get("cli", True) and (chosen is None or f.name in chosen)]


def names(settings: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(settings))


def options_of(args: argparse.Namespace, settings: type):
    """The dataclass filled from the parsed flags (every field of a command's own options is there)."""
    return settings(**{name: getattr(args, name) for name in names(settings) if hasattr(args, name)})


def flag_of(f: Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, entry, builds_run: bool) -> None:
    """One flag (or positional argument) per field, its value converted and checked by the field's
    metadata as it is parsed. In a command that builds a run, the run's settings get no default
    here (SUPPRESS): only what was typed goes over the --config file and Config's defaults."""
    settings = entry[0] if isinstance(entry, tuple) else entry
    layered = builds_run and settings in SECTIONS.values()
    title = next((name for name, section in SECTIONS.items() if section is settings),
                 re.sub(r"(?<!^)(?=[A-Z])", " ", settings.__name__).lower())  # TuneOptions: "tune options"
    group = parser.add_argument_group(title)
    for f in cli_fields(entry):
        meta, kind = f.metadata, setting_type(f.type)
        required = f.default is MISSING
        default = argparse.SUPPRESS if layered else (None if required else f.default)
        options = dict(help=help_text(f), type=lambda text, f=f: check_value(f, text))
        if meta.get("choices"):
            options["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"
        elif meta.get("metavar"):
            options["metavar"] = meta["metavar"]
        if meta.get("bare") is not None:  # the flag alone means this value (`--mlflow`)
            options.update(nargs="?", const=meta["bare"])
        if meta.get("positional"):
            nargs = "+" if kind in (list, tuple) else "?" if not required else None
            group.add_argument(f.name, nargs=nargs, **({} if required else {"default": default}), **options)
            continue
        if kind is bool:
            options.pop("type")
            options.update(action=argparse.BooleanOptionalAction)
        elif kind in (list, tuple):  # a repeatable flag
            options.update(action="append", default=argparse.SUPPRESS if layered else list(default))
        else:
            options.setdefault("metavar", flag_of(f)[2:].replace("-", "_").upper())
        options.setdefault("default", default)
        group.add_argument(flag_of(f), dest=f.name, required=required, **options)
        if meta.get("shortcut"):
            flag, value = meta["shortcut"]
            group.add_argument(flag, dest=f.name, action="store_const", const=value, default=argparse.SUPPRESS,
                               help=f"same as {flag_of(f)} {value}")


def help_text(f: Field) -> str:
    """The field's help and its default: the dataclass's, or where that is None, each recipe's."""
    text = f.metadata["help"]
    if "default" in text or f.default is MISSING:
        return text
    if not (f.default is None or f.default is False or f.default == ()):  # 0 is a default to show
        return f"{text} (default: {f.default})"
    if f.name in FIELDS:
        from visionrecipe.recipes import RECIPES

        shown = []
        for name, recipe in RECIPES.items():
            value = recipe.settings().get(f.name)
            if value is not None:
                unit = " per 1024 images" if f.name == "lr" and recipe.lr_per_1024 else ""
                shown.append(f"{name}: {value:g}{unit}" if isinstance(value, float) else f"{name}: {value}")
        if shown:
            return f"{text} (default: recipe {'; '.join(shown)})"
    return text


class Parser(argparse.ArgumentParser):
    """argparse exits with status 2 and a usage block; we keep status 2 and make it one line."""

    def error(self, message: str):
        raise VisionRecipeError(f"{self.prog.split()[-1]}: {message}")


def build_parser() -> argparse.ArgumentParser:
    from visionrecipe import __version__

    parser = Parser(prog="visionrecipe", description="Train, check, evaluate and deploy image classifiers.")
    parser.add_argument("--version", action="version", version=f"visionrecipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        for entry in command.settings:
            add_arguments(p, entry, builds_run=DataConfig in command.settings)
        p.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from visionrecipe.errors import TrainingInterrupted, TrainingStopped

    def is_main_process() -> bool:  # not system's: that imports torch, which `predict x.onnx` avoids
        return os.environ.get("RANK", "0") == "0"

    def one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
        # A library warning (an unreadable image skipped, ...) is one `warning: ...` line on stderr,
        # said once under torchrun, without Python's source line.
        if is_main_process():
            print(f"warning: {message}", file=sys.stderr, flush=True)

    warnings.showwarning = one_line_warnings
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # --nproc relaunches the same command
        return args.func(args)
    except VisionRecipeError as exc:
        # A NaN stop is agreed by all torchrun processes: rank 0 says it for them.
        if is_main_process() or not isinstance(exc, TrainingStopped):
            print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except TrainingInterrupted as exc:
        if is_main_process():
            print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `visionrecipe predict ... | head`: the reader has gone, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
