"""The state database's two modes (daemon/store.py `connect`): the daemon's in WAL, an embedded
run's ephemeral one with SQLite's rollback journal and no fsync, which still keeps everything a
SIGKILLed process committed and nothing of the transaction it was in (what the next run of
the slot reads at its reconcile). No root."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from supervisor.daemon.store import connect

# Commits one row, then fills a transaction past the page cache (so its pages reach the file
# before any commit) and is SIGKILLed inside it.
KILLED_MID_TRANSACTION = """
import os, signal, sys
from pathlib import Path
from supervisor.daemon.store import connect
db = connect(Path(sys.argv[1]), ephemeral=True)
db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, data BLOB)")
with db:
    db.execute("INSERT INTO t (data) VALUES (x'01')")
db.execute("PRAGMA cache_size=8")
db.execute("BEGIN")
for _ in range(2000):
    db.execute("INSERT INTO t (data) VALUES (zeroblob(4096))")
os.kill(os.getpid(), signal.SIGKILL)
"""


def _modes(db: sqlite3.Connection) -> tuple[str, int]:
    return (db.execute("PRAGMA journal_mode").fetchone()[0],
            db.execute("PRAGMA synchronous").fetchone()[0])


def test_the_daemons_database_is_wal_and_an_ephemeral_one_has_no_wal_and_no_fsync(
        tmp_path: Path) -> None:
    daemon = connect(tmp_path / "daemon" / "state.db")
    ephemeral = connect(tmp_path / "slot0" / "state.db", ephemeral=True)
    try:
        assert _modes(daemon) == ("wal", 1)  # NORMAL
        assert _modes(ephemeral) == ("delete", 0)  # OFF
    finally:
        daemon.close()
        ephemeral.close()


def test_an_ephemeral_database_keeps_what_a_killed_process_committed_and_no_more(
        tmp_path: Path) -> None:
    path = tmp_path / "state" / "state.db"
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_TRANSACTION, str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert killed.returncode == -9, killed.stderr
    # The transaction had reached the file: its journal is left hot for the next open.
    assert path.with_name("state.db-journal").stat().st_size > 0
    db = connect(path, ephemeral=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT data FROM t").fetchall() == [(b"\x01",)]
    finally:
        db.close()
    assert not path.with_name("state.db-journal").exists()
