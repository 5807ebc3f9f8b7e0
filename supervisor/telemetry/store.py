"""Per-run telemetry summaries in SQLite (the daemon's state database), written when a run
ends and read by `inspect` and `agentctl telemetry` afterwards. No privilege beyond the file."""

from __future__ import annotations

import sqlite3

from supervisor.models import TelemetrySummary

SCHEMA = """
CREATE TABLE IF NOT EXISTS run_telemetry (
    run_id TEXT PRIMARY KEY,
    summary TEXT NOT NULL
);
"""


class SummaryStore:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(SCHEMA)

    def put(self, summary: TelemetrySummary) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO run_telemetry (run_id, summary) VALUES (?, ?)",
                            (summary.run_id, summary.model_dump_json()))

    def get(self, run_id: str) -> TelemetrySummary | None:
        row = self.db.execute("SELECT summary FROM run_telemetry WHERE run_id = ?",
                              (run_id,)).fetchone()
        return TelemetrySummary.model_validate_json(row[0]) if row else None
