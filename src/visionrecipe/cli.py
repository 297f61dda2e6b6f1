"""The command line: parse, call the library, print. No logic lives here.

    visionrecipe train --data digits --model seedcnn --epochs 10 --out runs/digits
    visionrecipe evaluate runs/digits --json
    visionrecipe predict runs/digits a.png b.jpg --topk 3
    visionrecipe models [NAME --image-size 32]

Every user error is a VisionRecipeError, printed as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from visionrecipe.config import add_config_arguments, config_from_args
from visionrecipe.errors import VisionRecipeError


class Parser(argparse.ArgumentParser):
    """argparse exits with status 2 and a usage block; we keep status 2 and make it one line."""

    def error(self, message: str):
        raise VisionRecipeError(f"{self.prog.split()[-1]}: {message}")


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
    from visionrecipe.config import FIELDS, Config, flatten, read_yaml_mapping

    settings = {}
    if args.config:
        settings = flatten(read_yaml_mapping(args.config, "config file", "hold a mapping of settings"))
        Config.from_dict(settings)  # unknown names and bad values: the same errors as without --resume
    settings.update({k: v for k, v in vars(args).items() if k in FIELDS})
    return settings


def cmd_evaluate(args) -> int:
    from visionrecipe.evaluate.scoring import evaluate_run

    result = evaluate_run(args.run, data=args.data, split=args.split, device=args.device)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if args.per_class or k != "per_class"}))
        return 0
    if result.get("task") == "multilabel":
        print(f"{result['split']} mAP {100 * result['mAP']:.2f}%  F1 micro {100 * result['f1_micro']:.2f}%  "
              f"macro {100 * result['f1_macro']:.2f}% at threshold {result['threshold']:g}  "
              f"loss {result['loss']:.4f}  ({result['num_images']:,} images)")
    else:
        print(f"{result['split']} accuracy {100 * result['accuracy']:.2f}%  top-5 {100 * result['top5_accuracy']:.2f}%  "
              f"loss {result['loss']:.4f}  ({result['num_correct']:,}/{result['num_images']:,} images)")
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
        print(f"wrote {len(rows)} predictions to {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


def cmd_models(args) -> int:
    from visionrecipe.models import count_parameters, create_model, format_layer_table, get_spec, layer_table, list_models

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
        params = count_parameters(create_model(name, 10, image_size=size))
        print(f"{name:<16} {spec.family:<10} {params:>27,}  {spec.description}")
    print("timm:<name>      any timm model, when timm is installed (pip install 'visionrecipe[timm]')")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="visionrecipe", description="Train, check, evaluate and deploy image classifiers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("train", help="train a model (from scratch or fine-tuning)")
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly where it stopped")
    p.add_argument("--nproc", type=int, default=None, help="launch this many processes with torchrun (DDP)")
    add_config_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a run on a split")
    p.add_argument("run", help="run directory")
    p.add_argument("--data", help="data spec (default: the run's)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--per-class", action="store_true", help="precision, recall, F1 and support per class")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify image files")
    p.add_argument("model", help="run directory, or an exported .onnx file (runs on onnxruntime)")
    p.add_argument("inputs", nargs="+", help="image files, folders or globs")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--format", default="text", choices=("text", "json", "csv"))
    p.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")
    p.add_argument("--out", metavar="FILE", help="write the predictions here instead of stdout")
    p.add_argument("--threshold", type=float, default=None,
                   help="multilabel runs: answer the labels above this probability (default: the run's)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("models", help="list models, or show one model's layer table")
    p.add_argument("name", nargs="?")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.set_defaults(func=cmd_models)

    for register in _extensions():
        register(sub)
    return parser


def _extensions():
    """Subcommands whose parsers live beside their stages (doctor, report, tune, export, serve)."""
    from visionrecipe.deploy import export_cli, serve_cli
    from visionrecipe.doctor import cli as doctor_cli
    from visionrecipe.evaluate import cli as report_cli
    from visionrecipe.tune import cli as tune_cli

    return [m.register for m in (doctor_cli, report_cli, tune_cli, export_cli, serve_cli)]


def main(argv: list[str] | None = None) -> int:
    from visionrecipe.errors import TrainingInterrupted, TrainingStopped

    def is_main_process() -> bool:  # not system's: that imports torch, which `predict x.onnx` avoids
        return os.environ.get("RANK", "0") == "0"

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


if __name__ == "__main__":
    sys.exit(main())
