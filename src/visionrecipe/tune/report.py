"""What a tune leaves behind: the table of trials, best.yaml, parameter importance, tune_report.html.

    result = summarize(study, Path("runs/tune1"), base={"data": "digits"}, seconds=120.0)
    best = best_trial(finished(study)); score(best)   # what the trials say, as study.py reads it too

best.yaml is the best trial's full flat config, so `visionrecipe train --config best.yaml` repeats
that trial (same seed, same validation split, same validation accuracy on CPU). The report is one
self-contained HTML file: matplotlib figures embedded as PNG, no plotly, no network.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from visionrecipe.rundir import atomic_write_text

# best.yaml is for `train`: a normal run directory, progress bar and report, the user's threads.
RUN_SETTINGS = {"out": None, "overwrite": False, "progress": True, "report": True}


@dataclass
class TuneResult:
    out: Path
    best_value: float | None
    best_trial: int | None
    best_config: dict | None
    best_yaml: Path | None
    report: Path | None
    counts: dict[str, int]
    seconds: float


# --- reading the study's trials (the workers' progress lines use these too) ---------------------
def finished(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def best_trial(done: list):
    """The best complete trial; the best pruned one while none is complete."""
    complete = [t for t in done if t.state.name == "COMPLETE"]
    return max(complete or done, key=lambda t: score(t) or 0.0, default=None)


def score(trial) -> float | None:
    """A trial's score, that of the model it keeps: a complete trial's value (its kept epoch's, see
    train/callbacks.keeps), a pruned trial's best per-epoch validation accuracy (stopped early, it keeps its best)."""
    if trial.state.name == "COMPLETE" and trial.value is not None:
        return trial.value
    values = list(trial.intermediate_values.values())
    return max(values) if values else trial.value


def format_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def summarize(study, out: Path, base: dict, seconds: float) -> TuneResult:
    done = finished(study)
    ranked = sorted(done, key=lambda t: (t.state.name != "COMPLETE", -(score(t) or 0.0)))
    counts = {state: sum(t.state.name == state.upper() for t in study.trials)
              for state in ("complete", "pruned", "fail", "running")}
    best = best_trial([t for t in done if t.state.name == "COMPLETE"])
    best_yaml = report = None
    best_config = None
    if best is not None:
        best_config = {**best.user_attrs["config"], **RUN_SETTINGS, "threads": base.get("threads")}
        best_yaml = out / "best.yaml"
        atomic_write_text(best_yaml, f"# best of {len(done)} trials: trial {best.number}, val_acc {score(best):.4f}\n"
                                     f"# reproduce it: visionrecipe train --config {best_yaml}\n"
                                     + yaml.safe_dump(best_config, sort_keys=False))
    importance = param_importance(study)
    print(format_table(ranked[:10]) + (f"\n... {len(ranked) - 10} more in the report" if len(ranked) > 10 else ""))
    if importance:
        print("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in importance.items()))
    try:
        report = write_html(out / "tune_report.html", study, ranked, importance, best_config, seconds)
    except ImportError:
        print("note: no tune_report.html: matplotlib is missing (pip install 'visionrecipe[report]')")
    counted = f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed"
    if best is not None:
        print(f"tune: {counted}; best val_acc {100 * score(best):.2f}% (trial {best.number}); "
              f"{best_yaml} and {report or 'no report'} written in {seconds:.0f}s", flush=True)
    else:
        print(f"tune: {counted}; no complete trial yet, so no best.yaml", flush=True)
    return TuneResult(out=out, best_value=score(best) if best else None, best_trial=best.number if best else None,
                      best_config=best_config, best_yaml=best_yaml, report=report, counts=counts, seconds=seconds)


def param_importance(study) -> dict[str, float]:
    """fANOVA importance (seeded); needs two complete trials that differ in some parameter."""
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if len(complete) < 2:
        return {}
    import optuna

    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except Exception:  # noqa: BLE001 - optuna's evaluators fail many ways (one value per param, ...);
        return {}      # the importance is a nicety at the end of a finished tune, not worth losing it


def format_table(trials: list) -> str:
    lines = [f"{'rank':>4} {'trial':>5} {'state':<8} {'val_acc':>8} {'epochs':>6} {'time':>7}  params"]
    for rank, trial in enumerate(trials, 1):
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        params = " ".join(f"{k}={format_value(v)}" for k, v in trial.params.items())
        lines.append(f"{rank:>4} {trial.number:>5} {trial.state.name.lower():<8} {100 * (score(trial) or 0):>7.2f}% "
                     f"{len(trial.intermediate_values):>6} {seconds:>6.1f}s  {params}")
    return "\n".join(lines)


# --- figures -----------------------------------------------------------------------------------
def figure_png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def history_figure(trials: list) -> str:
    """Score per trial in order, and the best so far: did the search still improve at the end?"""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ordered = sorted(trials, key=lambda t: t.number)
    for state, marker, color in (("COMPLETE", "o", "tab:blue"), ("PRUNED", "x", "tab:gray")):
        points = [(t.number, 100 * score(t)) for t in ordered if t.state.name == state and score(t) is not None]
        if points:
            ax.scatter(*zip(*points), marker=marker, color=color, label=state.lower(), zorder=3)
    best, steps = -math.inf, []
    for t in ordered:
        if t.state.name == "COMPLETE":
            best = max(best, 100 * score(t))
            steps.append((t.number, best))
    if steps:
        ax.step(*zip(*steps), where="post", color="tab:orange", label="best so far")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return figure_png(fig)


def parallel_figure(trials: list) -> str:
    """One line per trial across the parameter axes, coloured by score: where the good trials lie."""
    import matplotlib.pyplot as plt

    names = sorted({name for t in trials for name in t.params})
    axes = names + ["val_acc"]
    scores = [100 * (score(t) or 0.0) for t in trials]
    low, high = min(scores), max(scores)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(axes)), 4))
    cmap = plt.get_cmap("viridis")
    labels = {}
    columns = {}
    for name in names:
        dist = next(t.distributions[name] for t in trials if name in t.distributions)
        columns[name], labels[name] = axis_positions(name, dist, trials)
    for t, value in sorted(zip(trials, scores), key=lambda pair: pair[1]):  # best drawn on top
        ys = [columns[name].get(t.number, math.nan) for name in names]
        ys.append((value - low) / (high - low) if high > low else 0.5)
        color = cmap((value - low) / (high - low) if high > low else 1.0)
        ax.plot(range(len(axes)), ys, color=color, alpha=0.8 if t.state.name == "COMPLETE" else 0.35,
                linestyle="-" if t.state.name == "COMPLETE" else "--", marker="o", markersize=3)
    labels["val_acc"] = (f"{low:.1f}%", f"{high:.1f}%")
    for i, name in enumerate(axes):
        ax.axvline(i, color="black", linewidth=0.8)
        ax.text(i, -0.07, labels[name][0], ha="center", va="top", fontsize=7)
        ax.text(i, 1.07, labels[name][1], ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(axes)), axes, rotation=20)
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.15)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(low, high))
    fig.colorbar(sm, ax=ax, label="val_acc (%)")
    return figure_png(fig)


def axis_positions(name: str, dist, trials: list) -> tuple[dict[int, float], tuple[str, str]]:
    """Each trial's value of `name` on a 0..1 axis (log where the range is log), and end labels."""
    if hasattr(dist, "choices"):
        choices = list(dist.choices)
        span = max(1, len(choices) - 1)
        positions = {t.number: choices.index(t.params[name]) / span for t in trials if name in t.params
                     and t.params[name] in choices}
        return positions, (str(choices[0]), str(choices[-1]) if len(choices) > 1 else "")
    low, high = dist.low, dist.high
    scale = (lambda v: math.log(v)) if dist.log else (lambda v: v)
    width = (scale(high) - scale(low)) or 1.0
    positions = {t.number: (scale(t.params[name]) - scale(low)) / width for t in trials if name in t.params}
    return positions, (format_value(low), format_value(high))


def importance_figure(importance: dict[str, float]) -> str:
    import matplotlib.pyplot as plt

    names = list(importance)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1))
    ax.barh(names, [importance[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (fANOVA, share of the score's variance)")
    return figure_png(fig)


# --- the page ----------------------------------------------------------------------------------
def write_html(path: Path, study, ranked: list, importance: dict, best_config: dict | None,
               seconds: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    e = html.escape
    parts = [f"<h1>Tune report: study {e(study.study_name)}</h1>",
             f"<p>{len(ranked)} finished trials ({sum(t.state.name == 'PRUNED' for t in ranked)} pruned), "
             f"{sum(t.state.name == 'FAIL' for t in study.trials)} failed; this run took {seconds:.0f}s. "
             "Scores are validation accuracy (best epoch); the test split was not used.</p>"]
    if ranked:
        parts += ["<h2>Optimisation history</h2>", img(history_figure(ranked)),
                  "<h2>Parallel coordinates</h2>", img(parallel_figure(ranked))]
    if importance:
        parts += ["<h2>Parameter importance</h2>", img(importance_figure(importance))]
    if best_config:
        parts += ["<h2>best.yaml</h2>", f"<pre>{e(yaml.safe_dump(best_config, sort_keys=False))}</pre>"]
    rows = []
    for rank, t in enumerate(ranked, 1):
        seconds_t = t.duration.total_seconds() if t.duration else 0.0
        params = ", ".join(f"{k}={format_value(v)}" for k, v in t.params.items())
        rows.append(f"<tr><td>{rank}</td><td>{t.number}</td><td>{t.state.name.lower()}</td>"
                    f"<td>{100 * (score(t) or 0):.2f}%</td><td>{len(t.intermediate_values)}</td>"
                    f"<td>{seconds_t:.1f}s</td><td>{e(params)}</td></tr>")
    parts += ["<h2>Trials</h2><table><tr><th>rank</th><th>trial</th><th>state</th><th>val_acc</th>"
              "<th>epochs</th><th>time</th><th>params</th></tr>", *rows, "</table>"]
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
             "img{max-width:100%}pre{background:#f5f5f5;padding:8px}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>tune report</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
    atomic_write_text(path, page)
    return path


def img(png_base64: str) -> str:
    return f"<img src='data:image/png;base64,{png_base64}'>"
