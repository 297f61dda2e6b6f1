"""Distributed tune on a real PostgreSQL server that these tests start and stop themselves.

The server is a throwaway cluster (initdb + pg_ctl from Debian's `postgresql` package, which
`make postgres` installs) in a temporary folder, on a free port, with trust authentication on
127.0.0.1 only. The tests skip, saying why, where the server binaries or the driver are missing.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

SPACE = {"include_defaults": False, "model": "seedcnn", "epochs": 1,
         "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}


def server_binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = found[-1] if found else shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def as_server_user() -> list[str]:
    """initdb and postgres refuse to run as root: run them as the package's `postgres` user."""
    if os.geteuid() != 0:
        return []
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run the server as")
    return ["runuser", "-u", "postgres", "--"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A running server; call it for the URL of a new, empty database."""
    psycopg = pytest.importorskip("psycopg", reason="no PostgreSQL driver: pip install 'visionrecipe[postgres]'")
    bin_dir = server_binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found (Debian: apt-get install postgresql, or `make postgres`)")
    prefix = as_server_user()
    home = Path(tempfile.mkdtemp(prefix="visionrecipe-pg-"))  # not pytest's tmp: the server user must enter it
    if prefix:
        shutil.chown(home, "postgres")
    port = free_port()
    subprocess.run([*prefix, bin_dir / "initdb", "-D", home / "data", "-A", "trust", "-U", "postgres",
                    "--no-sync", "-E", "UTF8"], check=True, capture_output=True)
    options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    subprocess.run([*prefix, bin_dir / "pg_ctl", "-D", home / "data", "-o", options, "-l", home / "server.log",
                    "-w", "start"], check=True, capture_output=True)
    names = (f"db{i}" for i in itertools.count())

    def new_database() -> str:
        name = next(names)
        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as con:
            con.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{port}/{name}"

    try:
        yield new_database
    finally:
        subprocess.run([*prefix, bin_dir / "pg_ctl", "-D", home / "data", "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def tune_process(url: str, out: Path, space: Path, trials: int) -> subprocess.Popen:
    args = ["tune", "--data", "digits", "--space", space, "--trials", trials, "--storage", url, "--study", "s1",
            "--out", out]
    return subprocess.Popen([sys.executable, "-m", "visionrecipe", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def running_trials(url: str) -> dict[int, int]:
    """trial number -> worker pid, for the RUNNING trials whose worker has said who it is."""
    import psycopg

    with contextlib.suppress(psycopg.errors.UndefinedTable), psycopg.connect(url) as con:
        rows = con.execute("SELECT t.number, a.value_json FROM trials t JOIN trial_user_attributes a "
                           "ON a.trial_id = t.trial_id AND a.key = 'worker' WHERE t.state = 'RUNNING'").fetchall()
        return {number: json.loads(value)["pid"] for number, value in rows}
    return {}


def test_two_workers_one_study_and_a_killed_workers_trial_fails(postgres, tmp_path):
    url = postgres()
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    # Started together on a fresh database: both create Optuna's tables at once.
    doomed = tune_process(url, tmp_path / "a", space, trials=4)
    survivor = tune_process(url, tmp_path / "b", space, trials=4)
    try:
        deadline, killed = time.time() + 300, None
        while killed is None and time.time() < deadline:
            assert doomed.poll() is None, f"worker a stopped before it could be killed: {doomed.communicate()[1]}"
            killed = next((n for n, pid in running_trials(url).items() if pid == doomed.pid), None)
            time.sleep(0.05)
        assert killed is not None, "worker a never ran a trial"
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        stdout, stderr = survivor.communicate(timeout=600)
    finally:
        for proc in (doomed, survivor):
            proc.kill()
            proc.wait()
    assert survivor.returncode == 0, stderr
    assert f"trial {killed}: its worker is gone; marked failed" in stdout

    trials = optuna.load_study(study_name="s1", storage=url.replace("postgresql://", "postgresql+psycopg://")).trials
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 4
    assert trials[killed].state.name == "FAIL" and not trials[killed].user_attrs.get("surplus")
    assert "RUNNING" not in {t.state.name for t in trials}


OPEN_AT = """
import sys, time
import optuna, psycopg, sqlalchemy  # imported before the start: only the table creation races
from visionrecipe.tune.storage import open_storage
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all start creating the tables at one instant
open_storage(sys.argv[1])
"""


def test_workers_started_together_on_a_fresh_database_all_open_it(postgres):
    """Without a lock, one of the creators fails with UniqueViolation on pg_type (issue 14, item 16)."""
    for _ in range(3):
        url = postgres()
        start = time.time() + 4  # past the imports of every process
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, url, str(start)], stderr=subprocess.PIPE,
                                  text=True) for _ in range(4)]
        errors = [proc.communicate(timeout=120)[1] for proc in procs]
        assert [proc.returncode for proc in procs] == [0] * 4, "\n".join(errors)


def test_a_missing_driver_names_the_extra(monkeypatch):
    from visionrecipe.errors import VisionRecipeError
    from visionrecipe.tune.storage import open_storage

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if it were not installed
    with pytest.raises(VisionRecipeError, match=r"pip install 'visionrecipe\[postgres\]'"):
        open_storage("postgresql://postgres@127.0.0.1:1/none")
