"""The audit chain itself: the table, how a row is hashed, how big a row may be, and the walk
that proves a chain. Pure over a SQLite connection (no privilege beyond reading the file), so
the daemon, `agentctl audit verify --state-dir` and the tests share one definition.

Each row's hash is SHA-256 over the previous row's hash and the row's own canonical JSON, so
editing, deleting or reordering a row breaks the chain from that row on. What the chain alone
cannot show (the newest rows deleted, or rows edited and every hash after them recomputed) is
caught by the signed checkpoints of `anchor.py`."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

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
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    seq INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    ts REAL NOT NULL,
    key_id TEXT NOT NULL,
    sig TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
"""

COLUMNS = ("seq", "ts", "actor", "verb", "scope", "target", "reason", "previous_state",
           "new_state", "time_to_halt_ms", "outcome", "detail", "prev_hash", "hash")

# The verb of a checkpoint's event (checkpoints are kept beside the chain, in
# audit_checkpoints, not as rows of it: a row cannot carry the hash of its own chain).
CHECKPOINT_VERB = "audit_checkpoint"
# The verb of the row that records a verification; one with outcome "failed" keeps the log
# failing verification (the evidence stays until an operator archives the log: runbook).
VERIFY_VERB = "audit_verify"

# What one row may hold. An agent drives some of these fields (refused hosts, syscall names,
# gateway paths), so each is capped where it is written: a row stays a few KiB whatever the
# agent sends, and the log grows with the number of events, never with their size.
DETAIL_MAX_BYTES = 8192
TEXT_MAX_CHARS = {"actor": 256, "verb": 64, "scope": 512, "target": 512, "reason": 2000,
                  "previous_state": 64, "new_state": 64, "outcome": 256}


def row_hash(prev_hash: str, fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


def hashed_fields(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in COLUMNS if k != "hash"}


def cap_text(name: str, value: str | None) -> str | None:
    """`value` as a row keeps it: at most TEXT_MAX_CHARS[name], and UTF-8 whatever it holds.
    An unpaired UTF-16 surrogate (what JSON's "\\ud800" parses to, what os.fsdecode makes of
    a byte that is not UTF-8) is written as its escape: encoded for the row's hash, it raised
    in the writer thread, which died, and no row after it was committed."""
    limit = TEXT_MAX_CHARS[name]
    if value is None:
        return value
    if not value.isascii():
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(value) <= limit:
        return value
    return value[:limit - 1] + "…"


def cap_detail(detail: dict[str, Any] | None) -> str:
    """The detail as stored: canonical JSON of at most DETAIL_MAX_BYTES. A larger one keeps
    its first bytes (as a string, so it stays valid JSON) and says how big it was."""
    text = json.dumps(detail or {}, sort_keys=True, default=str)
    if len(text.encode()) <= DETAIL_MAX_BYTES:
        return text
    head = text.encode()[:DETAIL_MAX_BYTES - 256].decode(errors="ignore")
    return json.dumps({"truncated": True, "original_bytes": len(text.encode()), "head": head},
                      sort_keys=True)


def rows(db: sqlite3.Connection, after_seq: int = 0) -> Iterator[dict[str, Any]]:
    cursor = db.execute(f"SELECT {', '.join(COLUMNS)} FROM audit WHERE seq > ? ORDER BY seq",
                        (after_seq,))
    for raw in cursor:
        yield dict(zip(COLUMNS, raw, strict=True))


@dataclass
class Walk:
    """What a walk of the chain found. `first_bad_seq`/`problem` name the first broken row."""

    rows: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    first_bad_seq: int | None = None
    problem: str | None = None
    # seq -> hash for the seqs a caller asked about (external anchors).
    hashes: dict[int, str] = field(default_factory=dict)
    # (seq, first problem) of every row recording a failed verification.
    failed_verifications: list[tuple[int, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


def walk(db: sqlite3.Connection, want: frozenset[int] = frozenset(),
         base_seq: int = 0, base_hash: str = GENESIS) -> Walk:
    """Walk the chain in seq order from (base_seq, base_hash); stop at the first bad row."""
    found = Walk(head_seq=base_seq, head_hash=base_hash)
    expected_prev, expected_seq = base_hash, base_seq + 1
    for row in rows(db, base_seq):
        found.rows += 1
        seq = row["seq"]
        if seq != expected_seq:
            found.first_bad_seq = seq
            found.problem = f"row {seq} follows row {expected_seq - 1}: rows missing or moved"
            return found
        if row["prev_hash"] != expected_prev:
            found.first_bad_seq = seq
            found.problem = f"row {seq} does not link to the hash of row {seq - 1}"
            return found
        if row_hash(row["prev_hash"], hashed_fields(row)) != row["hash"]:
            found.first_bad_seq = seq
            found.problem = f"row {seq} was altered: its content does not match its hash"
            return found
        if row["verb"] == VERIFY_VERB and row["outcome"] == "failed":
            try:
                problems = json.loads(row["detail"]).get("problems") or ["?"]
            except (ValueError, AttributeError):
                problems = ["?"]
            found.failed_verifications.append((seq, str(problems[0])))
        if seq in want:
            found.hashes[seq] = row["hash"]
        expected_prev, expected_seq = row["hash"], seq + 1
        found.head_seq, found.head_hash = seq, row["hash"]
    return found
