"""Per-run telemetry summaries in SQLite (the daemon's state database), written when a run
ends and read by `inspect` and `agentctl telemetry` afterwards. No privilege beyond the file."""

from __future__ import annotations

import sqlite3
from typing import Any, Protocol

from supervisor.models import TelemetrySummary

SCHEMA = """
CREATE TABLE IF NOT EXISTS run_telemetry (
    run_id TEXT PRIMARY KEY,
    summary TEXT NOT NULL
);
"""


class Batches(Protocol):
    """The daemon's state store (supervisor/daemon/store.py): takes a write into the
    transaction it has open, if one is (True), so a run's summary goes to disk with its
    record."""

    def write_in_batch(self, key: tuple[str, str], sql: str, args: list[Any]) -> bool: ...

    def kept(self, key: tuple[str, str]) -> list[Any] | None:
        """The arguments of a write taken but not yet on disk."""
        ...


_PUT = "INSERT OR REPLACE INTO run_telemetry (run_id, summary) VALUES (?, ?)"


class SummaryStore:
    def __init__(self, db: sqlite3.Connection, batches: Batches | None = None) -> None:
        self.db = db
        # A scoped kill ends a hundred runs in one batch of the state store: their summaries
        # join its one commit instead of a commit each in front of the kill's answer.
        self.batches = batches
        db.executescript(SCHEMA)

    def put(self, summary: TelemetrySummary) -> None:
        args: list[Any] = [summary.run_id, summary.model_dump_json()]
        if self.batches is not None and self.batches.write_in_batch(
                ("run_telemetry", summary.run_id), _PUT, args):
            return
        with self.db:
            self.db.execute(_PUT, args)

    def get(self, run_id: str) -> TelemetrySummary | None:
        kept = self.batches.kept(("run_telemetry", run_id)) if self.batches else None
        if kept is not None:
            return TelemetrySummary.model_validate_json(kept[1])
        row = self.db.execute("SELECT summary FROM run_telemetry WHERE run_id = ?",
                              (run_id,)).fetchone()
        return TelemetrySummary.model_validate_json(row[0]) if row else None
