"""Photos: training images/s of visionrecipe against a typical torchvision loop, at 64, 128 and 224 px.

    python bench/photos.py --data ~/.cache/visionrecipe/imagenette --sides 64 128 224 --images 2000

(a) torchvision: ImageFolder over the JPEG files, per-sample RandomResizedCrop(side) + RandomHorizontalFlip +
    ToTensor + Normalize in a DataLoader (2 workers, batch 64), torchvision resnet18, SGD 0.1 momentum 0.9.
(b) visionrecipe with the same resnet18 (the data path alone): `visionrecipe train --model resnet18` at the same
    training side: images decoded once into the record cache at the FixRes side (recipes.eval_side), batched
    random-resized crops and flips on the device; images/s is the trainer's own (metrics.jsonl), validation excluded.
(c) visionrecipe with its default photo net (fastnet width 0.5, the net the budget policy starts photos on,
    the fast recipe), otherwise as (b).
(d) as (c) with `--stem 2`: the whitening conv reads disjoint 2×2 patches, so the blocks run at half the side.

With --accuracy SECONDS, time to equal accuracy instead: (a) on all of train/ at the first --sides side for
SECONDS (cosine over the time, then scored on val/ after Resize(side·8/7) + CenterCrop(side)), against the default
command, `visionrecipe train --data DATA --time-budget SECONDS/3`, scored on val/ as the test split:

    python bench/photos.py --data ~/.cache/visionrecipe/imagenette --accuracy 900 --sides 128

Otherwise both train on the same subset (the first --images files of train/, in a temporary folder of links), in fresh
processes with the same thread count, for --seconds of training each (after warm-up steps for (a); for (b)
the first epoch's rate, which includes its warm-up). The decode of (b) is timed separately and reported, not
counted. Prints a Markdown table: images/s of each and their ratio, per side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def subset_folder(data: Path, images: int, into: Path) -> Path:
    """A folder of links to the first `images` files of data/train (classes round-robin)."""
    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    files = {c: sorted((data / "train" / c).iterdir()) for c in classes}
    picked = 0
    for i in range(max(len(f) for f in files.values())):
        for c in classes:
            if i < len(files[c]) and picked < images:
                (into / c).mkdir(parents=True, exist_ok=True)
                os.symlink(files[c][i], into / c / files[c][i].name)
                picked += 1
    return into


NORMALISE = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
LR = 0.1


def torchvision_loop(folder: Path, side: int, seconds: float, threads: int, schedule: bool = False):
    """(a): trains for `seconds` after 3 warm-up steps; returns (model, images/s). With `schedule`, the
    learning rate follows a cosine from LR to 0 over the seconds."""
    import math

    import torch
    import torchvision
    from torchvision import transforms as T

    torch.set_num_threads(threads)
    tf = T.Compose([T.RandomResizedCrop(side), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(*NORMALISE)])
    loader = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(folder, tf), batch_size=64, shuffle=True,
                                         num_workers=2, persistent_workers=True, drop_last=True)
    model = torchvision.models.resnet18(num_classes=10).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    seen, started, steps = 0, None, 0
    while True:
        for x, y in loader:
            if schedule and started is not None:
                for group in optimizer.param_groups:
                    group["lr"] = LR * 0.5 * (1 + math.cos(math.pi * min(1.0, (time.perf_counter() - started) / seconds)))
            loss = torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == 3:  # warm-up done: start the clock
                started = time.perf_counter()
            elif steps > 3:
                seen += len(y)
                if time.perf_counter() - started >= seconds:
                    return model, seen / (time.perf_counter() - started)


def torchvision_rate(folder: Path, side: int, seconds: float, threads: int) -> float:
    return torchvision_loop(folder, side, seconds, threads)[1]


def torchvision_accuracy(data: Path, side: int, seconds: float, threads: int) -> tuple[float, float]:
    """(a) on all of train/ for `seconds`, scored on val/: (accuracy, training images/s)."""
    import torch
    import torchvision
    from torchvision import transforms as T

    model, rate = torchvision_loop(data / "train", side, seconds, threads, schedule=True)
    tf = T.Compose([T.Resize(side * 8 // 7), T.CenterCrop(side), T.ToTensor(), T.Normalize(*NORMALISE)])
    loader = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(data / "val", tf), batch_size=128,
                                         num_workers=2)
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in loader:
            right += (model(x.contiguous(memory_format=torch.channels_last)).argmax(1) == y).sum().item()
            total += len(y)
    return right / total, rate


def accuracy_table(data: Path, side: int, seconds: float, threads: int) -> None:
    proc = subprocess.run([sys.executable, __file__, "--one-accuracy", str(data), str(side), "--seconds",
                           str(seconds), "--threads", str(threads)], capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("ACCURACY ")), None)
    if line is None:
        sys.exit(proc.stderr[-3000:])
    theirs, rate = map(float, line.split()[1:])
    print(f"(a) torchvision resnet18 at {side} px, {seconds:.0f} s: {100 * theirs:.2f}% on val ({rate:.1f} img/s)",
          flush=True)
    out = Path(tempfile.mkdtemp()) / "run"
    cmd = [sys.executable, "-m", "visionrecipe", "train", "--data", str(data), "--time-budget", str(seconds / 3),
           "--threads", str(threads), "--out", str(out), "--no-progress", "--no-report"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    ours = json.loads((out / "eval.json").read_text())["accuracy"]
    plan = next((l for l in proc.stdout.splitlines() if l.startswith("plan:")), "")
    print(f"(c) visionrecipe default, {seconds / 3:.0f} s: {100 * ours:.2f}% on val; {plan[:120]}", flush=True)
    print(f"\n| (a) torchvision, {seconds:.0f} s | (c) visionrecipe, {seconds / 3:.0f} s | (c) in a third of the time "
          f"reaches (a) |\n|---:|---:|---|\n| {100 * theirs:.2f}% | {100 * ours:.2f}% | {'yes' if ours >= theirs else 'no'} |")


def visionrecipe_rate(folder: Path, side: int, seconds: float, threads: int, cache: Path, model: list[str]) -> dict:
    from visionrecipe.recipes import eval_side

    out = Path(tempfile.mkdtemp()) / "run"
    cmd = [sys.executable, "-m", "visionrecipe", "train", "--data", str(folder), "--model", *model,
           "--image-size", str(eval_side(side, None)), "--train-size", str(side), "--batch-size", "64",
           "--time-budget", str(seconds), "--threads", str(threads), "--out", str(out), "--no-progress",
           "--no-report", "--data-dir", str(cache), "--val-fraction", "0.1"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    decode = next((float(part.split()[1].rstrip("s")) for part in proc.stdout.split(", ") if part.startswith("decode")),
                  0.0)
    rates = [r["img_per_s"] for r in records if "img_per_s" in r]
    return {"images_per_second": max(rates), "decode_s": decode, "wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("~/.cache/visionrecipe/imagenette"))
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 128, 224])
    parser.add_argument("--images", type=int, default=2000, help="train files used (a subset, same for both)")
    parser.add_argument("--seconds", type=float, default=60, help="training seconds per contender and side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accuracy", type=float, help="time to equal accuracy: (a) for this many seconds against "
                                                         "the default command in a third of them")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: torchvision FOLDER SIDE
    parser.add_argument("--one-accuracy", nargs=2, help=argparse.SUPPRESS)  # internal: torchvision DATA SIDE
    args = parser.parse_args()
    if args.one:
        print("RATE", torchvision_rate(Path(args.one[0]), int(args.one[1]), args.seconds, args.threads), flush=True)
        return
    if args.one_accuracy:
        accuracy, rate = torchvision_accuracy(Path(args.one_accuracy[0]), int(args.one_accuracy[1]), args.seconds,
                                              args.threads)
        print("ACCURACY", accuracy, rate, flush=True)
        return
    if args.accuracy:
        accuracy_table(args.data.expanduser(), args.sides[0], args.accuracy, args.threads)
        return
    work = Path(tempfile.mkdtemp(prefix="visionrecipe-photos-"))
    folder = subset_folder(args.data.expanduser(), args.images, work / "subset")
    rows = []
    for side in args.sides:
        proc = subprocess.run([sys.executable, __file__, "--one", str(folder), str(side), "--seconds",
                               str(args.seconds), "--threads", str(args.threads)], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RATE ")), None)
        if line is None:
            sys.exit(proc.stderr[-3000:])
        torchvision = float(line.split()[1])
        same = visionrecipe_rate(folder, side, args.seconds, args.threads, work / "cache", ["resnet18"])
        ours = visionrecipe_rate(folder, side, args.seconds, args.threads, work / "cache", ["fastnet", "--width", "0.5"])
        stem = visionrecipe_rate(folder, side, args.seconds, args.threads, work / "cache",
                                 ["fastnet", "--width", "0.5", "--stem", "2"])
        rows.append((side, torchvision, same, ours, stem))
        print(f"{side} px: torchvision {torchvision:.1f} img/s, visionrecipe resnet18 {same['images_per_second']:.1f}, "
              f"fastnet {ours['images_per_second']:.1f}, stem 2 {stem['images_per_second']:.1f} "
              f"(decode {same['decode_s']:.1f} s)", flush=True)
    print("\n| side | (a) torchvision loop, resnet18 | (b) visionrecipe, resnet18 | (b)/(a) "
          "| (c) visionrecipe, fastnet w0.5 | (c)/(a) | (d) fastnet w0.5 stem 2 | (d)/(a) | decode once |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for side, torchvision, *ours in rows:
        cells = " | ".join(f"{r['images_per_second']:.1f} | {r['images_per_second'] / torchvision:.1f}x" for r in ours)
        print(f"| {side} px | {torchvision:.1f} | {cells} | {ours[0]['decode_s']:.1f} s |")  # the first of them decodes


if __name__ == "__main__":
    main()
