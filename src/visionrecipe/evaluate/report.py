"""One self-contained page that explains a run: report.html plus its figures as PNG files.

    path = write_report("runs/digits")             # runs/digits/report.html, curves.png, ...
    path = write_report(run_dir, dataset=data)     # the trainer passes the data it already decoded

The page has no outside references: CSS is inline and every picture is a base64 data URI, so it
opens from disk, by mail, anywhere. The numbers come from `evaluate_run` on the test split, the
very call that writes eval.json, so the page and eval.json cannot disagree; they are also
embedded as JSON in ``<script type="application/json" id="report-data">`` for machines.

Figures use matplotlib's object API (``Figure``, never pyplot), so no display or global state is
touched; `image_grid` and `save_figure` also draw the doctor's pictures.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure  # an ImportError here tells the trainer to skip the report

from visionrecipe.rundir import atomic_write_bytes, atomic_write_text, locked, read_metrics, trained_run

MISTAKES = 18  # gallery size: the highest-confidence wrong test predictions
ACCENT = "#2563eb"


# --- figures -------------------------------------------------------------------------------------
def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def save_figure(fig, path: Path) -> bytes:
    """Write the figure as a PNG, atomically (never half a picture on disk); returns the PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
    return buffer.getvalue()


def image_grid(images: list, ncols: int, *, titles: list[str] | None = None, colors: list[str] | None = None,
               row_labels: list[str] | None = None, cell: float = 1.0):
    """A grid of uint8 C×H×W images (None leaves a cell blank), titled per image or labelled per row."""
    nrows = max(1, -(-len(images) // ncols))
    title_lines = max((title.count("\n") + 1 for title in titles), default=0) if titles else 0
    fig = new_figure(ncols * cell + (0.6 if row_labels else 0), nrows * cell * (1 + 0.225 * title_lines))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        image = images[i] if i < len(images) else None
        if image is not None:
            array = image.permute(1, 2, 0).cpu().numpy()
            grey = array.shape[2] == 1
            ax.imshow(array[:, :, 0] if grey else array, cmap="gray" if grey else None, vmin=0, vmax=255,
                      interpolation="nearest")
            if titles:
                ax.set_title(titles[i], fontsize=9, color=(colors[i] if colors else "#111827"))
    for row, label in enumerate(row_labels or []):
        axes[row, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    return fig


def plot_curves(metrics: list[dict], score_name: str = "val accuracy (%)"):
    """Loss (train, val), the validation score (val_acc) and learning rate against epoch."""
    fig = new_figure(11, 3.1)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    epochs = [m["epoch"] for m in metrics]
    ax_loss.plot(epochs, [m["train_loss"] for m in metrics], "o-", ms=3, label="train", color="#9ca3af")
    ax_loss.plot(epochs, [m["val_loss"] for m in metrics], "o-", ms=3, label="val", color=ACCENT)
    ax_loss.set_title("loss")
    ax_loss.legend(frameon=False)
    ax_acc.plot(epochs, [100 * m["val_acc"] for m in metrics], "o-", ms=3, color=ACCENT)
    ax_acc.set_title(score_name)
    ax_lr.plot(epochs, [m["lr"] for m in metrics], "o-", ms=3, color="#f59e0b")
    ax_lr.set_title("learning rate (end of epoch)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc, ax_lr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return fig


def plot_confusion(matrix: list[list[int]], classes: list[str]):
    """Counts and row-normalised (recall) confusion matrices side by side."""
    counts = torch.tensor(matrix, dtype=torch.float64)
    normalised = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    side = min(4.0, 1.3 + 0.27 * n)
    fig = new_figure(2 * side + 0.8, side)
    for ax, values, title, fmt in zip(fig.subplots(1, 2), (counts, normalised), ("counts", "normalised by true class"),
                                      ("{:.0f}", "{:.2f}")):
        image = ax.imshow(values.numpy(), cmap="Blues", vmin=0)
        ax.set_title(title)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if n <= 20:
            ax.set_xticks(range(n), classes, rotation=90 if max(map(len, classes)) > 3 else 0, fontsize=9)
            ax.set_yticks(range(n), classes, fontsize=9)
        if n <= 12:
            top = float(values.max()) or 1.0
            for (i, j), v in zip(((i, j) for i in range(n) for j in range(n)), values.flatten().tolist()):
                if v:
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7.5,
                            color="white" if v > 0.6 * top else "#111827")
        fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def plot_reliability(bins: list[dict], ece: float):
    """Accuracy against confidence per bin (a calibrated model sits on the diagonal), with counts."""
    fig = new_figure(5, 4.4)
    ax, ax_count = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    width = 1 / max(len(bins), 1)
    centres = [(b["lower"] + b["upper"]) / 2 for b in bins]
    filled = [b for b in bins if b["count"]]
    ax.bar([(b["lower"] + b["upper"]) / 2 for b in filled], [b["accuracy"] for b in filled], width=width * 0.95,
           color=ACCENT, alpha=0.85, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="#6b7280", lw=1, label="perfect calibration")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {100 * ece:.2f}%)")
    ax.legend(frameon=False, loc="upper left", fontsize=8)
    ax_count.bar(centres, [b["count"] for b in bins], width=width * 0.95, color="#9ca3af")
    ax_count.set_yscale("symlog")
    ax_count.set_ylabel("images")
    ax_count.set_xlabel("confidence")
    ax_count.set_xlim(0, 1)
    for a in (ax, ax_count):
        a.spines[["top", "right"]].set_visible(False)
    return fig


# --- the data behind the page -------------------------------------------------------------------
def worst_mistakes(logits: torch.Tensor, labels: torch.Tensor, k: int = MISTAKES) -> list[tuple[int, int, float]]:
    """(index, predicted class, confidence) of the k most confident wrong predictions."""
    confidence, predicted = torch.softmax(logits.float(), 1).max(1)
    wrong = torch.nonzero(predicted != labels).reshape(-1)
    order = wrong[confidence[wrong].argsort(descending=True)][:k]
    return [(int(i), int(predicted[i]), float(confidence[i])) for i in order]


def mistake_file(split, index: int) -> str | None:
    """The file a test image came from (folder and manifest data), None for tensors (digits, CIFAR)."""
    return split.paths[index] if split.paths else None


def short_name(path: str, width: int = 18) -> str:
    """A file name that fits under a gallery picture: its base name, the middle elided."""
    name = Path(path).name
    return name if len(name) <= width else name[:width // 2 - 1] + "…" + name[-(width // 2):]


def _mistakes_table(mistakes: list[dict]) -> str:
    """The gallery's images by file, in the gallery's order (the figure shows base names only)."""
    if not mistakes:
        return ""
    rows = "".join(f'<tr><td class="text">{html.escape(m["file"] or "#" + str(m["index"]))}</td>'
                   f'<td>{html.escape(m["true"])}</td><td>{html.escape(m["predicted"])}</td>'
                   f'<td>{100 * m["confidence"]:.0f}%</td></tr>' for m in mistakes)
    return ('<div class="scroll"><table><tr><th>file</th><th>true</th><th>predicted</th><th>confidence</th></tr>'
            f"{rows}</table></div>")


def write_report(run_dir: str | Path, dataset=None, scored: tuple[dict, torch.Tensor] | None = None) -> Path:
    """Write report.html with its PNGs from the run's test split. `scored` is the (result, logits)
    of evaluate_run(..., return_logits=True) when the caller has just scored it (the trainer, with
    `dataset`); without it the split is evaluated here (rewriting eval.json)."""
    run_dir = trained_run(run_dir)
    with locked(run_dir):  # no other process writes the run meanwhile (a training run, another report)
        return _write_report(run_dir, dataset, scored)


def _write_report(run_dir: Path, dataset, scored) -> Path:
    from visionrecipe.models.checkpoint import load_model
    from visionrecipe.evaluate.scoring import evaluate_run, load_run_dataset
    from visionrecipe.models import count_parameters

    model, meta = load_model(run_dir)
    if dataset is None:
        dataset = load_run_dataset(run_dir, meta)
    result, logits = scored or evaluate_run(run_dir, dataset=dataset, return_logits=True)
    multilabel = result.get("task") == "multilabel"
    metrics = read_metrics(run_dir)
    classes, labels = result["classes"], dataset.test.labels

    figures, mistakes = {}, []
    if metrics:
        figures["curves"] = plot_curves(metrics, "val mAP (%)" if multilabel else "val accuracy (%)")
    if not multilabel:  # softmax pictures: one true class per image
        figures["confusion"] = plot_confusion(result["confusion_matrix"], classes)
        figures["reliability"] = plot_reliability(result["calibration"], result["ece"])
        mistakes = worst_mistakes(logits, labels)
        if mistakes:
            titles = [f"{short_name(mistake_file(dataset.test, i) or f'#{i}')}\ntrue {classes[labels[i]]}\n"
                      f"pred {classes[p]} {100 * c:.0f}%" for i, p, c in mistakes]
            figures["mistakes"] = image_grid([dataset.test.images[i] for i, _, _ in mistakes], 6, titles=titles,
                                             colors=["#b91c1c"] * len(titles), cell=1.25)
    pngs = {name: save_figure(fig, run_dir / f"{name}.png") for name, fig in figures.items()}
    doctor_path = run_dir / "doctor.json"
    page = {
        "run": run_dir.name, "data": result["data"], "model": meta["architecture"],
        "parameters": count_parameters(model), "input_size": meta["input_size"],
        "splits": {name: len(split) for name in ("train", "val", "test")
                   if (split := getattr(dataset, name)) is not None},
        "result": {k: v for k, v in result.items() if k not in ("split", "data", "model")},
        "epochs": metrics[-1]["epoch"] if metrics else meta.get("epoch"),
        "train_seconds": metrics[-1].get("elapsed_s") if metrics else None,
        "best_epoch": meta.get("epoch"),
        "mistakes": [{"index": i, "file": mistake_file(dataset.test, i), "true": classes[labels[i]],
                      "predicted": classes[p], "confidence": c} for i, p, c in mistakes],
        "doctor": json.loads(doctor_path.read_text()) if doctor_path.is_file() else None,
    }
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text() if config_path.is_file() else "(no config.yaml)"
    out = run_dir / "report.html"
    atomic_write_text(out, render(page, pngs, config_text))
    return out


# --- the page ------------------------------------------------------------------------------------
CSS = """
:root{--ink:#111827;--muted:#6b7280;--line:#e5e7eb;--bg:#f6f7f9;--card:#fff;--accent:#2563eb}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
 Helvetica,Arial,sans-serif}
header{background:#0f172a;color:#f8fafc;padding:22px 0 20px}
header h1{margin:0;font-size:22px;font-weight:650} header .sub{margin:4px 0 0;color:#94a3b8}
header code{color:#e2e8f0}
.wrap{max-width:1180px;margin:0 auto;padding:0 20px}
main.wrap{padding:20px 20px 40px}
.kpis{display:grid;grid-template-columns:1.4fr repeat(5,1fr);gap:12px;margin-bottom:16px}
.kpi{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.kpi .label{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.kpi .value{font-size:24px;font-weight:650;margin-top:2px}
.kpi.main{border-color:var(--accent);background:linear-gradient(180deg,#eff6ff,#fff)}
.kpi.main .value{font-size:38px;color:var(--accent);line-height:1.1}
.kpi .note{color:var(--muted);font-size:12px}
.glance{margin:-4px 0 16px;padding:10px 14px;background:#fff;border:1px solid var(--line);border-left:4px solid
 var(--accent);border-radius:8px}
.row{display:grid;gap:16px;margin-bottom:16px}
.r2{grid-template-columns:1.5fr 1fr} .r2b{grid-template-columns:1fr 1.6fr} .r3{grid-template-columns:1fr 1fr 1.3fr}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 16px;min-width:0}
.card h2{margin:0 0 10px;font-size:15px;font-weight:650}
.card p.hint{margin:-4px 0 10px;color:var(--muted);font-size:12.5px}
.card img{display:block;max-width:100%;height:auto;margin:0 auto}
.full{margin-bottom:16px}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:5px 8px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th{color:var(--muted);font-weight:600;font-size:12px;position:sticky;top:0;background:var(--card)}
th:first-child,td:first-child{text-align:left}
td.text{text-align:left;white-space:normal}
table.plain th,table.plain td{text-align:left}
.scroll{max-height:430px;overflow:auto}
.bar{display:inline-block;width:60px;height:7px;background:#eef2f7;border-radius:4px;margin-right:6px;
 vertical-align:middle;overflow:hidden} .bar span{display:block;height:100%;background:var(--accent)}
.low{color:#b45309;font-weight:600} .bad{color:#b91c1c;font-weight:600}
.pill{display:inline-block;padding:1px 8px;border-radius:999px;font-size:12px;font-weight:600}
.pass{background:#dcfce7;color:#166534} .warn{background:#fef3c7;color:#92400e}
.fail{background:#fee2e2;color:#991b1b} .skip{background:#f3f4f6;color:#4b5563}
pre{margin:0;background:#f8fafc;border:1px solid var(--line);border-radius:8px;padding:10px;font-size:12px;
 max-height:300px;overflow:auto}
dl{display:grid;grid-template-columns:auto 1fr;gap:4px 12px;margin:0} dt{color:var(--muted)} dd{margin:0}
footer{color:var(--muted);font-size:12px;text-align:center;padding-bottom:24px}
@media (max-width:900px){.kpis{grid-template-columns:repeat(2,1fr)}.r2,.r2b,.r3{grid-template-columns:1fr}}
"""


def _img(pngs: dict, name: str, alt: str) -> str:
    if name not in pngs:
        return '<p class="hint">not available</p>'
    data = base64.b64encode(pngs[name]).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _kpi(label: str, value: str, note: str = "", main: bool = False) -> str:
    note_html = f'<div class="note">{html.escape(note)}</div>' if note else ""
    return (f'<div class="kpi{" main" if main else ""}"><div class="label">{html.escape(label)}</div>'
            f'<div class="value">{html.escape(value)}</div>{note_html}</div>')


def _per_class_table(rows: list[dict]) -> str:
    with_ap = bool(rows) and "ap" in rows[0]
    head = "".join(f"<th>{h}</th>" for h in ["class", *(["AP"] if with_ap else []), "precision", "recall", "F1",
                                              "support"])
    out = []
    for r in rows:
        grade = "bad" if r["f1"] < 0.7 else "low" if r["f1"] < 0.9 else ""
        ap = (f'<td>{r["ap"]:.3f}</td>' if r["ap"] is not None else "<td>–</td>") if with_ap else ""
        out.append(f'<tr><td>{html.escape(r["class"])}</td>{ap}<td>{r["precision"]:.3f}</td><td>{r["recall"]:.3f}</td>'
                   f'<td class="{grade}"><span class="bar"><span style="width:{100 * r["f1"]:.0f}%"></span></span>'
                   f'{r["f1"]:.3f}</td><td>{r["support"]}</td></tr>')
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(out)}</table></div>'


def _doctor_section(doctor: dict | None) -> str:
    if not doctor:
        return ""
    rows = "".join(f'<tr><td>{html.escape(c["name"])}</td><td><span class="pill {html.escape(c["verdict"])}">'
                   f'{html.escape(c["verdict"])}</span></td><td class="text">{html.escape(c["figure"])}</td>'
                   f'<td class="text">{html.escape(c.get("advice", ""))}</td></tr>' for c in doctor["checks"])
    return (f'<section class="card full"><h2>Doctor</h2><p class="hint">Checks before training '
            f'(<code>visionrecipe doctor</code>, {html.escape(str(doctor.get("model", "")))} on '
            f'{html.escape(str(doctor.get("data", "")))})</p><table class="plain"><tr><th>check</th><th>verdict</th>'
            f'<th>measured</th><th>what to do</th></tr>{rows}</table></section>')


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _kpis(page: dict) -> str:
    r, seconds = page["result"], page["train_seconds"]
    if r.get("task") == "multilabel":
        scores = [_kpi("Test mAP", f"{100 * r['mAP']:.2f}%", f"{r['num_images']:,} images", main=True),
                  _kpi("F1 (micro)", f"{100 * r['f1_micro']:.2f}%", f"threshold {r['threshold']:g}"),
                  _kpi("Exact match", f"{100 * r['accuracy']:.2f}%", "every label right"),
                  _kpi("Test loss", f"{r['loss']:.4f}", "binary cross-entropy")]
    else:
        scores = [_kpi("Test accuracy", f"{100 * r['accuracy']:.2f}%",
                       f"{r['num_correct']:,} of {r['num_images']:,} images", main=True),
                  _kpi("Top-5", f"{100 * r['top5_accuracy']:.2f}%"),
                  _kpi("Test loss", f"{r['loss']:.4f}", "cross-entropy"),
                  _kpi("ECE", f"{100 * r['ece']:.2f}%", "calibration error, 15 bins")]
    training = f"{page['epochs']} epochs" if page["epochs"] else "n/a"
    note = f"{seconds:.1f} s, kept epoch {page['best_epoch']}" if seconds is not None else ""
    return "".join(scores + [_kpi("Parameters", _count(page["parameters"]), page["model"]),
                             _kpi("Training", training, note)])


def _at_a_glance(r: dict) -> str:
    """One sentence: the weakest class and the most common confusion."""
    if r.get("task") == "multilabel" or not r.get("per_class"):
        return ""
    worst = min(r["per_class"], key=lambda row: row["recall"])
    matrix, classes = r["confusion_matrix"], r["classes"]
    count, true, predicted = max((matrix[i][j], i, j) for i in range(len(classes)) for j in range(len(classes))
                                 if i != j) if len(classes) > 1 else (0, 0, 0)
    confusion = (f"; most common mistake: <b>{html.escape(classes[true])}</b> taken for "
                 f"<b>{html.escape(classes[predicted])}</b> ({count} images)") if count else "; no mistakes"
    return (f'<p class="glance">Weakest class: <b>{html.escape(worst["class"])}</b> (recall '
            f'{100 * worst["recall"]:.1f}%){confusion}.</p>')


def _card(title: str, hint: str, body: str) -> str:
    hint_html = f'<p class="hint">{hint}</p>' if hint else ""
    return f'<section class="card"><h2>{html.escape(title)}</h2>{hint_html}{body}</section>'


def render(page: dict, pngs: dict[str, bytes], config_text: str) -> str:
    """The HTML text of the report; `page` is also embedded verbatim as JSON."""
    r, e = page["result"], html.escape
    per_class = _card("Per class", "F1 below 0.9 is amber, below 0.7 red.", _per_class_table(r.get("per_class", [])))
    if r.get("task") == "multilabel":
        middle = f'<div class="row">{per_class}</div>'
    else:
        confusion = _card("Confusion matrix", "Rows are true classes, columns predictions.",
                          _img(pngs, "confusion", "confusion matrix"))
        calibration = _card("Calibration", f"Bars above the diagonal: underconfident (label smoothing does "
                            f"this); below: overconfident. ECE {100 * r['ece']:.2f}% is the average gap.",
                            _img(pngs, "reliability", "reliability diagram"))
        mistakes = _card("Worst mistakes", "The most confident wrong test predictions: look for label noise, "
                         "ambiguous images, or a class the model confuses.",
                         _img(pngs, "mistakes", "worst mistakes") + _mistakes_table(page["mistakes"]))
        middle = f'<div class="row r2">{confusion}{per_class}</div><div class="row r2b">{calibration}{mistakes}</div>'
    splits = "".join(f"<tr><td>{e(name)}</td><td>{n:,}</td></tr>" for name, n in page["splits"].items())
    data = _card("Data", "", f"<dl><dt>data</dt><dd>{e(page['data'])}</dd><dt>classes</dt><dd>{len(r['classes'])}"
                 f"</dd><dt>input size</dt><dd>{'×'.join(map(str, page['input_size']))} (C×H×W)</dd></dl><br>"
                 f"<table><tr><th>split</th><th>images</th></tr>{splits}</table>")
    model = _card("Model", "", f"<dl><dt>architecture</dt><dd>{e(page['model'])}</dd><dt>parameters</dt>"
                  f"<dd>{page['parameters']:,}</dd><dt>kept epoch</dt><dd>{page['best_epoch']}</dd>"
                  f"<dt>epochs run</dt><dd>{page['epochs']}</dd></dl>")
    config = _card("Config", "", f"<pre>{e(config_text)}</pre>")
    data_json = json.dumps(page).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{e(page['run'])} · visionrecipe report</title><link rel="icon" href="data:,"><style>{CSS}</style></head>
<body><header><div class="wrap"><h1>{e(page['data'])} · {e(page['model'])}</h1>
<p class="sub">run <code>{e(page['run'])}</code> · test split · {time.strftime('%Y-%m-%d %H:%M')}</p></div></header>
<main class="wrap">
<section class="kpis">{_kpis(page)}</section>
{_at_a_glance(r)}
<section class="card full"><h2>Training curves</h2>{_img(pngs, 'curves', 'training curves')}</section>
{middle}
<div class="row r3">{data}{model}{config}</div>
{_doctor_section(page['doctor'])}
</main><footer>visionrecipe report · opens offline: every picture is embedded</footer>
<script type="application/json" id="report-data">{data_json}</script>
</body></html>
"""
