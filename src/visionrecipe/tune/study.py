"""Hyperparameter and architecture search on Optuna: many short trainings, scored on validation.

    from visionrecipe.tune.study import TuneOptions, tune
    result = tune({"data": "digits", "epochs": 4}, TuneOptions(out="runs/tune1", trials=20, search_budget=600))
    result.best_value, result.best_yaml        # train --config best.yaml reproduces the best trial

Each trial is one `train()` with the base config overridden by the sampled settings (tune_space.py),
run in out/trials/NNNN and scored by its best validation accuracy; the test split is never read.
With a `time_budget` in the base config (`--time-budget`, as for train) every trial trains for the same seconds,
so models of different speeds are compared at equal cost.
TPE proposes the settings (seeded); the pruner stops trials whose per-epoch val_acc trails the
others. The study lives in a storage, so a tune can stop and continue, and many processes or
machines can work on one study:

- default: SQLite `out/study.db`; `--storage postgresql://...` for machines that share a server;
  `--storage FILE.journal` for Optuna's journal file. How each is kept safe, and how the trial of
  a killed worker is failed: tune_storage.py.

One --out holds one study: out/study.json names it (and its storage), and a tune of another study
into the same folder is refused, since its trials/NNNN, best.yaml and report would replace these.

`--trials N` is the number of complete+pruned trials the study should hold: workers count the study
before each trial and wait while the running ones would reach N, so N is met, not overshot.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import re
import shutil
import time
from pathlib import Path
from typing import Any

from visionrecipe.rundir import atomic_write_text
from visionrecipe.config import Config, TuneOptions, apply_overrides, load_config
from visionrecipe.recipes import resolve_recipe
from visionrecipe.errors import VisionRecipeError
from visionrecipe.system import physical_cores
from visionrecipe.tune.report import TuneResult, best_trial, finished, format_value, score, summarize
from visionrecipe.tune.storage import fail_dead_trials, open_storage, optuna_module, worker_identity
from visionrecipe.tune.space import default_space, load_space, recipe_trial, space_from_dict, space_to_dict, suggest

POLL_S = 2.0  # a worker waiting for running trials to finish looks again this often
MAX_FAILURES = 3  # consecutive failed trials in one worker: a systematic error, stop
MARKER = "study.json"  # in out: which study (name and storage) the directory belongs to


def make_sampler(seed: int):
    return optuna_module().samplers.TPESampler(seed=seed)


def make_pruner(name: str):
    pruners = optuna_module().pruners
    if name == "median":
        return pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if name == "halving":
        return pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "none":
        return pruners.NopPruner()
    raise VisionRecipeError(f"unknown pruner {name!r} (choose from median, halving, none)")


# --- the study -------------------------------------------------------------------------------
def tune(base: dict[str, Any], options: TuneOptions) -> TuneResult:
    """Run trials until the study holds `options.trials` complete+pruned ones or time is up."""
    start = time.time()
    optuna = optuna_module()
    out = Path(options.out).expanduser()
    if options.trials < 1 or options.trial_workers < 1:
        raise VisionRecipeError("--trials and --trial-workers must be at least 1")
    check_base(base)  # bad settings or space files fail before a study is created for nothing
    if options.space:
        load_space(options.space, {})
    if out.is_dir() and any(out.iterdir()) and not any((out / n).exists() for n in ("study.db", "trials", MARKER)):
        raise VisionRecipeError(f"{out} exists and is not a tune directory; choose another --out")
    storage_spec = options.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    if options.overwrite:
        clear_output(out, storage_spec, options.study)
    claim_output(out, options.study, storage_spec)
    storage = open_storage(storage_spec)
    study = optuna.create_study(storage=storage, study_name=options.study, direction="maximize",
                                load_if_exists=True)
    base, space = study_settings(study, base, options.space)
    if not study.trials:
        study.enqueue_trial(recipe_trial(space, resolve_recipe(check_base(base)).flat()), skip_if_exists=True)
    fail_dead_trials(study)
    job = {"storage": storage_spec, "study": options.study, "base": base, "space": space,
           "trials": options.trials, "deadline": start + options.search_budget if options.search_budget else None,
           "pruner": options.pruner, "out": str(out), "threads": base.get("threads"), "start": start}
    done = len(finished(study))
    print(f"tune: study '{options.study}' in {storage_spec}: {done} finished trial(s), target {options.trials}"
          + (f", {options.search_budget:.0f}s budget" if options.search_budget else "")
          + (f", {options.trial_workers} workers" if options.trial_workers > 1 else ""), flush=True)
    if options.trial_workers == 1:
        work(job, worker=0)
    else:
        run_workers(job, options.trial_workers)
    return summarize(study, out, base, seconds=time.time() - start)


def claim_output(out: Path, study_name: str, storage_spec: str) -> None:
    """One study per output directory: its trials/NNNN, best.yaml and report would be overwritten
    by another study's. The first tune into `out` writes MARKER; a tune of another study (or of the
    same name in another storage) is refused.

        claim_output(Path("runs/t"), "s1", "sqlite:///runs/t/study.db")   # then "s2" is refused
    """
    owner = {"study": study_name, "storage": storage_identity(storage_spec)}
    marker = out / MARKER
    if marker.is_file():
        held = json.loads(marker.read_text())
        if held != owner:
            raise VisionRecipeError(f"{out} holds study '{held['study']}' ({held['storage']}); another study there "
                                    "would overwrite its trials and best.yaml: use another --out, or --overwrite")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(owner, indent=2) + "\n")


def storage_identity(spec: str) -> str:
    """The storage as the marker records it: a file path made absolute, a URL's password hidden."""
    if "://" not in spec:
        return str(Path(spec).expanduser().resolve())
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", spec)


def clear_output(out: Path, storage_spec: str, study_name: str) -> None:
    """--overwrite: forget the study and its trials (only the files tune writes)."""
    for name in ("study.db", "best.yaml", "tune_report.html", MARKER):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "trials", ignore_errors=True)
    if not storage_spec.startswith("sqlite:///" + str(out.resolve())):
        optuna = optuna_module()
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=study_name, storage=open_storage(storage_spec))


def study_settings(study, typed: dict[str, Any], space_file) -> tuple[dict, dict]:
    """The base config and space live in the study: a continued tune (or another machine) searches
    the same space on the same data unless told otherwise."""
    stored = study.user_attrs
    # Every trial uses one recipe, so one lr range fits all models (the fast recipe's lr is per
    # 1024 examples, the standard one's per batch).
    base = {**stored.get("base", {}), **typed}
    if base.get("recipe") is None:
        base["recipe"] = "standard"
    if "data" in stored.get("base", {}) and base.get("data") != stored["base"]["data"]:
        raise VisionRecipeError(f"study '{study.study_name}' tunes on data {stored['base']['data']!r}, not "
                                f"{base.get('data')!r}; use another --out or --study, or --overwrite")
    cfg = check_base(base)
    if space_file is None and "space" in stored:
        space = space_from_dict(stored["space"])
    else:
        space = default_space(image_size(cfg), cfg.optim.recipe, cfg.optim.epochs)
        if cfg.optim.time_budget:
            del space["epochs"]  # each trial trains for the same seconds; the budget sets its epochs
        if space_file is not None:
            space = load_space(space_file, space)
    if not space:
        raise VisionRecipeError("the search space is empty: nothing to tune")
    study.set_user_attr("base", base)
    study.set_user_attr("space", space_to_dict(space))
    return base, space


def check_base(base: dict[str, Any]) -> Config:
    cfg = resolve_recipe(apply_overrides(Config(), base))
    if cfg.data.val_fraction <= 0:
        raise VisionRecipeError("tune scores trials on a validation split: --val-fraction must be above 0")
    return cfg


def image_size(cfg: Config) -> int:
    """The training image size (loads the data once; the decoded tensors are cached for the trials)."""
    if cfg.data.image_size:
        return cfg.data.image_size
    from visionrecipe.train.build import load_data

    return int(load_data(cfg).train.images.shape[-1])


# --- workers -------------------------------------------------------------------------------------
def run_workers(job: dict, count: int) -> None:
    """N processes on the one study; each process trains with its share of the cores."""
    job = {**job, "threads": job["threads"] or max(1, physical_cores() // count)}
    context = multiprocessing.get_context("spawn")  # no forked torch/SQLite state
    processes = [context.Process(target=worker_main, args=(job, i), daemon=False) for i in range(count)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        for process in processes:  # they got the SIGINT too and fail their trials
            process.join(30)
        raise
    failed = [p.exitcode for p in processes if p.exitcode]
    if failed:
        print(f"warning: {len(failed)} worker(s) stopped with an error (exit {failed[0]})", flush=True)


def worker_main(job: dict, index: int) -> None:
    """Entry point of a spawned worker process."""
    import sys

    try:
        work(job, index)
    except VisionRecipeError as exc:
        print(f"error: worker {index}: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        from visionrecipe.errors import TrainingInterrupted

        if isinstance(exc, TrainingInterrupted):
            sys.exit(exc.exit_code)
        raise


def work(job: dict, worker: int) -> None:
    """One worker's loop: while the study needs trials and time is left, run one."""
    optuna = optuna_module()
    storage = open_storage(job["storage"])
    study = optuna.load_study(study_name=job["study"], storage=storage)
    # Offset by the study's size: a continued tune must not replay the first run's random startup
    # trials, and each worker gets its own stream.
    seed = int(job["base"].get("seed", 0)) + 7919 * worker + len(study.trials)
    study = optuna.load_study(study_name=job["study"], storage=storage, sampler=make_sampler(seed),
                              pruner=make_pruner(job["pruner"]))
    failures, last_error = 0, ""
    while True:
        fail_dead_trials(study)
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
        running = [t for t in trials if t.state.name == "RUNNING"]
        if len(done) >= job["trials"] or not time_for_a_trial(job, done):
            return
        if len(done) + len(running) >= job["trials"]:
            time.sleep(POLL_S)  # the running trials may finish the job; if one dies we take its place
            continue
        outcome = {}
        study.optimize(lambda trial: objective(trial, job, outcome), n_trials=1, catch=(TrialFailed,),
                       callbacks=[lambda s, t: progress_line(s, t, job, outcome)])
        failures = failures + 1 if outcome.get("error") else 0
        last_error = outcome.get("error", last_error)
        if failures >= MAX_FAILURES:
            raise VisionRecipeError(f"{failures} trials in a row failed; last error: {last_error}")


def time_for_a_trial(job: dict, done: list) -> bool:
    """No new trial once the budget is spent, or when under half a typical trial is left."""
    if job["deadline"] is None:
        return True
    left = job["deadline"] - time.time()
    durations = sorted(t.duration.total_seconds() for t in done if t.duration and t.state.name == "COMPLETE")
    typical = durations[len(durations) // 2] if durations else 0.0
    return left > 0.5 * typical and left > 0


class TrialFailed(Exception):
    """A trial's training failed (NaN loss, bad combination); the study goes on."""


def objective(trial, job: dict, outcome: dict) -> float:
    optuna = optuna_module()
    from visionrecipe.train.loop import TrainingInterrupted, train

    trial.set_user_attr("worker", worker_identity())
    ahead = [t for t in trial.study.get_trials(deepcopy=False)
             if t.state.name in ("COMPLETE", "PRUNED") or (t.state.name == "RUNNING" and t.number < trial.number)]
    if len(ahead) >= job["trials"]:
        # Two workers asked at once for the last place: the later one steps back, untrained.
        trial.set_user_attr("surplus", True)
        outcome["surplus"] = True
        raise TrialFailed("surplus: the study already had enough trials")
    cfg = Config.from_dict(job["base"])
    apply_overrides(cfg, suggest(trial, job["space"], cfg.model.model or resolve_recipe(cfg).model.model))
    run_dir = Path(job["out"]) / "trials" / f"{trial.number:04d}"
    apply_overrides(cfg, {"out": str(run_dir), "overwrite": True, "progress": False, "report": False,
                          "threads": job["threads"]})
    if cfg.optim.time_budget and job["deadline"] is not None:
        # The last trial ends with the tune's budget (its score suffers, the budget holds).
        cfg.optim.time_budget = max(1.0, min(cfg.optim.time_budget, job["deadline"] - time.time()))
    planned = resolve_recipe(cfg)
    trial.set_user_attr("config", planned.flat())
    epochs = planned.optim.epochs if not planned.optim.time_budget else math.inf  # a budget replans epochs

    def on_epoch(record: dict) -> None:
        trial.report(record["val_acc"], record["epoch"])
        if record["epoch"] >= epochs:
            return  # the last epoch: nothing left to save by stopping
        if trial.should_prune():
            outcome["stopped"] = f"pruned after epoch {record['epoch']}"
            raise optuna.TrialPruned()
        if job["deadline"] is not None and time.time() > job["deadline"]:
            outcome["stopped"] = f"stopped by the time budget after epoch {record['epoch']}"
            trial.set_user_attr("stopped", "time budget")
            raise optuna.TrialPruned()

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "w") as log, contextlib.redirect_stdout(log):
        try:
            run = train(cfg, on_epoch=on_epoch, evaluate_test=False)
        except (optuna.TrialPruned, TrainingInterrupted, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - any training error fails this trial only
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            trial.set_user_attr("error", message)
            outcome["error"] = message
            raise TrialFailed(message) from None
    trial.set_user_attr("config", load_config(run_dir / "config.yaml").flat())
    # The score of the model the trial hands over (model.json): the best epoch's, or at the planned end
    # the last one's when the validation split cannot tell it from the best (train/callbacks.keeps).
    return run.meta["val_acc"]


def progress_line(study, trial, job: dict, outcome: dict) -> None:
    """One line per trial: what it scored, trials done, best so far, time left."""
    if outcome.get("surplus"):
        return
    done = finished(study)
    best = best_trial(done)
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    state = {"COMPLETE": "complete", "PRUNED": outcome.get("stopped", "pruned"), "FAIL": "failed"}[trial.state.name]
    value = score(trial)
    result = f"{100 * value:.2f}%" if value is not None and trial.state.name != "FAIL" else \
        f"error: {outcome.get('error', '?')}"
    left = f", {max(0, job['deadline'] - time.time()):.0f}s left" if job["deadline"] else ""
    best_text = f"best {100 * score(best):.2f}% (#{best.number})" if best is not None else "no best yet"
    params = " ".join(f"{k}={format_value(v)}" for k, v in trial.params.items())
    print(f"[{len(done)}/{job['trials']}] trial {trial.number} {state}: {result} in {seconds:.1f}s | {best_text}"
          f"{left} | {params}", flush=True)
