"""Training in several processes: the `--nproc` launcher (evaluation shared between them: evaluate/sharded.py).

    visionrecipe train --data cifar10 --nproc 2                # 2 processes on this machine
    torchrun --standalone --nproc_per_node 2 -m visionrecipe train --data cifar10   # the same
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint host0:29400 -m visionrecipe train ...  # two machines (run on each)

Each process trains a DistributedDataParallel copy (gloo on CPU, NCCL on GPU) on its slice of
every global batch; `--batch-size` is the global batch, so N processes take the same steps with
the same learning rate as one (trainer.py). Only rank 0 writes files and prints.

`launch` runs torchrun with `-m visionrecipe` and STATUS_ENV set, so each worker (see
__main__.py and `worker_main`) records its exit status in a folder torchrun knows nothing about,
so `--nproc` exits with the workers' status (2 for a user error, 1 for a NaN stop, 130/143
when interrupted) instead of torchrun's generic 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from visionrecipe.errors import VisionRecipeError
from visionrecipe.system import physical_cores

STATUS_ENV = "VISIONRECIPE_STATUS_DIR"
# `python -m torch.distributed.run`, except that a failed worker is an exit status, not a page of
# traceback around the worker's own one-line error.
TORCHRUN = """import signal, sys
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
try:
    main()
except ChildFailedError:
    sys.exit(1)
except SignalException as exc:
    sys.exit(128 + int(exc.sigval))
"""


def launch(nproc: int, argv: list[str], read_config: Callable[[list[str]], tuple]) -> int:
    """Run `visionrecipe <argv>` (a train command) in `nproc` processes under torchrun on this
    machine; returns the workers' exit status. `read_config(argv)` is the command line's own
    reading of argv, (config, resuming): passed in, so the launcher never imports the CLI."""
    if nproc < 1:
        raise VisionRecipeError(f"--nproc {nproc}: expected at least 1 process")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise VisionRecipeError("--nproc inside torchrun: give the number of processes to torchrun only")
    argv = check_before_launch(without_nproc(argv), nproc, read_config)
    with tempfile.TemporaryDirectory(prefix="visionrecipe-status-") as status_dir:
        env = {**os.environ, STATUS_ENV: status_dir}
        # torchrun would otherwise set 1 with a warning; set_threads makes the same split.
        env.setdefault("OMP_NUM_THREADS", str(max(1, physical_cores() // nproc)))
        command = [sys.executable, "-c", TORCHRUN, "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "visionrecipe", *argv]
        code = run_forwarding_signals(command, env)
        return workers_status(Path(status_dir), code)


def without_nproc(argv: list[str]) -> list[str]:
    """argv without `--nproc N` / `--nproc=N` (or an abbreviation argparse would accept)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        flag = token.split("=", 1)[0]
        if len(flag) >= 4 and "--nproc".startswith(flag):
            skip = "=" not in token
            continue
        out.append(token)
    return out


def check_before_launch(argv: list[str], nproc: int, read_config: Callable[[list[str]], tuple]) -> list[str]:
    """The checks a worker would fail on, done once here so the error is one line (torchrun
    would wrap it in a page of its own); returns argv with the run directory spelled out, so
    every process uses the same one (the default name holds the time)."""
    from visionrecipe.recipes import resolve_recipe
    from visionrecipe.models import get_spec
    from visionrecipe.rundir import check_run_dir

    cfg, resuming = read_config(argv)
    cfg = resolve_recipe(cfg)
    get_spec(cfg.model.model)
    if cfg.optim.batch_size % nproc:
        raise VisionRecipeError(f"--batch-size {cfg.optim.batch_size} is the global batch and must be a "
                                f"multiple of --nproc {nproc}")
    if resuming:
        return argv  # the workers read state.pt first thing, before any data
    out = check_run_dir(cfg)  # refusals only: rank 0 creates (or clears) it once the data is read
    return [*argv, "--out", str(out)]


def run_forwarding_signals(command: list[str], env: dict) -> int:
    """Run torchrun in its own session and hand it SIGINT/SIGTERM exactly once: torchrun passes
    them to the workers, which finish the step, save and exit 130/143."""
    proc = subprocess.Popen(command, env=env, start_new_session=True)

    def forward(signum, frame):
        proc.send_signal(signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code  # killed by a signal: the shell's convention


def workers_status(status_dir: Path, torchrun_code: int) -> int:
    """Rank 0's failing status, else any worker's, else torchrun's (a crash that recorded nothing)."""
    codes = {}
    for file in status_dir.glob("rank-*"):
        try:
            codes[int(file.name[5:])] = int(file.read_text())
        except ValueError:
            continue
    failed = [codes[rank] for rank in sorted(codes) if codes[rank]]
    return failed[0] if failed else torchrun_code


def record_status(code: int) -> None:
    folder = os.environ.get(STATUS_ENV)
    if folder:
        Path(folder, f"rank-{os.environ.get('RANK', '0')}").write_text(str(code))


def worker_main(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """One torchrun worker: the command line's `main(argv)`, its exit status recorded (__main__.py)."""
    code = 1  # an exception escaping main is a crash
    try:
        code = main(argv)
    except SystemExit as exc:  # --help
        code = exc.code if isinstance(exc.code, int) else 0
        raise
    finally:
        record_status(code)
    return code
