"""Nothing the daemon starts keeps its signal state: the daemon blocks SIGUSR1 in every thread
for break-glass, and a mask survives fork and exec. Real agents in real runc and Docker
sandboxes (and a process each starts) read their own /proc/self/status; the daemon's own
Python helper (the watchdog) is read from outside. Needs root."""

from __future__ import annotations

import re
import signal
from pathlib import Path

from tests.conftest import BOTH_RUNTIMES
from tests.support.daemon import Daemon, wait_for


def _sig_fields(text: str) -> dict[str, int]:
    return {name: int(value, 16)
            for name, value in re.findall(r"^(SigBlk|SigIgn):\s*([0-9a-f]+)$", text, re.M)}


def _run_log(daemon: Daemon, run_id: str) -> Path:
    return daemon.root / "state" / "logs" / f"{run_id}.log"


def _agent_status(daemon: Daemon, *argv: str) -> list[dict[str, int]]:
    view = daemon.agentctl_json("run", "--detach", "--", *argv)
    log = _run_log(daemon, view["id"])

    def reports() -> list[dict[str, int]] | None:
        if not log.exists():
            return None
        found = [_sig_fields(block) for block in log.read_text().split("Name:")[1:]]
        found = [fields for fields in found if len(fields) == 2]
        return found if len(found) >= argv.count("/proc/self/status") + 1 else None

    found = wait_for(reports, timeout=60, what="the agent's /proc/self/status")
    assert found is not None
    return found


@BOTH_RUNTIMES
def test_the_agent_starts_with_no_signal_blocked_or_ignored(daemon: Daemon) -> None:
    # The agent itself (cat is the container's process), and a process it starts.
    found = _agent_status(daemon, "/bin/sh", "-c",
                          "cat /proc/self/status; exec cat /proc/self/status")
    assert len(found) == 2
    for fields in found:
        assert fields == {"SigBlk": 0, "SigIgn": 0}, found


def test_the_daemons_own_helpers_start_with_no_signal_blocked(daemon: Daemon) -> None:
    # The watchdog (a Python child of the daemon) clears what it inherited.
    assert daemon.proc is not None
    children: list[int] = []
    for task in Path(f"/proc/{daemon.proc.pid}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    watchdogs = [pid for pid in children
                 if b"supervisor.daemon.watchdog" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert watchdogs, children
    # Started while the daemon blocks SIGUSR1 and, until it serves, SIGHUP, SIGUSR2, SIGTERM
    # and SIGINT (entry.py): none of them is blocked in the watchdog.
    for pid in watchdogs:
        fields = _sig_fields(Path(f"/proc/{pid}/status").read_text())
        assert fields["SigBlk"] == 0, fields
    # And the daemon itself still blocks SIGUSR1 for its break-glass thread, and no longer
    # the others (its loop's handlers take them).
    fields = _sig_fields(Path(f"/proc/{daemon.proc.pid}/status").read_text())
    assert fields["SigBlk"] & (1 << (10 - 1)), fields  # SIGUSR1 is 10
    for signum in (signal.SIGHUP, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        assert fields["SigBlk"] & (1 << (signum - 1)) == 0, (signum, fields)
