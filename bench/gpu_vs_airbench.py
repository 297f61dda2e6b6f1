"""On a CUDA machine: time to 93% CIFAR-10 test accuracy, visionrecipe's default recipe next to airbench.

    python bench/gpu_vs_airbench.py --data /tmp/cifar10-jpg --airbench PATH/airbench-0.1.8 --runs 3

Both train on the same 50,000 decoded JPEG training images and are scored on the same 10,000 JPEG
test images. airbench (Keller Jordan's CIFAR-10 speed-record code, the `airbench` package) reads a
`train.pt`/`test.pt` dict of uint8 NHWC images written here from visionrecipe's decoded tensors.
Each side gets one untimed warm-up run first (cuDNN autotuning, torch.compile), as airbench does.
Timing: wall clock with `torch.cuda.synchronize()` at both ends; decoding is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def write_airbench_data(dataset, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", dataset.train), ("test", dataset.test)):
        torch.save({"images": split.images.permute(0, 2, 3, 1).contiguous(), "labels": split.labels,
                    "classes": dataset.classes}, folder / f"{name}.pt")


def run_airbench(workdir: Path, epochs: float, runs: int) -> list[dict]:
    import airbench

    os.chdir(workdir)  # airbench opens its test set at the relative path "cifar10/"
    hyp = airbench.lib_airbench94.hyp
    loader = airbench.CifarLoader("cifar10", train=True, batch_size=hyp["opt"]["batch_size"], aug=hyp["aug"],
                                  altflip=True)
    test_loader = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    airbench.train94(loader, epochs=epochs, verbose=False)  # warm-up
    results = []
    for _ in range(runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model = airbench.train94(loader, epochs=epochs, verbose=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        accuracy = airbench.evaluate(model, test_loader, tta_level=2)
        results.append({"seconds": round(seconds, 2), "test_accuracy": accuracy, "epochs": epochs})
        print(f"airbench94 epochs={epochs}: {seconds:.2f}s  test {100 * accuracy:.2f}%", flush=True)
    return results


def run_visionrecipe(data: str, settings: dict, runs: int) -> list[dict]:
    from visionrecipe.config import Config, apply_overrides
    from visionrecipe.evaluate.scoring import compute_metrics, predict_logits
    from visionrecipe.train.loop import Trainer

    results = []
    for run in range(runs + 1):  # run 0 is the warm-up
        cfg = apply_overrides(Config(), {"data": data, "val_fraction": 0.0, "progress": False, "report": False,
                                         "out": f"/tmp/vr-gpu-{run}-{time.time_ns()}", **settings})
        trainer = Trainer(cfg)
        points = []

        def on_epoch(record, trainer=trainer, points=points):
            # Scored off the clock: the trainer's elapsed_s already excludes this callback.
            model = trainer.ema.model if trainer.ema is not None else trainer.model
            logits = predict_logits(model, trainer.data.test.images, trainer.mean, trainer.std,
                                    tta=bool(trainer.cfg.optim.tta), device=trainer.device)
            points.append((record["elapsed_s"], compute_metrics(logits, trainer.data.test.labels)["accuracy"]))

        trainer.on_epoch = on_epoch
        trainer.fit()
        to93 = next((t for t, acc in points if acc >= 0.93), None)
        result = {"seconds": round(trainer.elapsed, 2), "test_accuracy": points[-1][1], "time_to_93": to93,
                  "curve": points, "settings": settings}
        print(f"visionrecipe {'warm-up' if run == 0 else f'run {run}'} {settings}: {trainer.elapsed:.2f}s  "
              f"test {100 * points[-1][1]:.2f}%  to93 {to93}", flush=True)
        if run:
            results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--airbench", help="folder holding the airbench package (its sdist, unpacked)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=float, nargs="*", default=[10.0])
    parser.add_argument("--airbench-epochs", type=float, nargs="*", default=[9.9, 7.0])
    parser.add_argument("--set", nargs="*", default=[], help="extra visionrecipe settings, key=value")
    parser.add_argument("--out", default="gpu_results.json")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA device"
    from visionrecipe.data import load_dataset

    started = time.perf_counter()
    dataset = load_dataset(args.data, val_fraction=0.0, progress=False)
    print(f"decoded {len(dataset.train.labels) + len(dataset.test.labels):,} images in "
          f"{time.perf_counter() - started:.1f}s on {torch.cuda.get_device_name()}", flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "airbench": [], "visionrecipe": []}
    extra = dict(item.split("=", 1) for item in args.set)
    for epochs in args.epochs:
        report["visionrecipe"] += run_visionrecipe(args.data, {"epochs": epochs, **extra}, args.runs)
    if args.airbench:
        sys.path.insert(0, args.airbench)
        workdir = Path("/tmp/airbench-work")
        write_airbench_data(dataset, workdir / "cifar10")
        for epochs in args.airbench_epochs:
            report["airbench"] += run_airbench(workdir, epochs, args.runs)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({side: [{k: v for k, v in r.items() if k != "curve"} for r in report[side]]
                      for side in ("visionrecipe", "airbench")}, indent=1))


if __name__ == "__main__":
    main()
