"""`visionrecipe doctor`: check the data and the model before training.

    visionrecipe doctor --data digits                     # table; doctor.json + PNGs in runs/doctor-digits
    visionrecipe doctor --data ~/pets --model resnet18_cifar --image-size 64 --json

Takes the same data, model and optimizer flags as `train`, so it checks the run you are about to
start. Exit status 0 when no check failed, 1 otherwise (2 for bad input, as every command).
"""

from __future__ import annotations

import argparse
import json
import sys


def cmd_doctor(args) -> int:
    from visionrecipe.config import config_from_args
    from visionrecipe.doctor.runner import HEADER, format_row, run_doctor

    printed = []

    def emit(check) -> None:  # rows appear as checks finish; the header only once there is a row
        if not printed:
            print(HEADER)
        printed.append(check)
        print(format_row(check), flush=True)

    report = run_doctor(config_from_args(args), args.out, device=getattr(args, "device", "auto"),
                        emit=None if args.json else emit, progress=not args.json)
    if args.json:
        print(json.dumps(report, default=float))
    else:
        failed = [c["name"] for c in report["checks"] if c["verdict"] == "fail"]
        warned = sum(c["verdict"] == "warn" for c in report["checks"])
        verdict = (f"FAILED: {', '.join(failed)}" if failed
                   else "all checks passed" + (f" ({warned} warnings)" if warned else ""))
        print(f"\n{verdict} in {report['seconds']:.0f}s; doctor.json and pictures in {report['out']}", file=sys.stderr)
    return 0 if report["passed"] else 1


def register(subparsers) -> None:
    from visionrecipe.config import add_config_arguments

    p = subparsers.add_parser("doctor", help="check data and model before training (loss at init, overfit a "
                                             "batch, leakage, LR range, ...)")
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    add_config_arguments(p, sections=("data", "model", "optim"))
    p.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="random seed (default: 0)")
    p.add_argument("--device", default=argparse.SUPPRESS, help="device (default: auto)")
    p.add_argument("--threads", type=int, default=argparse.SUPPRESS, help="CPU threads for PyTorch")
    p.add_argument("--out", default=None, help="folder for doctor.json and the pictures (default runs/doctor-<data>)")
    p.add_argument("--json", action="store_true", help="print doctor.json instead of the table")
    p.set_defaults(func=cmd_doctor)
