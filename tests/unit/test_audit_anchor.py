"""Audit checkpoints (supervisor/audit/anchor.py) on a real SQLite file and a real Ed25519 key
in tmp: signing, the checkpoint file, and every way someone with write access to the state
directory can try to hide rows, each of which `verify` must name. No root."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.audit import Anchoring, AuditLog
from supervisor.audit.anchor import Checkpoint, CheckpointFile, KeyProblem, Signer
from supervisor.audit.chain import COLUMNS, hashed_fields, row_hash
from supervisor.config import Config, load_config
from supervisor.errors import ConfigInvalid
from supervisor.models import AuditEntry


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return Signer.load_or_create(tmp_path / "etc" / "audit-key")


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    (tmp_path / "state").mkdir()
    connection = sqlite3.connect(tmp_path / "state" / "state.db")
    yield connection
    connection.close()


@pytest.fixture
def audit(db: sqlite3.Connection, signer: Signer, tmp_path: Path) -> AuditLog:
    return AuditLog(db, anchoring=Anchoring(
        signer=signer, file=CheckpointFile(tmp_path / "log" / "checkpoints.jsonl"),
        host="test-host"))


def fill(audit: AuditLog, rows: int, verb: str = "pause") -> None:
    for i in range(rows):
        audit.append(actor="alice", verb=verb, scope=f"agent:a{i}", target=f"a{i}",
                     reason=f"r{i}", detail={"i": i})


def anchored(audit: AuditLog, rows: int = 10) -> int:
    """`rows` rows and a checkpoint of the last; returns its seq."""
    fill(audit, rows)
    checkpoint = audit.checkpoint()
    assert checkpoint is not None and checkpoint.seq == rows
    return rows


def tamper(db: sqlite3.Connection, sql: str, *args: object) -> None:
    db.execute("DROP TRIGGER IF EXISTS audit_no_update")
    db.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    db.execute(sql, args)
    db.commit()


def rehash_from(db: sqlite3.Connection, seq: int) -> None:
    """What a careful attacker does after editing row `seq`: recompute every hash after it."""
    prev = db.execute("SELECT hash FROM audit WHERE seq = ?", (seq - 1,)).fetchone()
    prev_hash = prev[0] if prev else "0" * 64
    for raw in db.execute(f"SELECT {', '.join(COLUMNS)} FROM audit WHERE seq >= ? ORDER BY seq",
                          (seq,)).fetchall():
        row = dict(zip(COLUMNS, raw, strict=True))
        row["prev_hash"] = prev_hash
        row["hash"] = row_hash(prev_hash, hashed_fields(row))
        db.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?",
                   (row["prev_hash"], row["hash"], row["seq"]))
        prev_hash = row["hash"]
    db.commit()


# ----------------------------------------------------------------------------- keys


def test_the_key_is_created_private_with_its_public_half(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "audit-key"
    signer = Signer.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "etc" / "audit-key.pub").read_text().startswith("-----BEGIN PUBLIC KEY")
    again = Signer.load_or_create(path)
    assert again.key_id == signer.key_id


def test_a_key_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit-key"
    Signer.load_or_create(path)
    path.chmod(0o640)
    with pytest.raises(KeyProblem, match="mode 0600"):
        Signer.load_or_create(path)


def test_a_checkpoint_verifies_only_with_its_key(signer: Signer, tmp_path: Path) -> None:
    checkpoint = signer.sign(7, "ab" * 32, 1700000000.5)
    assert checkpoint.signed_by(signer.public_key)
    other = Signer.load_or_create(tmp_path / "other-key")
    assert not checkpoint.signed_by(other.public_key)
    forged = Checkpoint(seq=8, hash=checkpoint.hash, ts=checkpoint.ts,
                        key_id=checkpoint.key_id, sig=checkpoint.sig)
    assert not forged.signed_by(signer.public_key)


@pytest.mark.parametrize("name", ["key", "checkpoint_file"])
def test_an_anchor_inside_the_state_dir_is_refused(tmp_path: Path, name: str) -> None:
    config = tmp_path / "daemon.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path}/state"\n'
                      f'[audit]\n{name} = "{tmp_path}/state/sub/anchor"\n')
    with pytest.raises(ConfigInvalid, match=r"outside daemon\.state_dir"):
        load_config(config)
    assert Config().audit.key.parent == Path("/etc/agent-supervisor")


# ----------------------------------------------------------------------------- the intact case


def test_checkpoints_go_to_the_file_the_journal_and_the_database(
        audit: AuditLog, db: sqlite3.Connection, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="agent-supervisor.audit")
    events: list[AuditEntry] = []
    audit.subscribe(lambda _db, e: events.append(e), in_transaction=True)
    fill(audit, 5)
    checkpoint = audit.checkpoint()
    assert checkpoint is not None
    assert audit.anchoring is not None
    lines = audit.anchoring.file.read()
    assert lines == [checkpoint]
    assert (checkpoint.seq, checkpoint.hash) == (5, audit.list(limit=1)[0].hash)
    assert audit.count() == 5  # beside the chain, not in it
    assert db.execute("SELECT seq, sig FROM audit_checkpoints").fetchall() == [
        (5, checkpoint.sig)]
    assert (events[-1].verb, events[-1].seq, events[-1].detail["sig"]) == (
        "audit_checkpoint", 5, checkpoint.sig)  # the webhook outbox gets its event
    journal = [r.getMessage() for r in caplog.records if "AUDIT_CHECKPOINT" in r.getMessage()]
    assert len(journal) == 1
    assert json.loads(journal[0].split(" ", 1)[1])["sig"] == checkpoint.sig
    result = audit.verify()
    assert result.ok, result
    assert (result.anchor_seq, result.unanchored_rows, result.checkpoints) == (5, 0, 1)
    fill(audit, 3)
    later = audit.verify()
    assert later.ok and later.unanchored_rows == 3


def test_a_fresh_log_verifies_and_says_it_is_unanchored(audit: AuditLog) -> None:
    fill(audit, 3)
    result = audit.verify()
    assert result.ok
    assert "no checkpoint covers this log yet" in result.notes


# ----------------------------------------------------------------------------- attacks


def test_deleting_the_newest_rows_is_caught(audit: AuditLog, db: sqlite3.Connection) -> None:
    anchored(audit, 10)
    tamper(db, "DELETE FROM audit WHERE seq > 7")
    result = audit.verify()
    assert not result.ok
    assert "rows 8..10 were deleted" in str(result.problem)
    quick = audit.verify(from_anchor=True)
    assert not quick.ok and "deleted" in str(quick.problem)


def test_editing_a_row_and_rehashing_everything_after_it_is_caught(
        audit: AuditLog, db: sqlite3.Connection) -> None:
    anchored(audit, 10)
    tamper(db, "UPDATE audit SET reason = 'nothing to see' WHERE seq = 4")
    rehash_from(db, 4)
    result = audit.verify()
    assert not result.ok
    assert result.first_bad_seq is not None
    assert "rewritten" in " ".join(result.problems) or "checkpoint row" in str(result.problem)
    assert not audit.verify(from_anchor=True).ok


def test_deleting_the_checkpoint_file_is_caught(audit: AuditLog) -> None:
    anchored(audit, 5)
    assert audit.anchoring is not None
    audit.anchoring.file.path.unlink()
    result = audit.verify()
    assert not result.ok and "the file was removed" in str(result.problem)


def test_cutting_the_checkpoint_file_back_is_caught(audit: AuditLog) -> None:
    anchored(audit, 5)
    fill(audit, 5)
    audit.checkpoint()
    assert audit.anchoring is not None
    path = audit.anchoring.file.path
    path.write_text(path.read_text().splitlines(keepends=True)[0])
    result = audit.verify()
    assert not result.ok and "cut back or replaced" in str(result.problem)


def test_replacing_the_key_is_caught(audit: AuditLog, db: sqlite3.Connection,
                                     tmp_path: Path) -> None:
    anchored(audit, 5)
    assert audit.anchoring is not None
    key = audit.anchoring.signer.path
    key.unlink()
    audit.anchoring.signer = Signer.load_or_create(key)  # the next start makes a new one
    result = audit.verify()
    assert not result.ok
    assert "not signed by the audit key" in str(result.problem)


def test_resigning_everything_with_a_new_key_fails_against_the_old_public_key(
        audit: AuditLog, db: sqlite3.Connection, tmp_path: Path) -> None:
    """The attacker rewrites a row, re-signs every checkpoint with a key of their own and
    rewrites the file: only the old public key (kept off the host) still tells."""
    anchored(audit, 6)
    assert audit.anchoring is not None
    old_public = audit.anchoring.signer.public_key
    tamper(db, "UPDATE audit SET reason = 'benign' WHERE seq = 2")
    rehash_from(db, 2)
    theirs = Signer.load_or_create(tmp_path / "attacker-key")
    head = db.execute("SELECT seq, hash FROM audit WHERE seq = 6").fetchone()
    forged = theirs.sign(head[0], head[1], 1700000000.0)
    db.execute("DROP TRIGGER audit_checkpoints_no_delete")
    tamper(db, "DELETE FROM audit_checkpoints")
    tamper(db, "INSERT INTO audit_checkpoints VALUES (?, ?, ?, ?, ?)", forged.seq, forged.hash,
           forged.ts, forged.key_id, forged.sig)
    audit.anchoring.file.path.write_text(json.dumps(forged.as_dict()) + "\n")
    audit.anchoring.signer = theirs
    assert audit.verify().ok  # on the host itself the forgery is complete...
    from supervisor.audit.anchor import verify
    result = verify(db, old_public, audit.anchoring.file.read())
    assert not result.ok and "not signed by the audit key" in str(result.problem)


def test_reordering_rows_is_caught(audit: AuditLog, db: sqlite3.Connection) -> None:
    anchored(audit, 6)
    tamper(db, "UPDATE audit SET seq = 100 WHERE seq = 3")
    tamper(db, "UPDATE audit SET seq = 3 WHERE seq = 4")
    tamper(db, "UPDATE audit SET seq = 4 WHERE seq = 100")
    result = audit.verify()
    assert not result.ok and result.first_bad_seq == 3


def test_an_old_anchor_still_catches_a_rewrite_after_newer_checkpoints(
        audit: AuditLog, db: sqlite3.Connection) -> None:
    """A daemon that started on a tampered log (on_tamper = "alarm") goes on signing; the
    older checkpoints in the file keep the rewrite visible to the full verification."""
    anchored(audit, 5)
    tamper(db, "DELETE FROM audit WHERE seq > 3")
    fill(audit, 4)
    audit.checkpoint()
    assert audit.verify(from_anchor=True).ok  # the newest anchor covers the new rows...
    full = audit.verify()
    assert not full.ok and "rewritten" in str(full.problem)  # ...the old one does not


def test_a_forged_checkpoint_in_the_database_is_caught(audit: AuditLog,
                                                       db: sqlite3.Connection) -> None:
    seq = anchored(audit, 4)
    sig = db.execute("SELECT sig FROM audit_checkpoints WHERE seq = ?", (seq,)).fetchone()[0]
    db.execute("DROP TRIGGER audit_checkpoints_no_update")
    db.execute("UPDATE audit_checkpoints SET sig = ? WHERE seq = ?", (sig[::-1], seq))
    db.commit()
    result = audit.verify()
    assert not result.ok and "in the database is not signed" in " ".join(result.problems)


def test_the_checkpoint_file_is_bounded(tmp_path: Path, signer: Signer,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor.audit import anchor
    monkeypatch.setattr(anchor, "CHECKPOINT_FILE_MAX_BYTES", 4096)
    monkeypatch.setattr(anchor, "CHECKPOINT_FILE_KEEP", 10)
    checkpoints = CheckpointFile(tmp_path / "cp.jsonl")
    for seq in range(100):
        checkpoints.append(signer.sign(seq, "a" * 64, 1.0))
    assert os.path.getsize(checkpoints.path) <= 4096
    kept = checkpoints.read()
    assert kept is not None and len(kept) >= 10
    assert kept[-1].seq == 99 and all(c.signed_by(signer.public_key) for c in kept)
