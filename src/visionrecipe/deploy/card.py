"""A model card for a run: MODEL_CARD.md, from the run's own files only.

    text = model_card("runs/digits")          # Markdown: data, classes, metrics, training, use and limits
    write_model_card("runs/digits")           # <run>/MODEL_CARD.md, written atomically

What it says comes from model.json (architecture, classes, input), config.yaml (what ran),
metrics.jsonl (epochs, time) and eval.json (the test split's scores, when the run was scored);
nothing is measured here. Train writes it at its end and `report` writes it again; `push`
uploads it as the repository's README.md. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from visionrecipe.rundir import atomic_write_text, read_metrics, read_model_meta

CARD = "MODEL_CARD.md"
TRAINING_KEYS = ("recipe", "epochs", "time_budget", "batch_size", "optimizer", "lr", "weight_decay", "schedule",
                 "label_smoothing", "ema", "tta", "weights", "seed")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _flat_config(run_dir: Path) -> dict:
    try:
        nested = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {k: v for section in nested.values() if isinstance(section, dict) for k, v in section.items()}


def _metrics_section(result: dict | None) -> list[str]:
    if not result:
        return ["Not scored on a test split yet: `visionrecipe evaluate RUN` writes eval.json."]
    if result.get("task") == "multilabel":
        head = [f"| mAP | {100 * result['mAP']:.2f}% |", f"| F1 micro | {100 * result['f1_micro']:.2f}% |"]
    else:
        head = [f"| accuracy | {100 * result['accuracy']:.2f}% |"]
        head += [f"| {name.replace('_', ' ')} | {100 * result[key]:.2f}% |"
                 for name, key in (("balanced accuracy", "balanced_accuracy"), ("macro-F1", "f1_macro"),
                                   ("top-5 accuracy", "top5_accuracy"), ("expected calibration error", "ece"))
                 if key in result]
    lines = [f"On the {result.get('split', 'test')} split ({result.get('num_images', '?')} images):", "",
             "| metric | value |", "|---|---|", *head, f"| loss | {result['loss']:.4f} |"]
    per_class = result.get("per_class") or []
    if per_class:
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {r['class']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |"
                  for r in per_class]
    return lines


def model_card(run_dir: str | Path) -> str:
    """The card's Markdown text for a trained run directory."""
    run_dir = Path(run_dir)
    meta = read_model_meta(run_dir / "model.json")
    config = _flat_config(run_dir)
    metrics = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    result = _read_json(run_dir / "eval.json")
    classes = list(meta["classes"])
    channels, height, width = meta["input_size"]
    task = meta.get("task", "multiclass")
    shown = ", ".join(f"`{c}`" for c in classes[:50]) + (f" and {len(classes) - 50} more" if len(classes) > 50 else "")
    training = [f"| {key} | {config[key]} |" for key in TRAINING_KEYS if config.get(key) is not None]
    if metrics:
        training.append(f"| epochs run | {metrics[-1]['epoch']} |")
        if metrics[-1].get("elapsed_s") is not None:
            training.append(f"| training seconds | {metrics[-1]['elapsed_s']:.1f} |")
    training.append(f"| kept epoch (by validation) | {meta.get('epoch', '?')} |")
    lines = [
        "---", "library_name: visionrecipe", "pipeline_tag: image-classification", "tags: [visionrecipe, "
        f"{meta['architecture'].replace(':', '-')}]", "---", "",
        f"# {run_dir.name}: {meta['architecture']} on {meta.get('data') or config.get('data', '?')}", "",
        f"An image classifier ({task}, {len(classes)} classes) trained with visionrecipe. This card is generated from "
        "the run's own files (model.json, config.yaml, metrics.jsonl, eval.json).", "",
        "## Data", "",
        f"- data: `{meta.get('data') or config.get('data', '?')}`",
        f"- classes ({len(classes)}): {shown}",
        f"- input: {channels}×{height}×{width} (C×H×W), pixels / 255 normalised with mean "
        f"{[round(m, 4) for m in meta['mean']]} and std {[round(s, 4) for s in meta['std']]}", "",
        "## Metrics", "", *_metrics_section(result), "",
        "## Training", "", "| setting | value |", "|---|---|", *training, "",
        "## Intended use", "",
        f"Classifying images like those of `{meta.get('data') or config.get('data', '?')}` into the {len(classes)} "
        "classes above, at the input size above. Use:", "",
        "    visionrecipe predict RUN image.png --topk 3", "",
        "## Limits", "",
        "- The metrics hold for data drawn like the test split; other cameras, lighting, sizes or classes "
        "(an image of none of these classes still gets one of them) are outside what was measured.",
        "- Check the per-class scores: a good average can hide a weak class.",
        "- Not for decisions about people, or anything safety-critical, without a separate evaluation.", "",
    ]
    return "\n".join(lines)


def write_model_card(run_dir: str | Path) -> Path:
    path = Path(run_dir) / CARD
    atomic_write_text(path, model_card(run_dir))
    return path
