"""A full disk never costs a kill its audit row, nor leaves a killed run recorded as running
(issue 12). The daemon's state directory is a small tmpfs the test fills up for real. First
kill: the disk reserve is released and every record fits at once. Second kill, with no reserve
left: the agent dies all the same, the answer says its audit rows are pending, the writes
fail, are alarmed (/v1/health) and retried, and once the test frees space the kill row, the
run's record and a row saying how long writes failed all reach the disk. Needs root (mount)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon, new_daemon, wait_for

TMPFS_SIZE = "48m"


@pytest.fixture
def small_disk_daemon(tmp_root: Path) -> Iterator[Daemon]:
    # The launch watermark is off: this test fills the disk after the launches, on purpose.
    daemon = new_daemon(tmp_root, disk={"min_free_bytes": 0, "min_free_percent": 0})
    state = daemon.root / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs",
                    str(state)], check=True)
    try:
        daemon.start()
        yield daemon
    finally:
        with contextlib.suppress(FileNotFoundError):
            (state / "filler").unlink()
        daemon.stop()
        residue = daemon.residue()
        daemon.cleanup_host()
        subprocess.run(["umount", str(state)], check=True)
        assert residue == {}


def fill(path: Path) -> int:
    """Write until the filesystem says ENOSPC; returns the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 512):
            chunk = b"\0" * size
            while True:
                try:
                    written += os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return written


def db_rows(daemon: Daemon, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(daemon.state_db)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def launch(daemon: Daemon, name: str) -> str:
    daemon.agentctl("run", "--detach", "--name", name, "--", "sleep", "600", check=True)
    return str(daemon.client.agent(name)["run"]["id"])


def test_kills_on_a_full_disk_are_audited_and_leave_consistent_state(
        small_disk_daemon: Daemon) -> None:
    daemon = small_disk_daemon
    filler = daemon.root / "state" / "filler"
    first, second = launch(daemon, "first"), launch(daemon, "second")
    assert (daemon.root / "state" / "disk-reserve").stat().st_size == 4 << 20

    assert fill(filler) > 0
    first_kill = daemon.agentctl("kill", "first", "--reason", "disk is full", "--json",
                                 check=True)
    killed = json.loads(first_kill.stdout)
    assert killed["results"][0]["new_state"] == "killed"
    assert "audit_pending" not in first_kill.stderr  # its rows were durable at the answer
    # The reserve made room: the kill row and the run's end are on disk at once.
    assert db_rows(daemon, "SELECT state FROM runs WHERE id = ?", first) == [("killed",)]
    assert db_rows(daemon, "SELECT outcome FROM audit WHERE verb = 'kill' AND target = ?",
                   "first") == [("ok",)]
    health = daemon.client.health()
    assert health["status"] == "degraded" and "disk_reserve" in health["audit_alarms"]
    assert not (daemon.root / "state" / "disk-reserve").exists()

    # No reserve left: fill what it freed, and kill again.
    fill(filler)
    pids = daemon.agent_pids()
    assert pids
    second_kill = daemon.agentctl("kill", "second", "--reason", "disk still full", "--json",
                                  check=True)
    assert json.loads(second_kill.stdout)["results"][0]["new_state"] == "killed"
    # Answered after the audit wait with the kill row still queued: the caller is told so.
    assert "warning: audit_pending:" in second_kill.stderr, second_kill.stderr
    assert daemon.agent_pids() == []  # the kill itself never waits for the disk
    assert daemon.client.agent("second")["run"]["state"] == "killed"  # memory is the truth
    # Both writers failed (the store's run record, the audit writer's kill row), and say so.
    wait_for(lambda: {"write_error", "store_error"} <= set(
        daemon.client.health()["audit_alarms"]), timeout=30, what="the write alarms")
    assert db_rows(daemon, "SELECT state FROM runs WHERE id = ?", second) == [("running",)]

    filler.unlink()
    wait_for(lambda: db_rows(daemon, "SELECT state FROM runs WHERE id = ?", second)
             == [("killed",)], timeout=30, what="the kept run record to be written")
    wait_for(lambda: db_rows(daemon, "SELECT outcome FROM audit WHERE verb = 'kill' AND "
                             "target = 'second'") == [("ok",)], timeout=30,
             what="the retried kill row")
    # The writer's recovery row is its own transaction, committed right after the retried
    # one: a read between the two sees the kill row without it.
    wait_for(lambda: db_rows(daemon, "SELECT outcome FROM audit WHERE verb = "
                             "'audit_write_failed'") != [], timeout=30,
             what="the writer's recovery row")
    assert db_rows(daemon, "SELECT outcome FROM audit WHERE verb = 'audit_write_failed'") == [
        ("recovered",)]
    wait_for(lambda: daemon.client.health()["audit_alarms"] == {}, timeout=30,
             what="every alarm to clear (reserve taken back)")
    assert (daemon.root / "state" / "disk-reserve").stat().st_size == 4 << 20
    assert daemon.client.audit_verify()["ok"]
