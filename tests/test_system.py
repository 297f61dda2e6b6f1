"""The process set-up a CPU run gets (system.py)."""

import os
import subprocess
import sys

import pytest

# Page faults of five training steps of a small conv net (batch 128, 32 px, 33 MB a feature map): with
# glibc's defaults every large block is mapped fresh from the kernel and faulted in page by page.
FAULTS = """
import resource, torch
from visionrecipe.system import set_threads
set_threads(1, torch.device("cpu"))
net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3, padding=1),
                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10))
x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
def step():
    net.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(x), y).backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(env: dict) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_cpu_runs_reuse_freed_memory_instead_of_faulting_it_in_again():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    tuned = page_faults(env)  # freed blocks are reused by the next step (measured: 8,192 faults)
    # A user's own MALLOC_* setting is left alone: glibc's default maps each block again (574,250)
    default = page_faults({**env, "MALLOC_TOP_PAD_": "131072"})
    assert default > 10 * tuned, (tuned, default)
