"""How good a CIFAR-10 model in N seconds? Three training loops, side by side, one invocation.

    python bench/speed.py --data ~/.cache/visionrecipe/cifar10-jpg --budget 300 --runs 1

(a) seed:        the seed article's §4.3 CNN (flatten fixed for 32×32), Adam 1e-3, batch 32,
                 torchvision ImageFolder + DataLoader with per-sample ToTensor.
(b) torchvision: a typical torchvision-style loop: resnet18, DataLoader with RandomCrop(32, 4) and
                 RandomHorizontalFlip per sample, SGD 0.1 momentum 0.9 wd 5e-4, cosine over the budget.
(c) visionrecipe: `visionrecipe train --data DATA --time-budget BUDGET` (the default fast recipe).

Each contender runs in its own process with the same thread count, on the same data and budget.
The clock counts training only: test-split evaluations (every `--eval-every` seconds for (a) and
(b), every epoch for (c)) pause it. Reported: test accuracy at the budget, training images/s,
time to 70/80/85% test accuracy, and achieved training GFLOP/s (3 × forward FLOPs × images/s)
against a fp32 matmul measured in the same process just before training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

THRESHOLDS = (0.70, 0.80, 0.85)


def matmul_gflops(seconds: float = 3.0, n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return count * 2 * n ** 3 / (time.perf_counter() - start) / 1e9


def forward_flops(model: torch.nn.Module, shape=(3, 32, 32)) -> float:
    from visionrecipe.models.summary import module_layer_table

    return 2.0 * sum(row["macs"] for row in module_layer_table(model, shape))


class Clock:
    """Training time that pauses during evaluation; records (seconds, accuracy) points."""

    def __init__(self):
        self.training = 0.0
        self.started = None
        self.points: list[tuple[float, float]] = []

    def start(self):
        self.started = time.perf_counter()

    def pause(self):
        self.training += time.perf_counter() - self.started
        self.started = None

    def now(self) -> float:
        return self.training + (time.perf_counter() - self.started if self.started else 0.0)


def time_to(points, threshold):
    return next((round(t, 1) for t, acc in points if acc >= threshold), None)


@torch.no_grad()
def test_accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train()
    return correct / total


def dataloader_loop(name: str, data: Path, budget: float, eval_every: float, threads: int) -> dict:
    """(a) and (b): the per-sample DataLoader loops users write by hand."""
    import torchvision
    from torchvision import transforms as T

    from visionrecipe.models import create_model

    torch.set_num_threads(threads)
    peak = matmul_gflops()
    if name == "seed":
        model = create_model("seedcnn", 10, image_size=32)
        train_tf, test_tf = T.ToTensor(), T.ToTensor()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        batch_size, scheduler = 32, None
    else:
        norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        model = torchvision.models.resnet18(num_classes=10)
        train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        test_tf = T.Compose([T.ToTensor(), norm])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        batch_size, scheduler = 128, "cosine"
    flops = forward_flops(model)
    train_set = torchvision.datasets.ImageFolder(data / "train", train_tf)
    test_set = torchvision.datasets.ImageFolder(data / "test", test_tf)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=1,
                                               persistent_workers=True, drop_last=True)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=500, num_workers=1)
    clock, seen, next_eval = Clock(), 0, eval_every
    clock.start()
    done = False
    while not done:
        for x, y in train_loader:
            if scheduler:
                for group in optimizer.param_groups:
                    group["lr"] = 0.1 * 0.5 * (1 + torch.cos(torch.tensor(min(1.0, clock.now() / budget)) * torch.pi).item())
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(y)
            if clock.now() >= min(next_eval, budget):
                clock.pause()
                clock.points.append((clock.training, test_accuracy(model, test_loader)))
                next_eval += eval_every
                if clock.training >= budget:
                    done = True
                    break
                clock.start()
    return summarise(name, clock, seen, flops, peak)


def visionrecipe_loop(data: Path, budget: float, threads: int, extra: list[str]) -> dict:
    """(c): the library's default recipe; the test split is scored after every epoch, off the clock."""
    from visionrecipe.config import Config, apply_overrides
    from visionrecipe.evaluate.scoring import compute_metrics, predict_logits
    from visionrecipe.train.loop import Trainer

    peak = matmul_gflops()
    settings = {"data": str(data), "time_budget": budget, "threads": threads, "progress": False,
                "report": False, "out": f"/tmp/visionrecipe-bench-{time.time_ns()}", "val_fraction": 0.1}
    settings.update(dict(item.split("=", 1) for item in extra))
    trainer = Trainer(apply_overrides(Config(), settings))
    points: list[tuple[float, float]] = []

    def on_epoch(record):
        model = trainer.ema.model if trainer.ema is not None else trainer.model
        logits = predict_logits(model, trainer.data.test.images, trainer.mean, trainer.std,
                                tta=bool(trainer.cfg.optim.tta), device=trainer.device)
        points.append((record["elapsed_s"], compute_metrics(logits, trainer.data.test.labels)["accuracy"]))

    trainer.on_epoch = on_epoch
    run = trainer.fit()
    clock = Clock()
    clock.training, clock.points = trainer.elapsed, points
    seen = trainer.step * trainer.batch_size
    result = summarise("visionrecipe", clock, seen, forward_flops(trainer.model), peak)
    result["final_test_accuracy"] = run.evaluate(dataset=trainer.data, write=False)["accuracy"]
    result["decode_s"] = round(trainer.data.decode_seconds, 1)
    result["settings"] = {k: v for k, v in trainer.cfg.flat().items() if v is not None}
    return result


def summarise(name, clock, seen, flops, peak) -> dict:
    images_per_second = seen / clock.training
    achieved = 3 * flops * images_per_second / 1e9
    return {"contender": name, "test_accuracy": clock.points[-1][1] if clock.points else None,
            "train_seconds": round(clock.training, 1), "images_per_second": round(images_per_second, 1),
            **{f"time_to_{int(100 * t)}": time_to(clock.points, t) for t in THRESHOLDS},
            "train_gflops": round(achieved, 1), "matmul_gflops": round(peak, 1),
            "fraction_of_peak": round(achieved / peak, 3), "curve": [(round(t, 1), a) for t, a in clock.points]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("~/.cache/visionrecipe/cifar10-jpg").expanduser())
    parser.add_argument("--budget", type=float, default=300)
    parser.add_argument("--runs", type=int, default=1, help="repeats; medians are reported")
    parser.add_argument("--contenders", default="seed,torchvision,visionrecipe")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=float, default=30)
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    parser.add_argument("--set", nargs="*", default=[], help="extra visionrecipe settings, key=value")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one contender in this process
    args = parser.parse_args()
    data = args.data.expanduser()
    if args.one:
        if args.one == "visionrecipe":
            result = visionrecipe_loop(data, args.budget, args.threads, args.set)
        else:
            result = dataloader_loop(args.one, data, args.budget, args.eval_every, args.threads)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = []
    for repeat in range(args.runs):
        for name in args.contenders.split(","):
            cmd = [sys.executable, __file__, "--one", name, "--data", str(data), "--budget", str(args.budget),
                   "--threads", str(args.threads), "--eval-every", str(args.eval_every), "--set", *args.set]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(line[7:])
            result["repeat"] = repeat
            results.append(result)
            print(f"{name:<13} run {repeat + 1}: test {100 * result['test_accuracy']:.2f}%  "
                  f"{result['images_per_second']:,.0f} img/s  {result['train_gflops']} GFLOP/s "
                  f"({100 * result['fraction_of_peak']:.0f}% of {result['matmul_gflops']} matmul)  "
                  f"to70 {result['time_to_70']} to80 {result['time_to_80']} to85 {result['time_to_85']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\n| contender | test acc @ {args.budget:.0f}s | img/s | to 70% | to 80% | to 85% | train GFLOP/s | of matmul peak |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.contenders.split(","):
        rows = [r for r in results if r["contender"] == name]

        def med(key):
            values = [r[key] for r in rows if r[key] is not None]
            return statistics.median(values) if len(values) == len(rows) else None

        fmt = lambda v, f="{:.1f}": "—" if v is None else f.format(v)
        print(f"| {name} | {fmt(med('test_accuracy') and 100 * med('test_accuracy'), '{:.2f}%')} | "
              f"{fmt(med('images_per_second'), '{:,.0f}')} | {fmt(med('time_to_70'))} | {fmt(med('time_to_80'))} | "
              f"{fmt(med('time_to_85'))} | {fmt(med('train_gflops'))} | {fmt(med('fraction_of_peak') and 100 * med('fraction_of_peak'), '{:.0f}%')} |")


if __name__ == "__main__":
    main()
