"""Durable state of agents and runs in SQLite (WAL; see `connect`). Root-only file under the
state dir.

A write that fails (a full disk, an I/O error) never raises into the caller, and never leaves
the file with half of a change: every write is kept as the latest record of its key, and all
kept writes go to the file in one transaction, now or at the next write or `flush` (the
daemon retries every few seconds). The first failure releases the state filesystem's reserve
(supervisor/audit/reserve.py) and retries at once; one that still fails raises the alarm
(`alarms.store_error`) until a flush succeeds. The arbiter's memory stays the truth meanwhile,
so a kill on a full disk still ends its run as killed, on disk as soon as there is room."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from supervisor.audit import Alarms
from supervisor.audit.reserve import DiskReserve

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    agent_class TEXT NOT NULL,
    profile TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_reason TEXT,
    last_actor TEXT,
    current_run TEXT,
    last_run TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    state TEXT NOT NULL,
    command TEXT NOT NULL,
    profile TEXT NOT NULL,
    workspace TEXT,
    pid INTEGER,
    container_id TEXT NOT NULL,
    netns TEXT NOT NULL,
    cgroup TEXT NOT NULL,
    bundle TEXT NOT NULL,
    log_path TEXT NOT NULL,
    uid_slot INTEGER NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    exit_code INTEGER,
    time_to_halt_ms REAL,
    end_reason TEXT,
    timeout REAL,
    end_cause TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_agent ON runs (agent, started_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class AgentRecord:
    """An agent's row in the state database."""
    name: str
    agent_class: str
    profile: str
    state: str
    created_at: float
    updated_at: float
    last_reason: str | None = None
    last_actor: str | None = None
    current_run: str | None = None
    last_run: str | None = None


@dataclass
class RunRecord:
    """A run's row in the state database."""
    id: str
    agent: str
    state: str
    command: list[str]
    profile: str
    workspace: str | None
    container_id: str
    netns: str
    cgroup: str
    bundle: str
    log_path: str
    uid_slot: int
    started_at: float
    pid: int | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    time_to_halt_ms: float | None = None
    end_reason: str | None = None
    timeout: float | None = None
    end_cause: str | None = None  # a supervisor.states.EndCause value once the run ended
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def connect(path: Path, *, ephemeral: bool = False) -> sqlite3.Connection:
    """The state database. The daemon's (default): WAL, so a reader (the audit verification's
    connection) never blocks a writer, and a committed write survives a crash of the daemon.

    `ephemeral`: a database that lives for one process and is deleted with its directory (an
    embedded CI run's, under a runtime root that is tmpfs by default). It keeps SQLite's
    rollback journal without fsyncs: a committed write still survives a SIGKILL of the process
    (it is in the page cache; a transaction cut short is rolled back from its journal at the
    next open, by the next run of the slot), which is what the next run's reconcile needs. What
    it gives up: a power cut may leave the file damaged (the runs it records are gone with the
    host's processes then; a damaged file makes the next run of the slot fail, not proceed),
    and a reader blocks writers (the one process has no reader while it writes: its audit is
    verified after the run). Switching a new file to WAL costs an fsync of the journal's
    header, 2-16 ms measured on a loaded host for an embedded run, against ~0.1 ms."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level="DEFERRED")
    if ephemeral:
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("PRAGMA synchronous=OFF")
    else:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    path.chmod(0o600)
    return db


class Store:
    def __init__(self, db: sqlite3.Connection, reserve: DiskReserve | None = None,
                 alarms: Alarms | None = None) -> None:
        self.db = db
        self.reserve = reserve
        self.alarms = alarms or Alarms()
        # (table, key) -> (sql, args, record): the latest write of each record not yet on disk.
        self._pending: dict[tuple[str, str], tuple[str, list[Any], object]] = {}
        self.write_failures = 0
        self._batching = 0
        db.executescript(SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
        if "end_cause" not in columns:  # a state file written before end causes were recorded
            with db:
                db.execute("ALTER TABLE runs ADD COLUMN end_cause TEXT")

    def _write(self, key: tuple[str, str], sql: str, args: list[Any],
               record: object = None, flush: bool = True) -> None:
        self._pending.pop(key, None)  # re-inserted last: kept writes go in the order made
        self._pending[key] = (sql, args, record)
        if flush and not self._batching:
            self.flush()

    def write_in_batch(self, key: tuple[str, str], sql: str, args: list[Any]) -> bool:
        """Another table's write (a run's telemetry summary) into the batch in progress, kept
        and retried like the store's own; False, and nothing done, when no batch is open."""
        if not self._batching:
            return False
        self._write(key, sql, args, flush=False)
        return True

    def kept(self, key: tuple[str, str]) -> list[Any] | None:
        """The arguments of the write of `key` not yet on disk, if one is kept."""
        pending = self._pending.get(key)
        return pending[1] if pending is not None else None

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """The writes made inside go to disk in one transaction at the end (a scoped kill's
        hundred records: one commit, not two hundred); reads see them meanwhile."""
        self._batching += 1
        try:
            yield
        finally:
            self._batching -= 1
            if not self._batching:
                self.flush()

    def flush(self) -> bool:
        """Write every kept change in one transaction; False (alarmed) if it still fails."""
        if not self._pending:
            return True
        for attempt in (1, 2):
            try:
                with self.db:
                    for sql, args, _record in self._pending.values():
                        self.db.execute(sql, args)
            except sqlite3.Error as exc:
                self.write_failures += 1
                if attempt == 1 and self.reserve is not None and self.reserve.release(exc):
                    self.alarms.disk_reserve = f"released at a failed state write: {exc}"
                    continue
                if self.alarms.store_error is None:
                    log.critical("state write failed (%s): %d records kept in memory and "
                                 "retried", exc, len(self._pending))
                self.alarms.store_error = f"{type(exc).__name__}: {exc}"
                return False
            break
        if self.alarms.store_error is not None:
            log.warning("state writes work again; %d kept records written", len(self._pending))
            self.alarms.store_error = None
        self._pending.clear()
        return True

    @property
    def unwritten(self) -> int:
        return len(self._pending)

    def put_agent(self, agent: AgentRecord) -> None:
        self.put_agents([agent])

    def put_agents(self, agents: list[AgentRecord]) -> None:
        """In one transaction: a scoped kill marks every agent at once."""
        names = [f.name for f in fields(AgentRecord)]
        for agent in agents:
            self._write(("agents", agent.name),
                        f"INSERT OR REPLACE INTO agents ({', '.join(names)}) "
                        f"VALUES ({', '.join('?' for _ in names)})",
                        [getattr(agent, name) for name in names], agent, flush=False)
        if not self._batching:
            self.flush()

    def delete_agent(self, name: str) -> None:
        self._write(("agents", name), "DELETE FROM agents WHERE name = ?", [name])

    def agents(self) -> list[AgentRecord]:
        cur = self.db.execute("SELECT * FROM agents ORDER BY name")
        names = [d[0] for d in cur.description]
        return [AgentRecord(**dict(zip(names, r, strict=True))) for r in cur.fetchall()]

    def put_run(self, run: RunRecord) -> None:
        # A shallow row: dataclasses.asdict deep-copies, and a scoped kill writes many runs.
        row = {f.name: getattr(run, f.name) for f in fields(RunRecord) if f.name != "extra"}
        row["command"] = json.dumps(row["command"])
        self._write(("runs", run.id),
                    f"INSERT OR REPLACE INTO runs ({', '.join(row)}) "
                    f"VALUES ({', '.join('?' for _ in row)})", list(row.values()), run)

    def _runs(self, where: str, args: tuple[Any, ...]) -> list[RunRecord]:
        cur = self.db.execute(f"SELECT * FROM runs {where}", args)
        names = [d[0] for d in cur.description]
        runs = []
        for raw in cur.fetchall():
            row = dict(zip(names, raw, strict=True))
            row["command"] = json.loads(row["command"])
            runs.append(RunRecord(**row))
        return runs

    def run(self, run_id: str) -> RunRecord | None:
        kept = self._pending.get(("runs", run_id))
        if kept is not None and isinstance(kept[2], RunRecord):
            return kept[2]  # newer than the file while writes fail
        found = self._runs("WHERE id = ?", (run_id,))
        return found[0] if found else None

    def runs_ended_before(self, cutoff: float) -> list[RunRecord]:
        return self._runs("WHERE ended_at IS NOT NULL AND ended_at < ? ORDER BY ended_at",
                          (cutoff,))

    def unfinished_runs(self) -> list[RunRecord]:
        return self._runs("WHERE ended_at IS NULL ORDER BY started_at", ())

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self._write(("meta", key), "DELETE FROM meta WHERE key = ?", [key])
        else:
            self._write(("meta", key), "INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, value])
