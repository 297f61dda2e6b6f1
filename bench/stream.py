"""The streamed path against the resident one: decode a synthetic JPEG folder, then train on it both ways.

    python bench/stream.py --images 3000 --size 64 --epochs 1                  # small: under 2 minutes on 2 cores
    python bench/stream.py --images 400000 --size 160 --work /big/disk --epochs 1 --skip-memory   # larger than RAM
    python bench/stream.py --images 80000 --size 160 --time-budget 120 --memory-limit 3   # larger than a 3 GiB cgroup

1. A folder of N JPEGs at S px in 10 classes (smooth random colour fields, so a decode costs what a
   photo's does), written once into --work and reused.
2. The decode into the record cache, in a child process: images/s and the cache's size on disk.
3. One epoch of reads alone (no training), each in a child process: train/feed.py's StreamFeed
   (positional reads) against gathering the same batches from the map: images/s and peak RSS.
4. `visionrecipe train` with --cache memory, then --cache disk, each in its own process, the same
   model and seed: training images/s (metrics.jsonl's last epoch), the streamed/resident ratio, and
   each process's peak RSS (os.wait4's ru_maxrss: the most resident memory it ever had).

Results are printed as a table and written to --work/stream.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10


def _write_chunk(job: tuple[str, int, int, int, int]) -> None:
    root, first, stop, size, seed = job
    rng = np.random.default_rng([seed, first])
    for i in range(first, stop):
        cls = i % CLASSES
        # A coarse random field upsampled: smooth like a photo, so JPEG's cost is realistic.
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        coarse[..., cls % 3] //= 2  # a class-dependent tint: there is something to learn
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        image.save(Path(root) / f"c{cls}" / f"{i:07d}.jpg", quality=90)


def make_folder(root: Path, images: int, size: int, seed: int = 0) -> None:
    """N JPEGs of size×size in CLASSES class folders, written by all cores; kept when it already holds them."""
    from concurrent.futures import ProcessPoolExecutor

    marker = root / f".complete-{images}-{size}"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    for cls in range(CLASSES):
        (root / f"c{cls}").mkdir(parents=True, exist_ok=True)
    chunk = 2000
    jobs = [(str(root), first, min(images, first + chunk), size, seed) for first in range(0, images, chunk)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_chunk, jobs))
    marker.touch()


def memory_cgroup(limit_bytes: int) -> Path:
    """A memory cgroup (v1 or v2, needs root) capping RAM, page cache included, at `limit_bytes`: a
    machine with that much memory, for data larger than it."""
    v1 = Path("/sys/fs/cgroup/memory")
    folder = (v1 if v1.is_dir() else Path("/sys/fs/cgroup")) / f"visionrecipe-bench-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    (folder / ("memory.limit_in_bytes" if v1.is_dir() else "memory.max")).write_text(str(limit_bytes))
    return folder


def child(code: str, *args: str, cgroup: Path | None = None) -> tuple[str, int]:
    """(stdout, peak RSS in bytes) of a Python child process (inside `cgroup` when given)."""
    enter = (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))) if cgroup else None
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=enter)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"child failed ({proc.returncode}): {code[:60]}...")
    return out, usage.ru_maxrss * 1024  # Linux reports kilobytes


DECODE = """
import json, sys, time
from visionrecipe.data import load_dataset
started = time.perf_counter()
data = load_dataset(sys.argv[1], data_dir=sys.argv[2], cache="disk", progress=False)
print(json.dumps({"seconds": time.perf_counter() - started, "decode_seconds": data.decode_seconds,
                  "images": len(data.train) + len(data.test) + (len(data.val) if data.val else 0)}))
"""

READ = """
import json, sys, time
import numpy as np, torch
from visionrecipe.data import load_dataset
from visionrecipe.data.cache import MappedImages
from visionrecipe.train.feed import StreamFeed
images = load_dataset(sys.argv[1], data_dir=sys.argv[2], cache="disk", progress=False, val_fraction=0).train.images
order, batch = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)), 256
started = time.perf_counter()
if sys.argv[3] == "feed":  # the streamed path's reader: positional reads, ahead of the consumer
    feed = StreamFeed(images, order, batch, start=0, rank=0, size=1, device=torch.device("cpu"))
    for position in range(len(order) // batch):
        feed.take(order[position * batch:(position + 1) * batch])
else:  # gathering from the map, as --cache memory does on a CPU when the records are one run
    mapped = np.memmap(images.path, dtype=np.uint8, mode="r", shape=(int(images.rows.max()) + 1, *images.record_shape))
    for position in range(len(order) // batch):
        torch.from_numpy(mapped[np.sort(images.rows[order[position * batch:(position + 1) * batch].numpy()])])
print(json.dumps({"images_per_second": (len(order) // batch) * batch / (time.perf_counter() - started)}))
"""

TRAIN = """
import sys
from visionrecipe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def add_files(root: Path, count: int, size: int, seed: int = 1) -> None:
    """`count` new JPEGs beside the folder's (names after the existing ones), as a user adds photos."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        cls = i % CLASSES
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        image.save(root / f"c{cls}" / f"new-{seed}-{i:07d}.jpg", quality=90)


def train(folder: Path, work: Path, cache: str, args, cgroup: Path | None = None, nproc: int = 1) -> dict:
    out = work / (f"run-{cache}" + ("" if nproc == 1 else f"-nproc{nproc}"))
    flags = ["train", "--data", str(folder), "--data-dir", str(work / "cache"), "--cache", cache, "--out", str(out),
             "--overwrite", "--epochs", str(args.epochs), "--seed", "0", "--no-progress", "--no-report"]
    if args.time_budget:
        flags += ["--time-budget", str(args.time_budget)]
    if nproc > 1:
        flags += ["--nproc", str(nproc)]
    flags += args.train_flags
    if args.model:
        flags += ["--model", args.model]
    if args.batch_size:
        flags += ["--batch-size", str(args.batch_size)]
    started = time.perf_counter()
    log, rss = child(TRAIN, *flags, cgroup=cgroup)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next((line for line in log.splitlines() if line.startswith("training ")), "")
    return {"images_per_second": rows[-1]["img_per_s"], "peak_rss_bytes": rss, "val_acc": rows[-1]["val_acc"],
            "wall_seconds": time.perf_counter() - started, "cache_line": first[first.find(", cache ") + 2:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--model", default=None, help="default: the fast recipe's pick for the size")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/visionrecipe-stream-bench"))
    parser.add_argument("--skip-memory", action="store_true", help="data larger than RAM: only the streamed path")
    parser.add_argument("--read-only", action="store_true", help="only the decode and the epoch of reads")
    parser.add_argument("--time-budget", type=float, default=None, help="train this many seconds (epochs: a bound)")
    parser.add_argument("--memory-limit", type=float, default=None,
                        help="GiB: the streamed reads and training run in a memory cgroup this size (root), data "
                             "larger than it; --cache auto there, which must choose disk")
    parser.add_argument("--update-share", type=float, default=0.0,
                        help="after the decode, add this share of new files and time the cache's update")
    parser.add_argument("--nproc", type=int, default=1, help="also train --cache disk with this many processes")
    parser.add_argument("--train-flags", nargs=argparse.REMAINDER, default=[],
                        help="the rest of the line goes to `visionrecipe train` (e.g. --image-size 160 --width 0.25)")
    args = parser.parse_args()
    cgroup = memory_cgroup(int(args.memory_limit * 2**30)) if args.memory_limit else None
    folder = args.work / f"jpeg-{args.images}-{args.size}"

    started = time.perf_counter()
    make_folder(folder, args.images, args.size)
    print(f"folder: {args.images:,} JPEGs at {args.size} px in {time.perf_counter() - started:.1f}s", flush=True)
    shutil.rmtree(args.work / "cache", ignore_errors=True)  # a fresh decode
    out, decode_rss = child(DECODE, str(folder), str(args.work / "cache"))
    decoded = json.loads(out)
    cache_bytes = sum(f.stat().st_size for f in (args.work / "cache").rglob("*") if f.is_file())
    result = {"images": args.images, "size": args.size, "decode_images_per_second":
              decoded["images"] / max(decoded["decode_seconds"], 1e-9), "decode_seconds": decoded["decode_seconds"],
              "decode_peak_rss_bytes": decode_rss, "cache_bytes": cache_bytes}
    if args.update_share:  # a user adds a few photos: only those are decoded
        add_files(folder, max(1, round(args.update_share * args.images)), args.size, seed=int(time.time()))
        out, _ = child(DECODE, str(folder), str(args.work / "cache"))
        result["update"] = {"files": max(1, round(args.update_share * args.images)), **json.loads(out)}
    for how in ("feed", "map"):  # one epoch of reads alone, no training: the reader's speed and RSS
        out, rss = child(READ, str(folder), str(args.work / "cache"), how, cgroup=cgroup)
        result[f"read_{how}"] = {**json.loads(out), "peak_rss_bytes": rss}
    if args.read_only:
        args.skip_memory = True
    for cache in () if args.read_only else (("disk",) if args.skip_memory else ("memory", "disk")):
        # under --memory-limit the streamed run is left to --cache auto inside the cgroup: it must choose disk
        limited = cgroup is not None and cache == "disk"
        result[cache] = train(folder, args.work, "auto" if limited else cache, args, cgroup if limited else None)
    if cgroup is not None:
        peak = cgroup / ("memory.max_usage_in_bytes" if (cgroup / "memory.max_usage_in_bytes").exists() else "memory.peak")
        result["cgroup_limit_bytes"] = int(args.memory_limit * 2**30)
        result["cgroup_peak_bytes"] = int(peak.read_text()) if peak.exists() else None
    if not args.skip_memory:
        result["disk_over_memory"] = result["disk"]["images_per_second"] / result["memory"]["images_per_second"]
    if args.nproc > 1 and not args.read_only:  # torchrun: each process reads its share of every batch
        result[f"disk_nproc{args.nproc}"] = train(folder, args.work, "disk", args, nproc=args.nproc)

    mb = 1 / 2**20
    print(f"decode: {result['decode_images_per_second']:,.0f} images/s ({result['decode_seconds']:.1f}s), peak RSS "
          f"{decode_rss * mb:,.0f} MiB; cache {cache_bytes * mb:,.1f} MiB")
    if "update" in result:
        u = result["update"]
        print(f"update: {u['files']:,} new files ({100 * args.update_share:g}%) in {u['decode_seconds']:.1f}s of "
              f"decoding, {u['seconds']:.1f}s in all ({100 * u['seconds'] / max(decoded['seconds'], 1e-9):.1f}% of "
              f"the full decode's {decoded['seconds']:.1f}s)")
    for how, what in (("feed", "StreamFeed (preadv)"), ("map", "gather from the map")):
        r = result[f"read_{how}"]
        print(f"read one epoch, {what}: {r['images_per_second']:,.0f} images/s, peak RSS "
              f"{r['peak_rss_bytes'] * mb:,.0f} MiB")
    for cache in ("memory", "disk", f"disk_nproc{args.nproc}"):
        if cache in result:
            r = result[cache]
            print(f"train --cache {cache:6s}: {r['images_per_second']:,.0f} images/s, peak RSS "
                  f"{r['peak_rss_bytes'] * mb:,.0f} MiB, val_acc {r['val_acc']:.3f}, {r['wall_seconds']:.1f}s wall; "
                  f"{r['cache_line']}")
    if cgroup is not None:
        print(f"memory cgroup: limit {result['cgroup_limit_bytes'] * mb:,.0f} MiB, peak use (page cache included) "
              f"{(result['cgroup_peak_bytes'] or 0) * mb:,.0f} MiB; data {cache_bytes * mb:,.0f} MiB")
    if "disk_over_memory" in result:
        print(f"streamed / resident images/s: {result['disk_over_memory']:.2f}")
    (args.work / "stream.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
