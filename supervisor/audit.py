"""The append-only, hash-chained audit log in the daemon's SQLite file. No privilege beyond
the database file.

Each row's hash is SHA-256 over the previous row's hash and the row's own canonical JSON, so
editing, deleting or reordering any row breaks the chain from that row on. Triggers refuse
UPDATE and DELETE as a second line; `verify` is the proof."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from supervisor.models import AuditEntry, AuditVerifyResult

GENESIS = "0" * 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    verb TEXT NOT NULL,
    scope TEXT NOT NULL,
    target TEXT,
    reason TEXT NOT NULL,
    previous_state TEXT,
    new_state TEXT,
    time_to_halt_ms REAL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

_COLUMNS = ("seq", "ts", "actor", "verb", "scope", "target", "reason", "previous_state",
            "new_state", "time_to_halt_ms", "outcome", "detail", "prev_hash", "hash")


def _row_hash(prev_hash: str, fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


def _hashed_fields(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in _COLUMNS if k not in ("hash",)}


# Called inside the audit row's transaction, so what a subscriber writes to the same database
# (the webhook outbox) commits or rolls back together with the row: no event without its
# audit entry, no audit entry without its event.
Subscriber = Callable[[sqlite3.Connection, AuditEntry], None]


class AuditLog:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.subscribers: list[Subscriber] = []
        db.executescript(SCHEMA)

    def subscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.append(subscriber)

    def append(
        self, *, actor: str, verb: str, scope: str, reason: str = "", target: str | None = None,
        previous_state: str | None = None, new_state: str | None = None,
        time_to_halt_ms: float | None = None, outcome: str = "ok",
        detail: dict[str, Any] | None = None,
    ) -> AuditEntry:
        with self.db:
            last = self.db.execute(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev_hash = (last[0] + 1, last[1]) if last else (1, GENESIS)
            row: dict[str, Any] = {
                "seq": seq, "ts": round(time.time(), 6), "actor": actor, "verb": verb,
                "scope": scope, "target": target, "reason": reason,
                "previous_state": previous_state, "new_state": new_state,
                "time_to_halt_ms": time_to_halt_ms, "outcome": outcome,
                "detail": json.dumps(detail or {}, sort_keys=True), "prev_hash": prev_hash,
            }
            row["hash"] = _row_hash(prev_hash, _hashed_fields({**row, "hash": ""}))
            self.db.execute(
                f"INSERT INTO audit ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' for _ in _COLUMNS)})",
                [row[c] for c in _COLUMNS],
            )
            entry = _entry(row)
            for subscriber in self.subscribers:
                subscriber(self.db, entry)
        return entry

    def list(self, limit: int = 100, after_seq: int = 0) -> list[AuditEntry]:
        rows = self.db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM audit WHERE seq > ? ORDER BY seq DESC LIMIT ?",
            (after_seq, limit),
        ).fetchall()
        return [_entry(dict(zip(_COLUMNS, r, strict=True))) for r in reversed(rows)]

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM audit").fetchone()[0])

    def verify(self) -> AuditVerifyResult:
        """Walk the chain in seq order; the first row whose link or hash is wrong is named."""
        expected_prev, expected_seq, rows = GENESIS, 1, 0
        cursor = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM audit ORDER BY seq")
        for raw in cursor:
            row = dict(zip(_COLUMNS, raw, strict=True))
            rows += 1
            seq = row["seq"]
            if seq != expected_seq:
                return AuditVerifyResult(
                    ok=False, rows=rows, first_bad_seq=seq,
                    problem=f"row {seq} follows row {expected_seq - 1}: rows missing or moved",
                )
            if row["prev_hash"] != expected_prev:
                return AuditVerifyResult(
                    ok=False, rows=rows, first_bad_seq=seq,
                    problem=f"row {seq} does not link to the hash of row {seq - 1}",
                )
            if _row_hash(row["prev_hash"], _hashed_fields(row)) != row["hash"]:
                return AuditVerifyResult(
                    ok=False, rows=rows, first_bad_seq=seq,
                    problem=f"row {seq} was altered: its content does not match its hash",
                )
            expected_prev, expected_seq = row["hash"], seq + 1
        return AuditVerifyResult(ok=True, rows=rows, head_hash=expected_prev)


def _entry(row: dict[str, Any]) -> AuditEntry:
    return AuditEntry.model_validate({**row, "detail": json.loads(row["detail"])})
