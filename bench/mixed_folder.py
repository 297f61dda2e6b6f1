"""A mixed-size photo folder made from a square one: every image randomly cropped to a 4:3 or 3:4 box (both
orientations) and rescaled so its shorter side is 100-600 px, with the train/ and val/ layout kept.

    python bench/mixed_folder.py ~/.cache/visionrecipe/imagenette ~/.cache/visionrecipe/imagenette-mixed
    visionrecipe train --data ~/.cache/visionrecipe/imagenette-mixed --time-budget 300    # no size flags
    python bench/mixed_folder.py ~/.cache/visionrecipe/imagenette ~/.cache/visionrecipe/imagenette-mixed-square \
        --square-crops 224        # the square version: the same crops, each cut to its centre square
    visionrecipe train --data ~/.cache/visionrecipe/imagenette-mixed-square --time-budget 300
    python bench/mixed_folder.py ~/.cache/visionrecipe/imagenette ~/.cache/visionrecipe/photos128 \
        --square 128 --classes 5 --per-class 860      # 4,300 photos of 128 px in 5 classes, one flat folder

The crop keeps 70-100% of the shorter side, so the object stays in view as a photographer's framing would.
Deterministic (seeded by the file's index); files are written with the process pool of the machine.
"""

from __future__ import annotations

import argparse
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image


def convert(job: tuple[int, str, str, int | None, int | None]) -> tuple[int, int]:
    index, source, target, square, square_crops = job
    rng = random.Random(index)
    with Image.open(source) as img:
        img = img.convert("RGB")
        if square:  # the "folder of 128-px photos": resized whole
            out = img.resize((square, square), Image.BICUBIC)
            out.save(target, quality=90)
            return out.size
        w, h = img.size
        side = min(w, h) * rng.uniform(0.7, 1.0)
        long, short = side, side * 3 / 4
        bw, bh = (long, short) if rng.random() < 0.5 else (short, long)  # landscape or portrait
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        crop = img.crop((round(x0), round(y0), round(x0 + bw), round(y0 + bh)))
        if square_crops:  # the same crop (the same draws), its centre square at one side
            cw, ch = crop.size
            s = min(cw, ch)
            box = ((cw - s) // 2, (ch - s) // 2, (cw - s) // 2 + s, (ch - s) // 2 + s)
            out = crop.crop(box).resize((square_crops, square_crops), Image.BICUBIC)
            out.save(target, quality=90)
            return out.size
        scale = rng.uniform(100, 600) / min(crop.size)
        out = crop.resize((max(1, round(crop.size[0] * scale)), max(1, round(crop.size[1] * scale))),
                          Image.BICUBIC)
        out.save(target, quality=90)
        return out.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--square", type=int, help="instead: every image resized to this square side, in one flat "
                                                    "folder of class subfolders (train/ and val/ pooled)")
    parser.add_argument("--square-crops", type=int, help="the mixed folder's square version: the same crops, each "
                                                          "cut to its centre square and resized to this side")
    parser.add_argument("--classes", type=int, help="with --square: only the first N classes")
    parser.add_argument("--per-class", type=int, help="with --square: at most this many images a class")
    args = parser.parse_args()
    source, target = args.source.expanduser(), args.target.expanduser()
    jobs, taken = [], {}
    classes = sorted({p.parent.name for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")})
    classes = classes[:args.classes] if args.square else None
    for path in sorted(source.rglob("*")):
        if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            relative = path.relative_to(source)
            if args.square:  # flat: <class>/<part>-<name>
                name = path.parent.name
                if name not in classes or taken.get(name, 0) >= (args.per_class or 10**9):
                    continue
                taken[name] = taken.get(name, 0) + 1
                relative = Path(name) / f"{relative.parts[0]}-{path.name}"
            out = target / relative.with_suffix(".jpg")
            out.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((len(jobs), str(path), str(out), args.square, args.square_crops))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        sizes = list(pool.map(convert, jobs, chunksize=64))
    shorter = sorted(min(s) for s in sizes)
    portrait = sum(h > w for w, h in sizes)
    print(f"{len(sizes)} images written to {target}: shorter side {shorter[0]}-{shorter[-1]} px "
          f"(median {shorter[len(shorter) // 2]}), {portrait} portrait, {len(sizes) - portrait} landscape")


if __name__ == "__main__":
    main()
