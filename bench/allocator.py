"""Training steps with glibc's default allocator against visionrecipe's setting (freed memory kept).

    python bench/allocator.py --sides 32 128 --repeats 3

Each measurement is a fresh process running a fastnet (width 0.5) training-step loop on random images at
one side (batch 512 at 32 px, 64 above), after `set_threads` (which applies the setting); the default is
the same process with MALLOC_TOP_PAD_=131072 in its environment (glibc's own default value), which makes
visionrecipe leave the allocator alone. The two alternate, --repeats times each. Prints the median
images/s, the kernel (sys) CPU seconds of the timed steps and the page faults, per side and setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

LOOP = """
import json, os, resource, sys, time
import torch
from visionrecipe.models import create_model
from visionrecipe.system import set_threads
side, batch, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
set_threads(None, torch.device("cpu"))
torch.manual_seed(0)
model = create_model("fastnet", 10, in_channels=3, image_size=side, width=0.5).to(memory_format=torch.channels_last)
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
x = torch.randn(batch, 3, side, side).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (batch,))
def step():
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
for _ in range(2):
    step()
times, before, faults = [], os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(steps):
    started = time.perf_counter()
    step()
    times.append(time.perf_counter() - started)
after = os.times()
print(json.dumps({"images_per_second": batch / sorted(times)[len(times) // 2], "sys": after.system - before.system,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}))
"""


def measure(side: int, default: bool, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if default:
        env["MALLOC_TOP_PAD_"] = "131072"
    batch = 512 if side <= 32 else 64
    out = subprocess.run([sys.executable, "-c", LOOP, str(side), str(batch), str(steps)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print("| side | setting | median img/s | kernel CPU s (timed steps) | page faults | kept / default |")
    print("|---:|---|---:|---:|---:|---:|")
    for side in args.sides:
        runs = {True: [], False: []}
        for _ in range(args.repeats):
            for default in (True, False):  # alternating: drift on the machine hits both alike
                runs[default].append(measure(side, default, args.steps))
        medians = {d: {k: statistics.median(r[k] for r in runs[d]) for k in runs[d][0]} for d in runs}
        for default in (True, False):
            m = medians[default]
            ratio = "" if default else f"{m['images_per_second'] / medians[True]['images_per_second']:.2f}x"
            print(f"| {side} px | {'glibc default' if default else 'freed memory kept'} | {m['images_per_second']:,.0f} "
                  f"| {m['sys']:.1f} | {m['faults']:,.0f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
