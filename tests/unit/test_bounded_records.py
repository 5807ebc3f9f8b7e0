"""Files a daemon leaves one of per use stay bounded: the watchdog's records once audited
(supervisor/daemon/main.py: removed only after their audit rows are committed, kept whole in a
rotated `watchdog.audited`) and break-glass's `HALT.done.*` (supervisor/daemon/breakglass.py:
the newest DONE_KEPT). No root."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.audit import AuditLog
from supervisor.daemon.breakglass import DONE_KEPT, BreakGlass, prune_done
from supervisor.daemon.main import audit_watchdog_records, keep_audited
from supervisor.daemon.store import connect


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = connect(tmp_path / "state" / "state.db")
    yield connection
    connection.close()


def report(index: int, runs: int = 1) -> dict[str, Any]:
    return {"trigger": f"kill {index}", "confirmed_empty": True, "time_to_halt_ms": 3.0,
            "runs": [f"run-{index}-{n}" for n in range(runs)]}


def write_records(record: Path, *reports: dict[str, Any]) -> str:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in reports)
    record.write_text(text)
    return text


def test_watchdog_records_leave_once_committed_and_stay_whole_in_audited(
        tmp_path: Path, db: sqlite3.Connection) -> None:
    record = tmp_path / "watchdog.jsonl"
    # A kill's list of runs larger than an audit row's detail: only the kept copy is whole.
    text = write_records(record, report(1), report(2, runs=2000))
    audit = AuditLog(db)

    async def body() -> None:
        audit.start(asyncio.get_running_loop())
        await audit_watchdog_records(record, audit)
        # Removed only after the rows are durable: nothing waits to be written now.
        assert await audit.flushed(0)

    asyncio.run(body())
    audit.close()
    rows = [e for e in audit.list(limit=10) if e.verb == "watchdog_kill"]
    assert [r.reason for r in rows] == ["kill 1", "kill 2"]
    assert rows[1].detail.get("truncated") is True
    assert not record.exists()
    assert (tmp_path / "watchdog.audited").read_text() == text


def test_watchdog_records_stay_when_their_rows_are_not_committed(
        tmp_path: Path, db: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "watchdog.jsonl"
    text = write_records(record, report(1))
    audit = AuditLog(db)

    async def never(_timeout: float | None = None) -> bool:
        return False

    monkeypatch.setattr(audit, "flushed", never)

    async def body() -> None:
        audit.start(asyncio.get_running_loop())
        await audit_watchdog_records(record, audit)

    asyncio.run(body())
    audit.close()
    # The next start audits it again: twice is possible, lost is not.
    assert record.read_text() == text
    assert not (tmp_path / "watchdog.audited").exists()


def test_audited_records_rotate_to_one_older_generation(tmp_path: Path) -> None:
    consumed = tmp_path / "watchdog.audited"
    older = tmp_path / "watchdog.audited.1"
    chunks = [f"{json.dumps(report(i, runs=20))}\n" for i in range(12)]
    size = len(chunks[0])
    for chunk in chunks:
        keep_audited(consumed, chunk, max_bytes=3 * size)
        for path in (consumed, older):
            assert not path.exists() or path.stat().st_size <= 4 * size
    kept = "".join(p.read_text() for p in (older, consumed) if p.exists())
    assert older.exists() and kept.endswith(chunks[-1])
    assert kept != "".join(chunks) and "".join(chunks).endswith(kept)  # the oldest went, in order


def test_prune_done_keeps_the_newest_and_nothing_else_is_touched(tmp_path: Path) -> None:
    names = [f"HALT.done.{1000 + i}" for i in range(DONE_KEPT + 5)]
    names += ["HALT.done.999.rejected", "HALT.done.2000.rejected"]
    others = ["HALT", "HALT.done.notatime", "OTHER.done.1", "control.sock"]
    for name in names + others:
        (tmp_path / name).write_text("x")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        removed = prune_done(fd, "HALT")
    finally:
        os.close(fd)
    by_time = sorted(names, key=lambda n: int(n.split(".")[2]))
    assert sorted(removed) == sorted(by_time[:len(names) - DONE_KEPT])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(by_time[-DONE_KEPT:] + others)


def test_each_halt_applied_leaves_at_most_done_kept_files(tmp_path: Path) -> None:
    halt_file = tmp_path / "HALT"
    for stamp in range(DONE_KEPT + 3):
        (tmp_path / f"HALT.done.{stamp}").write_text("earlier")
    glass = BreakGlass(arbiter=None, halt_file=halt_file)  # type: ignore[arg-type]
    glass._dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        halt_file.write_text("reason\n")
        glass._rename(f"HALT.done.{10**10}")
    finally:
        os.close(glass._dir_fd)
    done = sorted(p.name for p in tmp_path.glob("HALT.done.*"))
    assert len(done) == DONE_KEPT and f"HALT.done.{10**10}" in done
    assert not halt_file.exists()
