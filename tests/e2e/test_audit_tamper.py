"""Audit tamper evidence against a real daemon's state (issue 11, item 10). The daemon writes a
real history (launch, pause, kill, shutdown) and signs its checkpoints; then, with the daemon
stopped, the test attacks the state as someone with root on the host would: deletes the newest
rows, edits a row and recomputes every hash after it, removes the checkpoint file, replaces the
key, restores an older copy of the database, reorders rows. Each is caught by
`agentctl audit verify --state-dir` offline and by the next daemon start (which alarms, audits
it and reports it in /v1/health, or refuses to start under on_tamper = "refuse"). Needs root."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.audit.anchor import JOURNAL_PREFIX, Signer
from supervisor.audit.chain import COLUMNS, hashed_fields, row_hash
from tests.support.daemon import Daemon, new_daemon, wait_for


def _history(daemon: Daemon) -> None:
    daemon.agentctl("run", "--detach", "--name", "a1", "--", "sleep", "600", check=True)
    daemon.agentctl_json("pause", "a1", "--reason", "look")
    daemon.agentctl_json("kill", "a1", "--reason", "exfiltration attempt")


@pytest.fixture
def stopped(tmp_root: Path) -> Iterator[Daemon]:
    """A daemon that ran a history and stopped in order (its last row is anchored)."""
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        _history(daemon)
    finally:
        assert daemon.stop() == 0
    yield daemon
    daemon.stop()
    assert daemon.residue() == {}
    daemon.cleanup_host()


def offline(daemon: Daemon, key: Path | None = None) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "audit", "verify", "--json",
         "--state-dir", str(daemon.root / "state"),
         "--key", str(key or daemon.audit_key.with_name("audit-key.pub")),
         "--checkpoints", str(daemon.checkpoint_file)],
        capture_output=True, text=True, timeout=60)
    return result.returncode, json.loads(result.stdout)


def rows(daemon: Daemon) -> list[dict[str, Any]]:
    db = sqlite3.connect(daemon.state_db)
    try:
        return [dict(zip(COLUMNS, r, strict=True)) for r in
                db.execute(f"SELECT {', '.join(COLUMNS)} FROM audit ORDER BY seq")]
    finally:
        db.close()


def attack(daemon: Daemon, *statements: tuple[str, tuple[Any, ...]]) -> None:
    db = sqlite3.connect(daemon.state_db)
    try:
        db.execute("DROP TRIGGER IF EXISTS audit_no_update")
        db.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        for sql, args in statements:
            db.execute(sql, args)
        db.commit()
    finally:
        db.close()


def rehash_from(daemon: Daemon, seq: int) -> None:
    db = sqlite3.connect(daemon.state_db)
    try:
        prev_hash = db.execute("SELECT hash FROM audit WHERE seq = ?", (seq - 1,)).fetchone()[0]
        for raw in db.execute(f"SELECT {', '.join(COLUMNS)} FROM audit WHERE seq >= ? "
                              f"ORDER BY seq", (seq,)).fetchall():
            row = dict(zip(COLUMNS, raw, strict=True))
            row["prev_hash"] = prev_hash
            row["hash"] = row_hash(prev_hash, hashed_fields(row))
            db.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?",
                       (row["prev_hash"], row["hash"], row["seq"]))
            prev_hash = row["hash"]
        db.commit()
    finally:
        db.close()


def delete_newest(daemon: Daemon) -> str:
    kill = next(r for r in rows(daemon) if r["verb"] == "kill")
    attack(daemon, ("DELETE FROM audit WHERE seq >= ?", (kill["seq"],)))
    return "were deleted"


def edit_and_rehash(daemon: Daemon) -> str:
    kill = next(r for r in rows(daemon) if r["verb"] == "kill")
    attack(daemon, ("UPDATE audit SET reason = 'routine', actor = 'system:supervisor' "
                    "WHERE seq = ?", (kill["seq"],)))
    rehash_from(daemon, kill["seq"])
    return "checkpoint"


def drop_checkpoint_file(daemon: Daemon) -> str:
    daemon.checkpoint_file.unlink()
    return "the file was removed"


def replace_key(daemon: Daemon) -> str:
    """A key of the attacker's own in place of the host's (to sign forged checkpoints)."""
    daemon.audit_key.unlink()
    daemon.audit_key.with_name("audit-key.pub").unlink()
    Signer.load_or_create(daemon.audit_key)
    return "not signed by the audit key"


def reorder_rows(daemon: Daemon) -> str:
    kill = next(r for r in rows(daemon) if r["verb"] == "kill")
    pause = next(r for r in rows(daemon) if r["verb"] == "pause")
    attack(daemon, ("UPDATE audit SET seq = -1 WHERE seq = ?", (kill["seq"],)),
           ("UPDATE audit SET seq = ? WHERE seq = ?", (kill["seq"], pause["seq"])),
           ("UPDATE audit SET seq = ? WHERE seq = -1", (pause["seq"],)))
    return "row"


ATTACKS: dict[str, Callable[[Daemon], str]] = {
    "delete_newest_rows": delete_newest, "edit_and_rehash": edit_and_rehash,
    "drop_checkpoint_file": drop_checkpoint_file, "replace_key": replace_key,
    "reorder_rows": reorder_rows,
}


def test_an_untouched_state_verifies_offline_and_at_start(stopped: Daemon) -> None:
    code, result = offline(stopped)
    assert code == 0, result
    assert result["unanchored_rows"] == 0 and result["checkpoints"] >= 3
    assert result["anchor_seq"] == result["head_seq"]  # the orderly stop anchored the head
    # Every checkpoint also went to the journal (the daemon's stderr, which systemd stores and
    # forwards), signature and all: a copy the host's state files cannot rewrite.
    journal = [json.loads(line.split(JOURNAL_PREFIX, 1)[1])
               for line in stopped.logs().splitlines() if JOURNAL_PREFIX in line]
    filed = [json.loads(line) for line in stopped.checkpoint_file.read_text().splitlines()]
    assert filed and len(filed) == result["checkpoints"]
    assert {(c["seq"], c["hash"], c["sig"]) for c in filed} <= {
        (c["seq"], c["hash"], c["sig"]) for c in journal}, (filed, journal)
    stopped.start()
    assert stopped.client.health()["status"] == "ok"
    assert stopped.client.health()["audit_alarms"] == {}
    assert stopped.client.audit_verify()["ok"]


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_tampering_is_caught_offline_and_alarmed_at_start(stopped: Daemon, name: str) -> None:
    expected = ATTACKS[name](stopped)

    code, result = offline(stopped)  # with the host's public key as it is now
    assert code == 1, result
    assert any(expected in p for p in result["problems"]), result["problems"]

    stopped.start()  # on_tamper = "alarm" (the default): it starts, and says so everywhere
    # From the last anchor at start; rows before it edited in place (no rehash) are found by
    # the full verification, which runs off the loop once the daemon serves.
    health = wait_for(lambda: (h := stopped.client.health())["status"] == "degraded" and h,
                      timeout=60, what="the audit alarm")
    assert "chain_problem" in health["audit_alarms"], health
    verdict = stopped.client.audit_verify()
    assert not verdict["ok"]
    entries = stopped.client.audit(limit=200)["entries"]
    alarm = [e for e in entries if e["verb"] == "audit_verify" and e["outcome"] == "failed"]
    assert alarm and alarm[0]["detail"]["problems"]
    assert "AUDIT LOG TAMPERED" in stopped.logs()
    # The switch still works on a host whose log was tampered with.
    stopped.agentctl("reactivate", "a1", check=True)
    stopped.agentctl("run", "--detach", "--name", "a1", "--", "sleep", "600", check=True)
    stopped.agentctl_json("kill", "a1", "--reason", "after tampering")
    stopped.stop()
    # The evidence stays: the log goes on, and verifying it still fails.
    assert offline(stopped)[0] == 1


def test_an_older_copy_of_the_database_is_caught(tmp_root: Path) -> None:
    """Our own variant: the attacker keeps a copy of state.db from before the kill and puts it
    back later (a rollback, consistent in itself: every hash in it is right)."""
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        daemon.agentctl("run", "--detach", "--name", "a1", "--", "sleep", "600", check=True)
        daemon.stop()
        shutil.copy(daemon.state_db, tmp_root / "before-the-kill.db")
        daemon.start()
        daemon.agentctl_json("kill", "a1", "--reason", "caught it")
        daemon.stop()
        shutil.copy(tmp_root / "before-the-kill.db", daemon.state_db)
        code, result = offline(daemon)
        assert code == 1 and "were deleted" in result["problem"], result
        daemon.start()
        assert daemon.client.health()["status"] == "degraded"
    finally:
        daemon.stop()
        assert daemon.residue() == {}
        daemon.cleanup_host()


def test_refuse_mode_does_not_start_on_a_tampered_log(stopped: Daemon) -> None:
    delete_newest(stopped)
    stopped.extra_config["audit"] = {"on_tamper": "refuse"}
    with pytest.raises(RuntimeError, match="daemon exited 10"):
        stopped.start()
    assert "refusing to start" in stopped.logs()
    last = rows(stopped)[-1]
    assert (last["verb"], last["outcome"]) == ("audit_verify", "failed")  # audited, still
