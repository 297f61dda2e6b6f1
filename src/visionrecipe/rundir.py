"""The run directory's format, and every write into it: the one place that knows both.

    run = Run("runs/digits")                   # a run with a trained model; run.meta, run.metrics
    run.evaluate(), run.predict(["a.png"])     # test-split metrics (writes eval.json); top-k classes
    meta = read_model_meta(run.path / MODEL_META)   # model.json, checked: the one reader
    weights, meta_path = model_files("runs/digits")  # or a .safetensors / .json path
    out = prepare_run_dir(cfg)                 # checked, cleared by --overwrite, marked, locked
    append_metrics(out, {"epoch": 1, ...})     # one line of metrics.jsonl, fsync'ed
    read_metrics(out)                          # [{"epoch": 1, ...}, ...]; a torn last line is dropped
    atomic_write_text(out / "eval.json", text) # temporary file, fsync, rename: never half a file
    with locked(out, "evaluate"): ...          # one writer at a time; others get a one-line error
    is_run_dir(path)                           # carries the marker this project writes

Layout: config.yaml, metrics.jsonl, model.safetensors + model.json (the kept epoch),
last.safetensors + last.json (the last epoch), state.pt (resume), eval.json, report.html.
The weights' safetensors I/O is models/checkpoint.py's; the JSON beside them is read here.

A run directory holds only the files in RUN_FILES (and RUN_DIRS), plus files of other
commands that live beside a run (COMPANIONS, e.g. tune's train.log). `--overwrite` deletes
those files, and only in a folder that carries MARKER: a folder holding anything else is
refused, so no file a user owns is ever deleted.

Torch-free on purpose: `predict model.onnx --out FILE` writes through here without torch.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from visionrecipe.errors import VisionRecipeError

MARKER = ".visionrecipe-run"  # written when train creates the folder: "this is ours to replace"
LOCK = ".visionrecipe.lock"  # flock'ed by the one process writing; holds its pid and command
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
MODEL_META = "model.json"  # beside model.safetensors: architecture, classes, normalisation, input size
STATE = "state.pt"  # what an exact resume needs (train/state.py)
MODEL_FORMAT = "visionrecipe"  # the "format" of model.json, last.json and state.pt
MODEL_FORMAT_VERSION = 1
MODEL_KEYS = ("architecture", "classes", "input_size", "mean", "std")  # what every reader of model.json uses
# Every file a run's commands write into it (train, evaluate, report, export, auto's doctor copy).
RUN_FILES = frozenset({
    MARKER, LOCK, CONFIG, METRICS, "model.safetensors", MODEL_META, "last.safetensors", "last.json",
    STATE, "eval.json", "report.html", "curves.png", "confusion.png", "reliability.png", "mistakes.png",
    "doctor.json", "model.onnx", "model.int8.onnx", "model.torchscript.pt", "MODEL_CARD.md",
    "mlflow.json",  # train --mlflow: the MLflow run this run logs to (train/tracking.py)
})
RUN_DIRS = frozenset({"tensorboard"})
COMPANIONS = frozenset({"train.log"})  # tune's log of a trial, open while the trial trains: kept
MIN_FREE = 64 * 2**20
# mkstemp creates files as 0600; run files get the mode an ordinary open() would give them.
_UMASK = os.umask(0)
os.umask(_UMASK)


# --- atomic writes -------------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then `publish` it: a kill at any moment
    leaves the previous file intact, and a full disk is a one-line error naming the file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        publish(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)  # gone already when published


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make a finished temporary file `path`: flushed to disk, renamed over the target, and the
    rename flushed too (it is durable only once the directory entry is)."""
    path = Path(path)
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the file itself is safe


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """One JSON line, fsync'ed. A crash mid-append can tear only this last line (see read_jsonl)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise write_error(Path(path), exc) from None


def write_error(path: Path, exc: OSError) -> VisionRecipeError:
    """A failed write (disk full, `ulimit -f`, read-only) as the one line the CLI prints."""
    return VisionRecipeError(f"could not write {path}: {exc.strerror or exc}")


# --- metrics.jsonl -------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file. A damaged last line (a crash during its append) is
    dropped; a damaged line before it means the file was changed by something else: an error."""
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise VisionRecipeError(f"cannot read {path}: {exc.strerror or exc}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif number == len(lines):
            break  # torn by a crash mid-append: that epoch was never finished
        else:
            raise VisionRecipeError(f"{path}, line {number}: not a JSON record (the file is damaged)")
    return records


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The epochs of a run's metrics.jsonl, in order ([] before the first epoch)."""
    return read_jsonl(Path(run_dir) / METRICS)


def append_metrics(run_dir: str | os.PathLike, record: dict) -> None:
    append_jsonl(Path(run_dir) / METRICS, record)


def truncate_metrics(run_dir: str | os.PathLike, epochs: int) -> None:
    """Keep the first `epochs` records (a resume drops epochs written after its state.pt)."""
    kept = read_metrics(run_dir)[:epochs]
    atomic_write_text(Path(run_dir) / METRICS, "".join(json.dumps(record) + "\n" for record in kept))


# --- the trained model: model.json beside model.safetensors ---------------------------------------
def model_files(path: str | os.PathLike, stem: str = "model") -> tuple[Path, Path]:
    """(weights, model.json) of a run directory (its `stem` model), or of a .safetensors or .json
    path; both must exist."""
    path = Path(path).expanduser()
    if path.is_dir():
        weights, meta = path / f"{stem}.safetensors", path / f"{stem}.json"
    elif path.suffix in (".safetensors", ".json"):
        weights, meta = path.with_suffix(".safetensors"), path.with_suffix(".json")
    else:
        raise VisionRecipeError(f"{path}: expected a run directory or a .safetensors file")
    if not path.exists():
        raise VisionRecipeError(f"model not found: {path}")
    for file in (weights, meta):
        if not file.is_file():
            raise VisionRecipeError(f"{path} is not a visionrecipe model: {file.name} is missing")
    return weights, meta


def has_model(path: str | os.PathLike) -> bool:
    """True for a run directory holding a trained model (training wrote its kept epoch)."""
    return (Path(path).expanduser() / MODEL_META).is_file()


def trained_run(path: str | os.PathLike) -> Path:
    """`path` as a Path, or a one-line error when it holds no trained model."""
    path = Path(path).expanduser()
    if not has_model(path):
        raise VisionRecipeError(f"{path} is not a run directory with a trained model ({MODEL_META} missing)")
    return path


def read_model_meta(path: str | os.PathLike) -> dict:
    """A model's JSON description (model.json, last.json or NAME.json beside NAME.safetensors),
    checked: written by visionrecipe and holding what every reader uses (MODEL_KEYS)."""
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise VisionRecipeError(f"{path} is not a visionrecipe model description: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise VisionRecipeError(f"{path} is not a visionrecipe model description")
    missing = [key for key in MODEL_KEYS if key not in meta]
    if missing:
        raise VisionRecipeError(f"{path} is an incomplete model description (no {', '.join(missing)})")
    return meta


def write_model_meta(path: str | os.PathLike, meta: dict) -> None:
    """The JSON beside a model's weights, tagged with the format (write it after the weights,
    so it only ever names complete ones)."""
    meta = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, **meta}
    atomic_write_text(path, json.dumps(meta, indent=2))


class Run:
    """A run directory with a trained model, and what can be done with it.

        run = Run("runs/digits")
        run.meta, run.metrics   # model.json; the epochs of metrics.jsonl
        run.evaluate()          # test-split metrics; writes eval.json
        run.predict(["a.png"])  # top-k classes per image
    """

    def __init__(self, path: str | os.PathLike):
        self.path = trained_run(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def meta(self) -> dict:
        return read_model_meta(self.path / MODEL_META)

    @property
    def metrics(self) -> list[dict]:
        return read_metrics(self.path)

    # The stages are imported on use: rundir sits below them, and stays torch-free.
    def evaluate(self, split: str = "test", **kwargs) -> dict:
        from visionrecipe.evaluate.scoring import evaluate_run

        return evaluate_run(self.path, split=split, **kwargs)

    def predict(self, images, topk: int = 5, **kwargs) -> list[dict]:
        from visionrecipe.deploy.predict import predict

        return predict(self.path, images, topk=topk, **kwargs)


# --- what a run directory is ---------------------------------------------------------------------
def is_run_dir(path: str | os.PathLike) -> bool:
    """True for a folder `train` created (it carries MARKER)."""
    return (Path(path) / MARKER).is_file()


def is_run_file(entry: Path) -> bool:
    """A file or folder a run writes, or a temporary file a killed write left behind."""
    name = entry.name
    if entry.is_dir() and not entry.is_symlink():
        return name in RUN_DIRS
    return name in RUN_FILES or any(name.startswith(f".{f}.") and name.endswith(".tmp") for f in RUN_FILES)


def _contents(out: Path) -> list[Path]:
    """What a run would find in `out`, leaving out what marks, locks or lives beside a run."""
    return sorted(e for e in out.iterdir() if e.name not in (MARKER, LOCK) and e.name not in COMPANIONS)


def default_run_dir(cfg) -> str:
    """runs/<data>-<model>-<time>: the name of a run without --out (the trainer chooses it once)."""
    name = Path(cfg.data.data.rstrip("/")).name or "data"
    return str(Path("runs") / f"{name}-{cfg.model.model.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}")


def resolve_out(cfg) -> Path:
    """The run directory's path; the default name holds the time, so it is chosen once, here."""
    if not cfg.run.out:
        cfg.run.out = default_run_dir(cfg)
    return Path(cfg.run.out).expanduser()


def check_run_dir(cfg) -> Path:
    """Refuse an output folder a new run may not use, writing nothing: a file, a folder with
    files but no --overwrite, and for --overwrite anything that is not purely a run of ours in
    a place that is safe to clear."""
    out = resolve_out(cfg)
    if out.exists() and not out.is_dir():
        raise VisionRecipeError(f"output path {out} exists and is not a directory")
    if not out.is_dir() or not _contents(out):
        return out
    if not cfg.run.overwrite:
        raise VisionRecipeError(f"run directory {out} already exists; pass --overwrite to replace it "
                                f"or --resume {out} to continue it")
    _refuse_protected(out, cfg.data.data)
    if not is_run_dir(out):
        raise VisionRecipeError(f"--overwrite replaces only run directories made by visionrecipe train, and {out} "
                                f"has no {MARKER} marker; choose another --out")
    unknown = [entry for entry in _contents(out) if not is_run_file(entry)]
    if unknown:
        raise VisionRecipeError(f"--overwrite deletes only a run's own files, and {out} also holds "
                                f"{unknown[0].name}; move it away or choose another --out")
    return out


def _refuse_protected(out: Path, data: str | None) -> None:
    """Folders --overwrite never clears, even when marked: /, the home and current folders,
    and any folder that holds the data being trained on."""
    where = out.resolve()
    for name, place in (("the root folder", Path("/")), ("your home folder", Path.home()),
                        ("the current folder", Path.cwd())):
        if where == place.resolve():
            raise VisionRecipeError(f"--overwrite will not clear {out}: it is {name}; choose another --out")
    data_path = Path(data).expanduser() if data else None
    if data_path is not None and data_path.exists() and data_path.resolve().is_relative_to(where):
        raise VisionRecipeError(f"--overwrite will not clear {out}: it holds the data {data}; choose another --out")


def prepare_run_dir(cfg, resume: bool = False) -> Path:
    """Create (or check) the run directory and lock it for this process (`unlock` when done):
    called once every input is known to be good, so a bad --data deletes nothing. Only rank 0
    checks, clears and locks; under torchrun the others just learn the path."""
    from visionrecipe.system import is_main_process

    out = resolve_out(cfg)
    if not is_main_process():
        return out
    if resume:
        lock(out)
        # A kill during an atomic write leaves its temporary file behind; the target is intact.
        for stale in out.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        return out
    check_run_dir(cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VisionRecipeError(f"output directory {out} is not writable ({exc.strerror or exc})") from None
    lock(out)
    try:
        check_run_dir(cfg)  # again, under the lock: another process may have finished a run here meanwhile
        for entry in _contents(out):  # only run files are left: check_run_dir refused anything else
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        try:
            atomic_write_text(out / MARKER, json.dumps({"format": "visionrecipe-run", "version": 1}) + "\n")
        except VisionRecipeError as exc:
            raise VisionRecipeError(f"output directory {out} is not writable ({exc})") from None
        ensure_room(out, MIN_FREE // 2)
    except BaseException:
        unlock(out)
        raise
    return out


def ensure_room(out: Path, nbytes: int) -> None:
    """Checkpoints need room: the best, the last and the resume state, with a margin."""
    free = shutil.disk_usage(out).free
    if free < max(2 * nbytes, MIN_FREE):
        raise VisionRecipeError(f"only {free / 2**20:.0f} MiB free at {out}: too little room for checkpoints "
                                f"(about {max(2 * nbytes, MIN_FREE) / 2**20:.0f} MiB needed)")


# --- one writer at a time ------------------------------------------------------------------------
_HELD: dict[str, list] = {}  # real path of a run dir -> [lock file descriptor, nesting depth]


def lock(run_dir: str | os.PathLike, command: str | None = None) -> None:
    """Take the run directory's exclusive lock (flock) for this process, or raise a one-line error
    naming the process that holds it. Nested calls in one process (train, then its evaluate
    and report) count up; the lock goes with `unlock`, or with the process."""
    key = os.path.realpath(run_dir)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise VisionRecipeError(f"cannot lock {run_dir}: {path} ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 1000, 0).decode("utf-8", errors="replace").strip() or "another process"
        os.close(fd)
        raise VisionRecipeError(f"run directory {run_dir} is in use by {holder}; wait for it to finish "
                                "or choose another directory") from None
    command = command or " ".join(["visionrecipe", *sys.argv[1:]])
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} ({' '.join(command.split())[:300]})\n".encode(), 0)
    _HELD[key] = [fd, 1]


def unlock(run_dir: str | os.PathLike | None) -> None:
    """Give back one `lock` of this process; the last one releases the directory. No-op if not held."""
    key = os.path.realpath(run_dir) if run_dir is not None else None
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        os.close(held[0])  # closing the descriptor releases the flock


@contextmanager
def locked(run_dir: str | os.PathLike, command: str | None = None):
    """`with locked(run, "visionrecipe evaluate"):` — the lock for the block."""
    lock(run_dir, command)
    try:
        yield Path(run_dir)
    finally:
        unlock(run_dir)
