"""The breaker trips by itself: real misbehaving workloads (stress-ng from Debian, and a script
that calls forbidden syscalls in a loop) inside real sandboxes trip the right tripwire, and the
agent is paused or killed by actor system:tripwire with the rule's name in the audit. Needs
root, runc and stress-ng."""

from __future__ import annotations

import shutil
from typing import Any

import pytest

from tests.conftest import require
from tests.support.daemon import Daemon, wait_for

FORBIDDEN_LOOP = r"""
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
print("start", time.time(), flush=True)
while True:
    libc.unshare(0x10000000)   # CLONE_NEWUSER: denied and reported
    time.sleep(0.01)
"""


@pytest.fixture(autouse=True)
def _stress_ng() -> None:
    require(shutil.which("stress-ng") is not None, "needs stress-ng (apt-get install stress-ng)")


def _audit(daemon: Daemon) -> list[dict[str, Any]]:
    return list(daemon.client.audit(limit=10_000)["entries"])


def _state(daemon: Daemon, name: str) -> str:
    return str(daemon.client.agent(name)["state"])


def _tripped(daemon: Daemon, name: str, rule: str, verb: str) -> dict[str, Any]:
    """The tripwire row and the pause/kill row it caused, both naming the rule. The agent's
    state changes at the start of the kill path; its audit row follows the confirmed halt."""
    wait_for(lambda: any(r["target"] == name and r["verb"] == verb for r in _audit(daemon)),
             timeout=30, what=f"the {verb} of {name} in the audit")
    rows = [r for r in _audit(daemon) if r["target"] == name]
    fired = [r for r in rows if r["verb"] == "tripwire" and r["detail"]["rule"] == rule]
    assert fired, rows
    assert fired[0]["actor"] == "system:tripwire"
    acted = [r for r in rows if r["verb"] == verb and r["outcome"] == "ok"]
    assert acted, rows
    assert acted[0]["actor"] == "system:tripwire"
    assert f"tripwire {rule}" in acted[0]["reason"]
    return fired[0]


def test_memory_hog_is_killed(daemon: Daemon) -> None:
    daemon.agentctl("run", "--detach", "--name", "hog", "--tripwire",
                    "mem:memory_bytes>150M:kill", "--", "stress-ng", "--vm", "1",
                    "--vm-bytes", "400M", "--vm-keep", "--timeout", "120s", check=True)
    wait_for(lambda: _state(daemon, "hog") == "killed", timeout=60, what="the memory tripwire")
    fired = _tripped(daemon, "hog", "mem", "kill")
    assert fired["detail"]["value"] > 150 * 1024**2
    wait_for(lambda: daemon.residue() == {}, what="cleanup")


def test_fork_storm_is_killed(daemon: Daemon) -> None:
    # A storm that keeps what it forks: each child lives, so the count the sampler reads climbs
    # past the limit whatever the machine's load. (stress-ng's fork stressor reaps its children at
    # once: its live count seldom passed 64 on a loaded host, so the tripwire had nothing to see.)
    daemon.agentctl("run", "--detach", "--name", "storm", "--tripwire",
                    "fork:processes>64:kill", "--", "/bin/sh", "-c",
                    "i=0; while [ $i -lt 400 ]; do sleep 600 & i=$((i+1)); done; wait",
                    check=True)
    wait_for(lambda: _state(daemon, "storm") == "killed", timeout=60, what="the fork tripwire")
    fired = _tripped(daemon, "storm", "fork", "kill")
    assert fired["detail"]["value"] > 64
    wait_for(lambda: daemon.residue() == {}, what="cleanup")


def test_cpu_burn_is_auto_contained_by_pause(daemon: Daemon) -> None:
    (daemon.root / "profiles" / "watchful.toml").write_text(
        "[tripwires]\nauto_containment_threshold = 3\n"
        "[[tripwires.rules]]\nname = \"cpu\"\nmetric = \"cpu_percent\"\nabove = 60\n"
        "action = \"alert\"\n")
    daemon.agentctl("run", "--detach", "--name", "burner", "--profile", "watchful", "--",
                    "stress-ng", "--cpu", "1", "--timeout", "120s", check=True)
    wait_for(lambda: _state(daemon, "burner") == "paused", timeout=60,
             what="auto-containment")
    rows = [r for r in _audit(daemon) if r["target"] == "burner"]
    alert = [r for r in rows if r["verb"] == "tripwire" and r["outcome"] == "alert"]
    contain = [r for r in rows if r["verb"] == "tripwire" and r["outcome"] == "pause"]
    assert alert and contain
    assert contain[0]["detail"]["auto_containment"] is True
    pause = next(r for r in rows if r["verb"] == "pause")
    assert pause["actor"] == "system:tripwire"
    assert pause["reason"].startswith("auto-containment after 3 consecutive violations")
    assert "tripwire cpu: cpu_percent" in pause["reason"]
    daemon.agentctl("kill", "burner", "--reason", "test over", check=True)


def test_forbidden_syscall_loop_is_killed_at_the_first_attempt(daemon: Daemon) -> None:
    daemon.agentctl("run", "--detach", "--name", "escaper", "--tripwire",
                    "escape:syscall_attempts>0:kill", "--", "/usr/bin/python3", "-c",
                    FORBIDDEN_LOOP, check=True)
    wait_for(lambda: _state(daemon, "escaper") == "killed", timeout=30,
             what="the syscall tripwire")
    fired = _tripped(daemon, "escaper", "escape", "kill")
    assert fired["detail"]["syscall"]["name"] == "unshare"
    # The listener hands the loop a container's first attempt alone, never folded into the
    # ones after it, so the tripwire fires on that attempt however busy the loop was.
    assert fired["detail"]["value"] == 1
    firings = [r for r in _audit(daemon) if r["target"] == "escaper" and r["verb"] == "tripwire"]
    assert len(firings) == 1, firings
    wait_for(lambda: daemon.residue() == {}, what="cleanup")


def test_the_strict_profile_kills_an_escape_attempt(daemon: Daemon) -> None:
    daemon.agentctl("run", "--detach", "--name", "strict", "--profile", "strict", "--",
                    "/bin/sh", "-c", "sleep 0.3; unshare -U true; sleep 600", check=True)
    wait_for(lambda: _state(daemon, "strict") == "killed", timeout=30, what="strict profile")
    _tripped(daemon, "strict", "escape-attempt", "kill")
