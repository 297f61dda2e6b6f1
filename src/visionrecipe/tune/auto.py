"""`visionrecipe auto`: the whole job in one command, inside one time budget.

    from visionrecipe.tune.auto import AutoOptions, auto
    summary = auto({"data": "digits"}, AutoOptions(out="runs/auto1", search_budget=180))
    summary["test_accuracy"], summary["stages"]          # seconds per stage

Stages, one line each: plan (photos only: the budget policy of `train --time-budget`, train/plan.py,
picks the training sides, crops and FixRes side for the final run's budget; every trial and the
final run train at them, and the search explores the rest), doctor (stop on a failed check unless
`force`; only its data checks on a budget under 10 minutes, see FULL_DOCTOR_MIN_BUDGET), tune (a share of what is left of the
budget, cut into trials of equal training time), train the best configuration (validation carved
from train as usual, for model selection) with the rest of the time as its time budget, evaluate on
the test split, export to ONNX, write the report. The model handed over is never worse on
validation than the best trial: when the retrain cannot beat it (too little time left) or does not,
the trial's own weights are kept, and the train line says which model and why. The detailed
output of each stage goes to out/auto.log; out/auto.json holds the summary (`model` says which).

Layout: out/doctor (doctor.json and pictures), out/tune (the study, trials, best.yaml,
tune_report.html), out/final (the run directory: model, eval.json, model.onnx, report.html).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from visionrecipe.rundir import METRICS, atomic_write_text, has_model, read_metrics
from visionrecipe.config import MODEL_OPTIONS, AutoOptions, Config, TuneOptions, apply_overrides
from visionrecipe.errors import VisionRecipeError

# Test evaluation, ONNX export with its verification, and the report: kept back from training.
RESERVE_FRACTION = 0.12
RESERVE_MIN_S = 12.0
# The full doctor costs about a minute on small data and 2 CPU cores: below this budget auto runs
# only its data checks (they catch what breaks an unattended run: leakage, duplicates, bad files).
FULL_DOCTOR_MIN_BUDGET = 600.0
MIN_TRIALS = 5  # trials a tune share is cut into, at least (see trial_budget)
# What the plan stage fixes for photos: the sides and crops of the budget policy's plan.
PLAN_SIDES = ("image_size", "train_size", "train_size_start", "crop_scale")


class Stages:
    """Runs the stages in order, timing each and printing one line per stage."""

    def __init__(self, out: Path, budget: float):
        self.out, self.budget = out, budget
        startup = process_age()  # the budget counts the interpreter's start and imports too
        self.start = time.time() - startup
        self.seconds: dict[str, float] = {"startup": round(startup, 1)}
        self.log = open(out / "auto.log", "a")

    def left(self) -> float:
        return self.budget - (time.time() - self.start)

    def run(self, name: str, job: Callable[[], tuple[Any, str]]) -> Any:
        begin = time.time()
        self.log.write(f"\n=== {name} ===\n")
        self.log.flush()
        with contextlib.redirect_stdout(self.log):
            value, line = job()
        self.seconds[name] = round(time.time() - begin, 1)
        print(f"{name + ':':<9} {line}  ({self.seconds[name]:.1f}s)", flush=True)
        return value


def process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere): Python and torch take seconds to import."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


AUTO_OUTPUTS = ("auto.log", "auto.json", "doctor", "tune", "final")  # everything auto writes into --out


def clear_auto_output(out: Path) -> None:
    """--overwrite replaces an earlier auto and nothing else: only a folder auto made (auto.log),
    and only if it holds nothing but what auto writes, so no file a user owns is deleted."""
    if not (out / "auto.log").is_file():
        raise VisionRecipeError(f"{out} is not the output of an earlier auto (no auto.log); choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in AUTO_OUTPUTS)
    if foreign:
        raise VisionRecipeError(f"--overwrite deletes only what auto wrote, and {out} also holds {foreign[0]}; "
                                "move it away or choose another --out")
    for name in AUTO_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()

def auto(data: dict[str, Any], options: AutoOptions) -> dict:
    if not options.search_budget or options.search_budget <= 0:
        raise VisionRecipeError("auto needs a positive --search-budget in seconds")
    if not 0 < options.tune_share < 1:
        raise VisionRecipeError("--tune-share must be between 0 and 1")
    out = Path(options.out).expanduser()
    if out.is_dir() and any(out.iterdir()):
        if not options.overwrite:
            raise VisionRecipeError(f"output directory {out} already exists; pass --overwrite to replace it")
        clear_auto_output(out)
    out.mkdir(parents=True, exist_ok=True)
    run = apply_overrides(Config(), data).run  # bad settings fail here, before any stage
    base = {**data, "seed": run.seed, "device": run.device}
    stages = Stages(out, options.search_budget)
    try:
        return run_stages(stages, base, options)
    finally:
        stages.log.close()


def run_stages(stages: Stages, base: dict, options: AutoOptions) -> dict:
    out = stages.out
    summary: dict[str, Any] = {"data": base.get("data", "digits"), "search_budget": options.search_budget}
    mode = options.doctor if options.doctor != "auto" else \
        ("full" if options.search_budget >= FULL_DOCTOR_MIN_BUDGET else "data")
    described = photos(base)
    if described is not None:
        final_budget = (1 - options.tune_share) * stages.left()
        base = stages.run("plan", lambda: plan_stage(base, final_budget, described))
    stages.run("doctor", lambda: doctor_stage(base, out / "doctor", mode, options.force))
    tune_budget = options.tune_share * stages.left()
    result = stages.run("tune", lambda: tune_stage(base, out / "tune", tune_budget, options))
    final = out / "final"
    run, chosen = stages.run("train", lambda: train_stage(base, result, final, stages.left()))
    metrics = stages.run("evaluate", lambda: evaluate_stage(final, base["device"]))
    summary["test_accuracy"] = metrics["accuracy"]
    if (out / "doctor" / "doctor.json").is_file():  # the report shows the doctor's verdicts
        shutil.copy(out / "doctor" / "doctor.json", final / "doctor.json")
    summary["onnx"] = stages.run("export", lambda: export_stage(final))
    summary["report"] = stages.run("report", lambda: report_stage(final))
    total = time.time() - stages.start
    summary.update(stages=stages.seconds, seconds=round(total, 1), run=str(run.path),
                   best_trial=result.best_trial, best_val_acc=result.best_value, model=chosen,
                   val_acc=max(r["val_acc"] for r in run.metrics))
    atomic_write_text(out / "auto.json", json.dumps(summary, indent=2))
    where = ", ".join(f"{name} {sec:.0f}s" for name, sec in stages.seconds.items())
    print(f"auto: test accuracy {100 * metrics['accuracy']:.2f}% in {total:.0f}s of {options.search_budget:.0f}s "
          f"({where}); model {final} ({chosen})", flush=True)
    return summary


# --- stages: each returns (value, its one-line summary) ----------------------------------------
def photos(base: dict) -> tuple[int, int | None] | None:
    """describe_dataset's (count, median side) when the data takes the photo path, else None (from
    the listing and headers: nothing decoded)."""
    from visionrecipe.data.load import describe_dataset
    from visionrecipe.recipes import photo_data

    described = describe_dataset(base.get("data", "digits"))
    return described if described is not None and photo_data(base.get("image_size") or described[1]) else None


def plan_stage(base: dict, budget: float, described: tuple[int, int | None]) -> tuple[dict, str]:
    """The budget policy's plan for a final run of `budget` seconds; its sides and crops join `base`."""
    from visionrecipe.system import select_device, world
    from visionrecipe.train.plan import plan_choices

    device = select_device(base["device"])
    cfg = Config.from_dict({**{k: v for k, v in base.items() if k != "device"}, "time_budget": budget})
    chosen, _ = plan_choices(cfg, device, world(device), described)
    sides = {k: chosen[k] for k in PLAN_SIDES if k in chosen and base.get(k) is None}
    if not sides:
        return base, "the budget policy does not apply (a model or size was given): the search space decides"
    merged = {**base, **sides}
    ramp = f"{merged.get('train_size_start') or merged.get('train_size')}→{merged.get('train_size')}"
    return merged, (f"the budget policy's sides for a {budget:.0f}s final run: training at {ramp} px, evaluated at "
                    f"{merged.get('image_size')} px, crops of scale {merged.get('crop_scale') or 0:g} and up; every "
                    "trial and the final run train at these sides")


def doctor_stage(base: dict, out: Path, mode: str, force: bool) -> tuple[dict | None, str]:
    """`full`: every doctor check (about a minute for digits on 2 CPU cores); `data`: only the
    data checks (balance, files, duplicates, train/test leakage), seconds on small data."""
    from visionrecipe.doctor.runner import run_doctor

    cfg = Config.from_dict({k: v for k, v in base.items() if k != "device"})
    if mode == "full":
        report = run_doctor(cfg, out, device=base["device"])
    else:
        report = data_doctor(cfg, out)
    checks = report.get("checks", [])
    failed = [c["name"] for c in checks if c.get("verdict") == "fail"]
    warned = sum(c.get("verdict") == "warn" for c in checks)
    if failed and not force:
        raise VisionRecipeError(f"doctor: {len(failed)} check(s) failed ({', '.join(failed)}); see "
                                f"{out / 'doctor.json'}; fix them or pass --force")
    verdict = f"{len(failed)} failed (--force: going on)" if failed else "passed"
    return report, f"{len(checks)} {'' if mode == 'full' else 'data '}checks {verdict}, {warned} warning(s)"


def data_doctor(cfg: Config, out: Path) -> dict:
    """The doctor's data checks alone, written as doctor.json in the doctor's format."""
    from dataclasses import asdict

    from visionrecipe.doctor.data_checks import data_checks
    from visionrecipe.train.build import load_data

    data = load_data(cfg)
    checks = [asdict(c) for c in data_checks(data)]
    report = {"data": cfg.data.data, "model": "data checks only", "passed": all(c["verdict"] != "fail" for c in checks),
              "checks": checks}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "doctor.json", json.dumps(report, indent=2, default=float))
    return report


def tune_stage(base: dict, out: Path, budget: float, options: AutoOptions):
    from visionrecipe.tune.study import tune

    base = {**base, "time_budget": trial_budget(budget)}
    result = tune(base, TuneOptions(out=out, trials=options.trials, search_budget=budget, space=options.space))
    counts = result.counts
    line = f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed trials"
    if result.best_config is None:
        return result, line + "; none complete, the final run uses the recipe's defaults"
    cfg = result.best_config
    shape = cfg["model"] + "".join(f" {k} {cfg[k]:g}" for k in MODEL_OPTIONS if cfg.get(k))
    return result, (f"{line} of {base['time_budget']:.0f}s; best val_acc {100 * result.best_value:.2f}% "
                    f"(trial {result.best_trial}: {shape}, {cfg['optimizer']} lr {cfg['lr']:.3g})")


def trial_budget(tune_budget: float) -> float:
    """Seconds of training per trial. A bigger budget buys both more and longer trials: n trials
    of tune_budget/n seconds with n growing as the square root (5 trials of 18 s in 90 s, 12 of
    75 s in 900 s), so short budgets still try several settings."""
    return tune_budget / max(MIN_TRIALS, math.sqrt(tune_budget / 6))


def train_stage(base: dict, result, final: Path, seconds_left: float):
    """The best configuration, trained for the time that is left: longer than its trial (which
    had a fraction of the tune's share), with the trainer planning the schedule to fit.

    The model handed over is never worse on validation than the best trial: when the time left is
    shorter than that trial's own training, or the retrain ends below its val_acc, the trial's run
    directory (weights of its best epoch) becomes `final` instead, and the line says why.
    """
    from visionrecipe.train.loop import train

    reserve = max(RESERVE_MIN_S, RESERVE_FRACTION * seconds_left)
    seconds = max(1.0, seconds_left - reserve)
    trial = best_trial_run(result)
    if trial is not None and seconds < trial["seconds"]:
        return hand_over_trial(trial, final, f"{seconds:.0f}s left cannot beat its {trial['seconds']:.0f}s "
                                             "of training, so no retrain")
    settings = dict(result.best_config or base)
    settings.update(out=str(final), overwrite=True, progress=False, report=False, time_budget=seconds)
    run = train(Config.from_dict(settings), evaluate_test=False)
    best = max(run.metrics, key=lambda r: r["val_acc"])
    retrained = (f"{settings.get('model') or 'the recipe default'} for {seconds:.0f}s ({run.metrics[-1]['epoch']} "
                 f"epochs): best val_acc {100 * best['val_acc']:.2f}% (epoch {best['epoch']})")
    if trial is not None and best["val_acc"] < trial["val_acc"]:
        return hand_over_trial(trial, final, f"the retrain reached less: {retrained}")
    return (run, "retrained"), retrained + "; the retrained model is handed over"


def best_trial_run(result) -> dict | None:
    """The best trial's run directory, val_acc and training seconds, when its weights are there."""
    if result.best_trial is None or result.best_value is None:
        return None
    path = Path(result.out) / "trials" / f"{result.best_trial:04d}"
    if not has_model(path) or not (path / METRICS).is_file():
        return None
    records = read_metrics(path)
    return {"number": result.best_trial, "path": path, "val_acc": result.best_value,
            "seconds": records[-1]["elapsed_s"] if records else 0.0}


def hand_over_trial(trial: dict, final: Path, why: str):
    """Copy the trial's run directory to `final` (its config says where it now lives)."""
    from visionrecipe.config import load_config, save_config
    from visionrecipe.rundir import Run

    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(trial["path"], final, ignore=shutil.ignore_patterns("state.pt", "train.log"))
    save_config(load_config(final / "config.yaml", {"out": str(final)}), final / "config.yaml")
    chosen = f"trial {trial['number']}'s model"
    return (Run(final), chosen), f"kept {chosen} (val_acc {100 * trial['val_acc']:.2f}%): {why}"


def evaluate_stage(run_dir: Path, device: str) -> tuple[dict, str]:
    from visionrecipe.evaluate.scoring import evaluate_run

    metrics = evaluate_run(run_dir, split="test", device=device)
    return metrics, f"test accuracy {100 * metrics['accuracy']:.2f}% on {metrics['num_images']:,} images"


def export_stage(run_dir: Path) -> tuple[str | None, str]:
    from visionrecipe.deploy.export import export_model

    result = export_model(run_dir, format="onnx")
    return result["path"], f"{result['path']} (verified on {result['verified_on']}, largest logit " \
                           f"difference {result['max_abs_diff']:.1e})"


def report_stage(run_dir: Path) -> tuple[str | None, str]:
    try:
        from visionrecipe.evaluate.report import write_report

        path = write_report(run_dir)
    except ImportError as exc:  # matplotlib missing
        return None, f"skipped ({exc})"
    return str(path), str(path)
