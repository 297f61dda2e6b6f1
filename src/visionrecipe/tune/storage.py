"""Where a study lives, and how a trial whose worker died is found and failed.

    storage = open_storage("sqlite:///runs/tune1/study.db")   # or postgresql://..., or x.journal
    fail_dead_trials(study)                                     # before counting the study's trials

- SQLite (tune's default, `out/study.db`) and server URLs go through Optuna's RDBStorage, with
  heartbeats: a trial silent for GRACE_S on any machine is failed by the next worker that looks.
  On PostgreSQL (driver: psycopg 3, the `postgres` extra) the tables are created under an
  advisory lock, so workers started together on a fresh database do not collide.
  SQLite serialises writers with file locks; Optuna writes a few rows per epoch, so with a 60 s
  busy timeout (Python's default is 5 s) a few local workers wait their turn instead of failing.
- A path (FILE.journal) uses Optuna's JournalFileBackend: append-only and lock-safe for many local
  processes, but without heartbeats.
- On every storage, a RUNNING trial records its worker (host, pid, process start time); a trial
  whose process is gone from this machine is failed at once, with no grace period to wait out.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from pathlib import Path

from visionrecipe.errors import VisionRecipeError

HEARTBEAT_S = 10  # a worker writes its heartbeat this often...
GRACE_S = 40  # ...and a trial silent this long on any machine is failed
SCHEMA_LOCK_KEY = 0x76697372  # PostgreSQL advisory lock id while Optuna creates its tables ("visr")


def optuna_module():
    try:
        import optuna
    except ImportError:
        raise VisionRecipeError("tune needs Optuna: pip install 'visionrecipe[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # tune prints its own line per trial
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def open_storage(spec: str):
    optuna = optuna_module()
    if "://" not in spec:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(Path(spec).expanduser())))
    url = database_url(spec)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        with schema_lock(url):
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S)
    except ImportError:
        raise VisionRecipeError(f"storage {spec.split('://')[0]}: its database driver is not installed "
                                f"({driver_hint(url)})") from None
    except Exception as exc:  # SQLAlchemy's errors: bad URL, server down, no permission
        raise VisionRecipeError(f"cannot open storage {spec}: {str(exc).splitlines()[0]}") from None


def database_url(spec: str) -> str:
    """The URL handed to SQLAlchemy: a plain `postgresql://` names its driver, psycopg 3 (the
    `postgres` extra), so the driver does not depend on SQLAlchemy's default of the day (psycopg2
    up to 2.0, psycopg 3 from 2.1). An explicit `postgresql+driver://` is left as written.

        database_url("postgresql://u@host/db")  # 'postgresql+psycopg://u@host/db'
    """
    return "postgresql+psycopg://" + spec[len("postgresql://"):] if spec.startswith("postgresql://") else spec


def driver_hint(url: str) -> str:
    if url.startswith("postgresql+psycopg://"):
        return "for PostgreSQL: pip install 'visionrecipe[postgres]'"
    return "install the driver that SQLAlchemy names for this URL"


@contextlib.contextmanager
def schema_lock(url: str):
    """PostgreSQL: one process at a time creates (or checks) Optuna's tables, under an advisory
    lock. Two workers started together on a fresh database otherwise both run CREATE TABLE and one
    fails with UniqueViolation on pg_type. Other databases: nothing to hold."""
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:  # the lock ends with this connection's session
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            yield
    finally:
        engine.dispose()


def worker_identity() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start(os.getpid())}


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux): tells a reused pid from the original."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def is_alive(identity: dict) -> bool:
    try:
        os.kill(identity["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return identity.get("started") is None or process_start(identity["pid"]) in (None, identity["started"])


def fail_dead_trials(study) -> None:
    """Mark FAIL the RUNNING trials whose worker died: at once for a process on this machine; by the
    heartbeat (RDB storages) for other machines. Live workers' trials are left alone."""
    optuna = optuna_module()
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker is None:
            # Asked but killed before it said who runs it; give a live one time to say so.
            age = time.time() - trial.datetime_start.timestamp() if trial.datetime_start else 0
            dead = age > 2 * GRACE_S
        else:
            dead = worker["host"] == host and not is_alive(worker)
        if dead:
            with contextlib.suppress(Exception):  # another process failed it first
                study.tell(trial.number, state=TrialState.FAIL)
                print(f"trial {trial.number}: its worker is gone; marked failed", flush=True)
