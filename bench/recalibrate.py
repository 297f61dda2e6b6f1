"""Precise BatchNorm: a trained run's test accuracy as saved, and with its BatchNorm statistics
re-estimated from N un-augmented train images at the evaluation side (evaluate/scoring.py
recalibrate_batchnorm, what `--recalibrate-bn N` does before every validation).

    visionrecipe train --data ~/.cache/visionrecipe/cifar10-jpg --time-budget 600 --recalibrate-bn 0 --out /tmp/c600
    python bench/recalibrate.py /tmp/c600 --images 256 512 1024 4096

The images are a seeded random subset of the run's train split (seed 0), as the trainer picks them;
test accuracy with the run's own TTA. Prints a Markdown table, one row per run.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from visionrecipe.evaluate.scoring import compute_metrics, load_run_dataset, predict_logits, recalibrate_batchnorm
from visionrecipe.models.checkpoint import load_model
from visionrecipe.system import set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--images", type=int, nargs="+", default=[512, 1024, 4096])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads, torch.device("cpu"))
    print("| run | as saved | " + " | ".join(f"{n:,} images" for n in args.images) + " |")
    print("|---|---:|" + "---:|" * len(args.images))
    for run in args.runs:
        model, meta = load_model(run)
        data = load_run_dataset(run, meta)
        tta = meta.get("tta", False)

        def score(m: torch.nn.Module) -> float:
            logits = predict_logits(m, data.test.images, meta["mean"], meta["std"], tta=tta)
            return 100 * compute_metrics(logits, data.test.labels)["accuracy"]

        cells = [score(model)]
        order = torch.randperm(len(data.train.labels), generator=torch.Generator().manual_seed(0))
        for n in args.images:
            fresh = copy.deepcopy(model)
            recalibrate_batchnorm(fresh, data.train.images[order[:n].sort().values], meta["mean"], meta["std"])
            cells.append(score(fresh))
        print(f"| {run} | " + " | ".join(f"{c:.2f}%" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
