"""The persistent outbox: the webhook_outbox table in the daemon's SQLite file and the audit
subscriber that fills it inside each audit row's own transaction. Needs the database file."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from supervisor.audit import AuditLog
from supervisor.events.endpoints import Endpoint, redact
from supervisor.events.mapping import event_from_audit
from supervisor.events.render import render
from supervisor.models import AuditEntry

log = logging.getLogger(__name__)

DELIVERED_RETENTION = 7 * 86400.0  # delivered rows are pruned after a week



SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    agent TEXT,
    audit_seq INTEGER NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    delivered_at REAL,
    given_up_at REAL,
    last_status INTEGER,
    last_error TEXT,
    UNIQUE (event_id, endpoint)
);
CREATE INDEX IF NOT EXISTS webhook_outbox_pending ON webhook_outbox (endpoint, agent, id)
    WHERE delivered_at IS NULL AND given_up_at IS NULL;
"""

_PENDING = "delivered_at IS NULL AND given_up_at IS NULL"


@dataclass(frozen=True)
class OutboxRow:
    id: int
    event_id: str
    event_type: str
    endpoint: str
    agent: str | None
    payload: bytes
    attempts: int
    next_attempt_at: float


class Outbox:
    """The webhook_outbox table and the audit subscriber that fills it."""

    def __init__(self, db: sqlite3.Connection, endpoints: list[Endpoint],
                 host: str | None = None) -> None:
        self.db = db
        self.endpoints = {e.url: e for e in endpoints}
        self.host = host or socket.gethostname()
        self.wake = asyncio.Event()
        self._audit: AuditLog | None = None
        db.executescript(SCHEMA)
        self._warn_about_orphans()

    def attach(self, audit: AuditLog) -> None:
        # Rows are written by the audit writer's thread, in the audit row's transaction; the
        # worker is woken on the loop once they are committed. Without endpoints there is
        # nothing to record, and the writer makes no entry in the transaction for it (a
        # kill's answer waits for that commit); `configure` follows a reload's endpoints.
        self._audit = audit
        audit.in_transaction(self.record, bool(self.endpoints))
        audit.subscribe(lambda _db, _entry: self.wake.set())

    def configure(self, endpoints: list[Endpoint]) -> None:
        """The endpoints a reload set: every row committed from here on is recorded for
        them, and the outbox subscribes in the transaction again once it has any (a daemon
        started without webhooks recorded no event for an endpoint a reload added)."""
        self.endpoints = {e.url: e for e in endpoints}
        if self._audit is not None:
            self._audit.in_transaction(self.record, bool(self.endpoints))

    def record(self, db: sqlite3.Connection, entry: AuditEntry) -> None:
        """The audit subscriber: runs inside the audit row's transaction, so it only inserts."""
        if not self.endpoints:
            return
        event = event_from_audit(entry, self.host)
        if event is None:
            return
        now = time.time()
        rows = [(event.id, event.type, e.url, event.agent, event.audit_seq,
                 render(event, e.format), now, now)
                for e in self.endpoints.values() if e.wants(event.type)]
        if not rows:
            return
        db.executemany(
            "INSERT INTO webhook_outbox (event_id, event_type, endpoint, agent, audit_seq, "
            "payload, created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        with contextlib.suppress(RuntimeError):  # no loop: the worker's first scan finds it
            # call_soon, not set(): the worker runs only after this transaction has committed.
            asyncio.get_running_loop().call_soon(self.wake.set)

    def _configured(self) -> tuple[str, list[str]]:
        urls = list(self.endpoints)
        return f"endpoint IN ({', '.join('?' for _ in urls)})", urls

    def backlog(self) -> int:
        """Events not yet delivered (and not given up) to the endpoints configured now."""
        if not self.endpoints:
            return 0
        where, urls = self._configured()
        return int(self.db.execute(
            f"SELECT COUNT(*) FROM webhook_outbox WHERE {_PENDING} AND {where}", urls
        ).fetchone()[0])

    def counts(self) -> dict[str, int]:
        """pending / delivered / given_up rows over every endpoint ever configured."""
        pending, delivered, given_up = self.db.execute(
            "SELECT COALESCE(SUM(delivered_at IS NULL AND given_up_at IS NULL), 0), "
            "COALESCE(SUM(delivered_at IS NOT NULL), 0), COALESCE(SUM(given_up_at IS NOT NULL), 0)"
            " FROM webhook_outbox").fetchone()
        return {"pending": int(pending), "delivered": int(delivered), "given_up": int(given_up)}

    def heads(self) -> list[OutboxRow]:
        """The oldest pending row of each (endpoint, agent) queue: the only one that may go."""
        if not self.endpoints:
            return []
        where, urls = self._configured()
        # SQLite returns the row holding MIN(id) for the bare columns of an aggregate query.
        rows = self.db.execute(
            "SELECT MIN(id), event_id, event_type, endpoint, agent, payload, attempts, "
            f"next_attempt_at FROM webhook_outbox WHERE {_PENDING} AND {where} "
            "GROUP BY endpoint, agent", urls).fetchall()
        return [OutboxRow(id=r[0], event_id=r[1], event_type=r[2], endpoint=r[3], agent=r[4],
                          payload=bytes(r[5]), attempts=r[6], next_attempt_at=r[7])
                for r in rows]

    def mark_delivered(self, row_id: int, status: int) -> None:
        with self.db:
            self.db.execute(
                "UPDATE webhook_outbox SET delivered_at = ?, attempts = attempts + 1, "
                "last_status = ?, last_error = NULL WHERE id = ?", (time.time(), status, row_id))

    def mark_failed(self, row_id: int, status: int | None, error: str, retry_at: float) -> None:
        """One more failed attempt; the next one not before `retry_at`."""
        with self.db:
            self._count_failure(row_id, status, error, retry_at, given_up=False)

    def give_up(self, row_id: int, status: int | None, error: str,
                audit_it: Callable[[], object]) -> None:
        """The last failed attempt. `audit_it` appends the audit row that says so; AuditLog's
        transaction commits this update with it, or rolls both back: a row is given up iff the
        audit log says so."""
        self._count_failure(row_id, status, error, time.time(), given_up=True)
        try:
            audit_it()
        except BaseException:
            self.db.rollback()
            raise

    def _count_failure(self, row_id: int, status: int | None, error: str, retry_at: float,
                       given_up: bool) -> None:
        self.db.execute(
            "UPDATE webhook_outbox SET attempts = attempts + 1, last_status = ?, "
            "last_error = ?, next_attempt_at = ?, given_up_at = ? WHERE id = ?",
            (status, error, retry_at, time.time() if given_up else None, row_id))

    def prune(self, older_than: float = DELIVERED_RETENTION) -> int:
        with self.db:
            return self.db.execute(
                "DELETE FROM webhook_outbox WHERE delivered_at IS NOT NULL AND delivered_at < ?",
                (time.time() - older_than,)).rowcount

    def _warn_about_orphans(self) -> None:
        rows = self.db.execute(
            f"SELECT endpoint, COUNT(*) FROM webhook_outbox WHERE {_PENDING} GROUP BY endpoint"
        ).fetchall()
        for url, count in rows:
            if url not in self.endpoints:
                log.warning("%d undelivered webhook events for %s, which is no longer "
                            "configured; they stay in the outbox until it is again",
                            count, redact(url))
