"""The watchdog process outlives a kill of the daemon's whole cgroup (what `systemctl kill -s
KILL` and a control-group stop do to a service) and then kills the agents itself; a new
daemon's watchdog ends an earlier one that is still around before it acts. Real cgroups on the
host's trees, a stand-in daemon process in a cgroup of its own. Needs root."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.daemon.watchdog import TRACKING, Watchdog
from supervisor.sandbox.cgroups import CGROUP_ROOT, Cgroup, sigkill, unified_root
from tests.support.daemon import TEST_CGROUP_ROOT

REPO = Path(__file__).resolve().parents[2]
# The stand-in daemon: it waits until the test has put it into the "service" cgroup, then
# starts its watchdog exactly as the daemon does, says its pid and waits to be killed.
STAND_IN = """
import sys, time
from pathlib import Path
from supervisor.daemon.watchdog import Watchdog
sys.stdin.readline()
watchdog = Watchdog(Path(sys.argv[1]), Path(sys.argv[2]), 2.0)
print(watchdog.proc.pid, flush=True)
time.sleep(600)
"""


@pytest.fixture
def tag() -> Iterator[str]:
    tag = secrets.token_hex(3)
    yield tag
    for relative in (f"{tag}/run1", tag, f"{tag}-svc", f"{tag}-watchdog"):
        with contextlib.suppress(OSError):
            Cgroup(f"{TEST_CGROUP_ROOT}/{relative}").remove()


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


def test_the_watchdog_survives_a_kill_of_the_daemons_cgroup_and_kills_the_agents(
        tag: str, tmp_path: Path) -> None:
    service = Cgroup(f"{TEST_CGROUP_ROOT}/{tag}-svc")
    parent = unified_root() / TEST_CGROUP_ROOT.strip("/") / tag
    run = Cgroup(f"{TEST_CGROUP_ROOT}/{tag}/run1")
    run.path.mkdir(parents=True)
    record = tmp_path / "watchdog.jsonl"
    agent = subprocess.Popen(["sleep", "600"])
    daemon = subprocess.Popen([sys.executable, "-c", STAND_IN, str(parent), str(record)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert daemon.stdin is not None and daemon.stdout is not None
    try:
        (run.path / "cgroup.procs").write_text(str(agent.pid))
        service.place(daemon.pid, TRACKING)  # the same trees systemd uses
        daemon.stdin.write("go\n")
        daemon.stdin.flush()
        watchdog_pid = int(daemon.stdout.readline())
        membership = Path(f"/proc/{watchdog_pid}/cgroup").read_text().splitlines()
        own = f"/{TEST_CGROUP_ROOT.strip('/')}/{tag}-watchdog"
        assert f"0::{own}" in membership, membership
        if (CGROUP_ROOT / "systemd").is_dir():
            assert any(line.endswith(f":name=systemd:{own}") for line in membership), membership

        # What systemd does to a service on `systemctl kill -s KILL`: every process it tracks
        # in the unit's cgroup gets SIGKILL.
        killed = []
        for directory in service.directories(TRACKING):
            killed += [int(p) for p in (directory / "cgroup.procs").read_text().split()]
        assert daemon.pid in killed and watchdog_pid not in killed
        for pid in killed:
            sigkill(pid)

        assert agent.wait(timeout=30) == -9
        assert _wait_gone(watchdog_pid, 30)
        [line] = record.read_text().splitlines()
        report = json.loads(line)
        assert report["runs"] == ["run1"]
        assert report["mechanism"] == "cgroup.kill", report
        assert report["confirmed_empty"] is True
        # Since the handover the channel is a socketpair, not a pipe: the record says so.
        assert report["trigger"] == ("the daemon's channel closed without an orderly "
                                     "shutdown"), report
    finally:
        for proc in (agent, daemon):
            proc.kill()
            proc.wait()
        daemon.stdin.close()
        daemon.stdout.close()


def test_a_new_watchdog_ends_an_earlier_one_still_running(tag: str, tmp_path: Path) -> None:
    parent = unified_root() / TEST_CGROUP_ROOT.strip("/") / tag
    parent.mkdir(parents=True)
    # The earlier one's daemon (this test) never goes, so it would never finish by itself.
    earlier = Watchdog(parent, tmp_path / "earlier.jsonl", 0.1)
    later = Watchdog(parent, tmp_path / "later.jsonl", 0.1)
    try:
        assert earlier.escape_error is None and later.escape_error is None
        assert later.previous() == [earlier.proc.pid]
        report = asyncio.run(later.await_previous())
        assert report["pids"] == [earlier.proc.pid]
        assert report["killed"] == [earlier.proc.pid]
        assert earlier.proc.wait(timeout=10) == -9
        assert later.previous() == []
        assert asyncio.run(later.await_previous()) == {}
        assert not (tmp_path / "earlier.jsonl").exists()  # ended, so it recorded nothing
    finally:
        earlier.disarm()
        assert later.disarm()
    assert later.proc.returncode == 0
    assert not later.cgroup.path.exists()  # the last one out removes the cgroup
