"""Audit verification in a process of its own (supervisor/audit/verifier.py) gives the answer
the daemon's own verification gives, for an intact log and for each way of hiding rows; the
daemon's `verify_async` (what `agentctl audit verify` gets) is that process's answer. Real
SQLite file, real Ed25519 key, a real child process; no root."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisor.audit import Anchoring, AuditLog
from supervisor.audit.anchor import CheckpointFile, Signer
from supervisor.audit.verifier import VerifierFailed, verify_in_process
from supervisor.models import AuditVerifyResult
from tests.unit.test_audit_anchor import anchored, fill, rehash_from, tamper

VERIFY_WAIT = 180.0  # a child Python at nice 19 on a loaded machine


@pytest.fixture
def database(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(tmp_path / "state.db")
    yield connection
    connection.close()


@pytest.fixture
def anchored_log(database: sqlite3.Connection, tmp_path: Path) -> AuditLog:
    return AuditLog(database, anchoring=Anchoring(
        signer=Signer.load_or_create(tmp_path / "etc" / "audit-key"),
        file=CheckpointFile(tmp_path / "log" / "checkpoints.jsonl"), host="test-host"))


def in_process(audit: AuditLog, from_anchor: bool = False) -> AuditVerifyResult:
    anchoring = audit.anchoring
    path = Path(audit.db.execute("PRAGMA database_list").fetchone()[2])
    return verify_in_process(
        path, anchoring.signer.public_key if anchoring is not None else None,
        anchoring.file.path if anchoring is not None else None, from_anchor=from_anchor,
        timeout=VERIFY_WAIT)


def delete_newest(audit: AuditLog, db: sqlite3.Connection) -> None:
    anchored(audit)
    tamper(db, "DELETE FROM audit WHERE seq > 7")


def edit_and_rehash(audit: AuditLog, db: sqlite3.Connection) -> None:
    anchored(audit)
    fill(audit, 3)
    tamper(db, "UPDATE audit SET reason = 'nothing happened' WHERE seq = 4")
    rehash_from(db, 4)


def remove_the_file(audit: AuditLog, db: sqlite3.Connection) -> None:
    anchored(audit)
    assert audit.anchoring is not None
    audit.anchoring.file.path.unlink()


def intact(audit: AuditLog, db: sqlite3.Connection) -> None:
    anchored(audit)
    fill(audit, 5)


@pytest.mark.parametrize("scenario", [intact, delete_newest, edit_and_rehash, remove_the_file],
                         ids=lambda scenario: scenario.__name__)
def test_the_process_answers_as_the_daemon_does(
        anchored_log: AuditLog, database: sqlite3.Connection,
        scenario: Callable[[AuditLog, sqlite3.Connection], None]) -> None:
    scenario(anchored_log, database)
    expected = anchored_log.verify()
    assert expected.ok is (scenario is intact)
    assert in_process(anchored_log) == expected


def test_the_quick_check_from_the_anchor_too(anchored_log: AuditLog,
                                            database: sqlite3.Connection) -> None:
    intact(anchored_log, database)
    expected = anchored_log.verify(from_anchor=True)
    assert expected.ok and expected.notes[0].startswith("verified from the checkpoint")
    assert in_process(anchored_log, from_anchor=True) == expected


def test_an_unanchored_log_is_verified_in_the_process_too(database: sqlite3.Connection) -> None:
    audit = AuditLog(database)
    fill(audit, 4)
    tamper(database, "UPDATE audit SET reason = 'x' WHERE seq = 2")
    expected = audit.verify()
    assert not expected.ok and expected.first_bad_seq == 2
    assert in_process(audit) == expected


def test_verify_async_is_the_process_answer(anchored_log: AuditLog,
                                            database: sqlite3.Connection,
                                            caplog: pytest.LogCaptureFixture) -> None:
    edit_and_rehash(anchored_log, database)
    with caplog.at_level(logging.ERROR, logger="supervisor.audit"):
        result = asyncio.run(anchored_log.verify_async())
    assert result == anchored_log.verify() and not result.ok
    assert not [r for r in caplog.records if "instead" in r.getMessage()]  # no fallback


def test_a_verifier_that_cannot_answer_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(VerifierFailed, match="exited"):
        verify_in_process(tmp_path / "nowhere" / "state.db", None,
                          tmp_path / "checkpoints.jsonl", timeout=VERIFY_WAIT)


def test_the_process_imports_nothing_from_the_daemons_directory(
        anchored_log: AuditLog, database: sqlite3.Connection, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon started by hand in a directory others write (a checkout): its verifier, a root
    `python -c` that would put that directory first on its path, runs in "/" and does not
    import the directory's argparse.py before the standard library's."""
    marker = tmp_path / "imported"
    planted = tmp_path / "checkout"
    planted.mkdir()
    (planted / "argparse.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    intact(anchored_log, database)
    monkeypatch.chdir(planted)
    assert in_process(anchored_log) == anchored_log.verify()
    assert not marker.exists()
