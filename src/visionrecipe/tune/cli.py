"""`visionrecipe tune` and `visionrecipe auto` (registered by cli.py when this module exists).

    visionrecipe tune --data digits --trials 40 --time-budget 3600 --out runs/tune1
    visionrecipe tune --out runs/tune1 --trials 60                 # continue the same study
    visionrecipe tune --data digits --out runs/tune1 --workers 2    # two processes, one study
    visionrecipe tune --data cifar10 --storage postgresql://host/db --study s1   # many machines
    visionrecipe auto --data digits --time-budget 180 --out runs/auto1
"""

from __future__ import annotations

import argparse

from visionrecipe.config import FIELDS, add_config_arguments, load_config


def register(subparsers) -> None:
    p = subparsers.add_parser("tune", help="search hyperparameters and architecture (Optuna)",
                              conflict_handler="resolve")
    p.add_argument("--config", help="YAML file of base settings that the search space overrides")
    # The training flags form the base config; --epochs is the most epochs a trial may train.
    add_config_arguments(p)
    # These replace the training flags of the same name (conflict_handler="resolve"): in tune,
    # --time-budget is for the whole search and --workers counts tune processes.
    p.add_argument("--time-budget", dest="tune_budget", type=float, default=None,
                   help="seconds for the whole tune; no new trial starts after it, a running one stops at its epoch end")
    p.add_argument("--workers", dest="tune_workers", type=int, default=1,
                   help="parallel trial processes on this machine, one study (default 1)")
    p.add_argument("--trial-budget", type=float, default=None,
                   help="seconds of training per trial (the trainer's time budget) instead of searching epochs")
    p.add_argument("--trials", type=int, default=20,
                   help="number of finished (complete or pruned) trials the study should hold (default 20)")
    p.add_argument("--pruner", default="median", choices=("median", "halving", "none"),
                   help="stop weak trials early on their per-epoch val_acc (default median)")
    p.add_argument("--space", help="YAML search space: setting -> {type, low, high, log, choices} (README: Search and automate)")
    p.add_argument("--storage", help="Optuna storage: an RDB URL (postgresql://, mysql://, sqlite:///) or a "
                                     "FILE.journal (default: sqlite out/study.db)")
    p.add_argument("--study", default="visionrecipe", help="study name inside the storage (default visionrecipe)")
    p.set_defaults(func=cmd_tune)

    p = subparsers.add_parser("auto", help="doctor, tune, train the best, evaluate, export, report: one command")
    p.add_argument("--time-budget", type=float, required=True, help="seconds for the whole job")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="go on when a doctor check fails")
    p.add_argument("--doctor", default="auto", choices=("auto", "full", "data"),
                   help="doctor checks: full, data (the data checks only), auto (full when the budget is "
                        "at least 600 s; default)")
    p.add_argument("--tune-share", type=float, default=0.5, help="share of the budget for tune (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--space", help="tune's YAML search space (default: tune's)")
    p.add_argument("--trials", type=int, default=200, help="at most this many tune trials (default 200; "
                                                          "the budget usually ends the tune first)")
    add_config_arguments(p, sections=("data",))
    p.set_defaults(func=cmd_auto)


def typed_settings(args: argparse.Namespace) -> dict:
    """The config flags the user typed (defaults are suppressed), over --config's keys when given.
    Only explicit settings: the study stores its base config as the user wrote it."""
    typed = {name: value for name, value in vars(args).items() if name in FIELDS}
    if getattr(args, "config", None):
        return {**load_config(args.config, typed).flat(), **typed}
    return typed


def cmd_tune(args) -> int:
    from visionrecipe.tune.study import TuneOptions, tune
    from visionrecipe.errors import VisionRecipeError

    base = typed_settings(args)
    out = base.pop("out", None)
    if not out:
        raise VisionRecipeError("tune needs --out DIR (the study, trials and best.yaml go there)")
    overwrite = bool(base.pop("overwrite", False))
    base.pop("time_budget", None)  # from --config: the trials' budget is --trial-budget
    if args.trial_budget:
        base["time_budget"] = args.trial_budget
    options = TuneOptions(out=out, trials=args.trials, time_budget=args.tune_budget, workers=args.tune_workers,
                          pruner=args.pruner, space=args.space, storage=args.storage, study=args.study,
                          overwrite=overwrite)
    return interruptible(lambda: tune(base, options), "the finished trials are kept; run the same command to continue")


def cmd_auto(args) -> int:
    from visionrecipe.tune.auto import AutoOptions, auto

    data = {name: value for name, value in vars(args).items() if name in FIELDS and name not in ("out", "seed", "device", "overwrite")}
    options = AutoOptions(out=args.out, time_budget=args.time_budget, force=args.force, doctor=args.doctor,
                          tune_share=args.tune_share,
                          seed=args.seed, device=args.device, overwrite=args.overwrite, space=args.space,
                          trials=args.trials)
    return interruptible(lambda: auto(data, options), "run auto again with --overwrite to start over")


def interruptible(job, hint: str) -> int:
    """Ctrl-C: the trainer saved its state and optuna failed the trial; say how to go on."""
    import sys

    from visionrecipe.errors import TrainingInterrupted

    try:
        result = job()
    except (TrainingInterrupted, KeyboardInterrupt) as exc:
        print(f"interrupted: {hint}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    return 0 if result is not None else 1
