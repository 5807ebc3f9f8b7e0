"""The watchdog's stand-down (supervisor/daemon/watchdog.py) on the real cgroup tree: told
"done" without waiting (an embedded CI run gathers its evidence meanwhile), it exits on its own
and a later disarm() reaps it; with an agent process still alive under the parent it stays
armed, and the pipe closing without "done" makes it kill that process. Made with settle=False
(as Core.assemble does), it is in its own cgroup once settle() returns. Needs root."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.daemon.watchdog import Watchdog
from supervisor.sandbox.cgroups import Cgroup, unified_root
from tests.conftest import require


@pytest.fixture
def parent() -> Iterator[Cgroup]:
    require(os.geteuid() == 0, "needs root (cgroups)")
    group = Cgroup(f"as-test-watchdog-{secrets.token_hex(4)}")
    (group.path / "run").mkdir(parents=True)
    yield group
    Cgroup(f"{group.relative}-watchdog").remove(strict=False)  # the watchdog's own
    group.remove(strict=False)


def test_stand_down_without_waiting_then_reaped(parent: Cgroup, tmp_path: Path) -> None:
    record = tmp_path / "watchdog.jsonl"
    watchdog = Watchdog(parent.path, record, timeout=5)
    assert watchdog.disarm(wait=False)
    assert watchdog.proc.returncode is None  # not waited for
    assert watchdog.disarm()  # only waits now
    assert watchdog.proc.returncode == 0
    assert not watchdog.cgroup.path.exists()  # its own cgroup goes with it
    assert watchdog.disarm() and watchdog.proc.returncode == 0  # again: a no-op
    assert not record.exists()


def test_an_agent_alive_keeps_it_armed_and_the_pipe_closing_kills_it(
        parent: Cgroup, tmp_path: Path) -> None:
    record = tmp_path / "watchdog.jsonl"
    watchdog = Watchdog(parent.path, record, timeout=5)
    agent = subprocess.Popen(["sleep", "300"])
    try:
        (parent.path / "run" / "cgroup.procs").write_text(str(agent.pid))
        assert parent.populated()
        assert not watchdog.disarm(wait=False)
        assert not watchdog.disarmed
        watchdog.channel.close()  # the daemon's death, as the watchdog sees it
        assert agent.wait(timeout=60) == -9
        assert watchdog.proc.wait(timeout=60) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    [line] = record.read_text().splitlines()
    report = json.loads(line)
    assert report["confirmed_empty"] is True
    assert report["cgroup"] == str(unified_root() / parent.relative)


def test_moved_into_its_cgroup_once_settled(parent: Cgroup, tmp_path: Path) -> None:
    """settle=False (Core.assemble): the move into its own cgroup runs while the caller goes
    on; settle() returns with the process there (the handover's check agrees)."""
    watchdog = Watchdog(parent.path, tmp_path / "watchdog.jsonl", timeout=5, settle=False)
    watchdog.settle()
    assert watchdog.escape_error is None
    assert watchdog.proc.pid in watchdog.cgroup.pids()
    assert watchdog.cannot_hold() is None
    watchdog.settle()  # again: a no-op
    assert watchdog.disarm() and watchdog.proc.returncode == 0

