"""The hash-chained audit log (supervisor/audit.py) on a real SQLite file in tmp: append, list,
count, verify, and tampering by someone with write access to the file."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.audit import GENESIS, AuditLog

ROWS = 5


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(db_path)
    yield connection
    connection.close()


@pytest.fixture
def audit(db: sqlite3.Connection) -> AuditLog:
    return AuditLog(db)


def fill(audit: AuditLog, rows: int = ROWS) -> None:
    for i in range(1, rows + 1):
        audit.append(actor=f"alice(uid={1000 + i})", verb="kill", scope=f"agent:a{i}",
                     target=f"a{i}", reason=f"reason {i}", previous_state="active",
                     new_state="killed", time_to_halt_ms=float(i), detail={"run": f"r{i}"})


def attacker(db: sqlite3.Connection) -> None:
    """Someone with write access to the file drops the append-only triggers."""
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("DROP TRIGGER audit_no_delete")
    db.commit()


def test_append_list_count(audit: AuditLog) -> None:
    assert audit.count() == 0
    assert audit.list() == []
    first = audit.append(actor="alice(uid=1000)", verb="kill", scope="agent:a1", target="a1",
                         reason="runaway", previous_state="active", new_state="killed",
                         time_to_halt_ms=12.5, detail={"run": "r1", "nested": {"k": [1, 2]}})
    second = audit.append(actor="system:supervisor", verb="reap", scope="global")
    assert (first.seq, second.seq) == (1, 2)
    assert first.prev_hash == GENESIS
    assert second.prev_hash == first.hash
    assert first.hash != second.hash and len(first.hash) == 64
    assert audit.count() == 2
    listed = audit.list()
    assert listed == [first, second]
    assert listed[0].detail == {"run": "r1", "nested": {"k": [1, 2]}}
    assert listed[0].time_to_halt_ms == 12.5
    assert listed[0].outcome == "ok"
    assert listed[1].target is None and listed[1].reason == "" and listed[1].detail == {}


def test_list_limit_and_after(audit: AuditLog) -> None:
    fill(audit)
    assert [e.seq for e in audit.list()] == [1, 2, 3, 4, 5]
    assert [e.seq for e in audit.list(limit=2)] == [4, 5]
    assert [e.seq for e in audit.list(after_seq=3)] == [4, 5]
    assert [e.seq for e in audit.list(limit=1, after_seq=1)] == [5]
    assert audit.list(after_seq=5) == []


def test_verify_ok(audit: AuditLog) -> None:
    empty = audit.verify()
    assert (empty.ok, empty.rows, empty.head_hash) == (True, 0, GENESIS)
    fill(audit)
    result = audit.verify()
    assert result.ok
    assert result.rows == ROWS
    assert result.first_bad_seq is None and result.problem is None
    assert result.head_hash == audit.list()[-1].hash


def test_chain_survives_reopening(db_path: Path) -> None:
    first = sqlite3.connect(db_path)
    try:
        fill(AuditLog(first), 3)
    finally:
        first.close()
    again = sqlite3.connect(db_path)
    try:
        audit = AuditLog(again)
        entry = audit.append(actor="bob(uid=1001)", verb="reactivate", scope="agent:a1")
        assert entry.seq == 4
        assert entry.prev_hash == audit.list()[-2].hash
        assert audit.verify().ok
    finally:
        again.close()


def test_triggers_refuse_update_and_delete(db: sqlite3.Connection, audit: AuditLog) -> None:
    fill(audit)
    before = audit.list()
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit SET reason = 'nothing happened' WHERE seq = 3")
    db.rollback()
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit WHERE seq = 3")
    db.rollback()
    assert audit.list() == before
    assert audit.verify().ok


@pytest.mark.parametrize(("column", "value"), [
    ("reason", "nothing happened"),
    ("actor", "mallory(uid=666)"),
    ("outcome", "refused:forbidden"),
    ("new_state", "active"),
    ("time_to_halt_ms", 0.001),
    ("detail", '{"run": "other"}'),
    ("ts", 1.0),
    ("target", None),
])
def test_edited_middle_row_is_named(db: sqlite3.Connection, audit: AuditLog, column: str,
                                    value: object) -> None:
    fill(audit)
    attacker(db)
    db.execute(f"UPDATE audit SET {column} = ? WHERE seq = 3", (value,))
    db.commit()
    result = audit.verify()
    assert not result.ok
    assert result.first_bad_seq == 3
    assert result.problem is not None and "3" in result.problem


def test_edited_row_with_recomputed_hash_breaks_the_next_link(db: sqlite3.Connection,
                                                               audit: AuditLog) -> None:
    fill(audit)
    attacker(db)
    db.execute("UPDATE audit SET hash = ? WHERE seq = 3", ("f" * 64,))
    db.commit()
    result = audit.verify()
    assert not result.ok
    assert result.first_bad_seq == 3
    db.execute("UPDATE audit SET prev_hash = ? WHERE seq = 4", ("f" * 64,))
    db.commit()
    assert audit.verify().first_bad_seq == 3


def test_deleted_middle_row_is_named(db: sqlite3.Connection, audit: AuditLog) -> None:
    fill(audit)
    attacker(db)
    db.execute("DELETE FROM audit WHERE seq = 3")
    db.commit()
    result = audit.verify()
    assert not result.ok
    assert result.first_bad_seq == 4  # the first row that no longer follows its predecessor
    assert result.problem is not None and "missing" in result.problem


def test_swapped_rows_are_named(db: sqlite3.Connection, audit: AuditLog) -> None:
    fill(audit)
    attacker(db)
    db.execute("UPDATE audit SET seq = -1 WHERE seq = 2")
    db.execute("UPDATE audit SET seq = 2 WHERE seq = 4")
    db.execute("UPDATE audit SET seq = 4 WHERE seq = -1")
    db.commit()
    assert [e.reason for e in audit.list()] == [f"reason {i}" for i in (1, 4, 3, 2, 5)]
    result = audit.verify()
    assert not result.ok
    assert result.first_bad_seq == 2


def test_deleted_first_row_is_named(db: sqlite3.Connection, audit: AuditLog) -> None:
    fill(audit)
    attacker(db)
    db.execute("DELETE FROM audit WHERE seq = 1")
    db.commit()
    result = audit.verify()
    assert not result.ok
    assert result.first_bad_seq == 2


def test_renumbered_rows_are_named(db: sqlite3.Connection, audit: AuditLog) -> None:
    """Deleting row 3 and closing the gap still breaks the chain: seq and the link are hashed."""
    fill(audit)
    attacker(db)
    db.execute("DELETE FROM audit WHERE seq = 3")
    db.execute("UPDATE audit SET seq = seq - 1 WHERE seq > 3")
    db.commit()
    result = audit.verify()
    assert not result.ok
    assert result.first_bad_seq == 3


def test_append_after_tampering_does_not_launder_it(db: sqlite3.Connection,
                                                    audit: AuditLog) -> None:
    fill(audit)
    attacker(db)
    db.execute("UPDATE audit SET reason = 'x' WHERE seq = 2")
    db.commit()
    audit.append(actor="system:supervisor", verb="reap", scope="global")
    result = audit.verify()
    assert not result.ok
    assert result.first_bad_seq == 2
