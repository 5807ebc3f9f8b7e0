"""A restart's handover at the edges the review found (issue 13): a record larger than one
datagram (many runs, each with the most tripwires a run may carry) is handed over and
adopted whole; SIGUSR1 kills every agent at each moment of a restart where it used to be
lost or to wait (the stopping daemon after its break-glass ended, the next daemon before its
break-glass starts). Real daemon processes, runc, cgroups; needs root."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from tests.support.daemon import Daemon, new_daemon, wait_for
from tests.support.procs import alive as _alive

# One datagram of the handover channel holds at most ~208 KiB (the socket's send buffer);
# 30 runs with 64 tripwires of the longest name each make a record well past that.
RUNS = 30
TRIPWIRES = [f"{n:02d}{'t' * 61}:memory_bytes>1e30" for n in range(64)]


def test_a_record_larger_than_a_datagram_is_handed_over_whole(tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        flags = [arg for spec in TRIPWIRES for arg in ("--tripwire", spec)]
        for n in range(RUNS):
            daemon.agentctl("run", "--detach", "--name", f"many-{n:02d}", *flags, "--",
                            "sleep", "600", check=True)
        wait_for(lambda: len(daemon.agent_pids()) >= RUNS, timeout=120, what="every agent")
        runs = {daemon.client.agent(f"many-{n:02d}")["run"]["id"] for n in range(RUNS)}
        pids = sorted(daemon.agent_pids())

        assert daemon.stop(signal.SIGUSR2) == 0, daemon.logs()
        record = (daemon.root / "state" / "handover.json").read_bytes()
        # More than one datagram could hold (the default send buffer, wmem_default).
        assert len(record) > int(Path("/proc/sys/net/core/wmem_default").read_text()), \
            len(record)
        assert len(json.loads(record)["runs"]) == RUNS
        [handover] = _rows_after_start(daemon, "daemon_handover")
        assert {r["run_id"] for r in handover["detail"]["runs"]} == runs
        assert handover["detail"]["killed"] == {}
        adopted = [r for r in daemon.audit_rows("adopt") if r["outcome"] == "ok"]
        assert {r["detail"]["run"] for r in adopted} == runs
        assert sorted(daemon.agent_pids()) == pids  # the same processes run on
        assert not daemon.audit_rows("reap") and not daemon.audit_rows("watchdog_kill")
        view = daemon.client.agent("many-00")
        assert view["state"] == "active"
        daemon.agentctl_json("kill", "--all", "--reason", "end of test")
    finally:
        daemon.finish()


def _rows_after_start(daemon: Daemon, verb: str) -> list[dict[str, Any]]:
    daemon.start()
    return daemon.audit_rows(verb)


# Starts the daemon with SIGUSR1 blocked and already pending, as a signal sent in its first
# moments is: before anything of it could have taken it.
PENDING = ("import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1}); "
           "os.kill(os.getpid(), signal.SIGUSR1); os.execv(sys.argv[1], sys.argv[1:])")


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def test_sigusr1_while_the_daemon_hands_over_kills_every_agent(tmp_root: Path) -> None:
    """After the stopping daemon's break-glass has ended (it hands over from then on) and
    before it exits, SIGUSR1 was left pending and lost at the exit; the agents ran on with
    the watchdog. Now it kills them through the parent's cgroup.kill and leaves the HALT
    file: the watchdog records it and the next daemon applies it as a global halt."""
    daemon = new_daemon(tmp_root, daemon={"adopt_window": "10m"})
    daemon.start()
    try:
        daemon.agentctl("run", "--detach", "--name", "held", "--", "sleep", "600", check=True)
        wait_for(daemon.agent_pids, timeout=30, what="the agent to run")
        pids = daemon.agent_pids()
        assert daemon.proc is not None
        old = daemon.proc.pid
        daemon.proc.send_signal(signal.SIGUSR2)
        # The socket is made after break-glass has stopped, and well before the exit.
        wait_for((daemon.root / "run" / "handover.sock").exists, timeout=30, interval=0.002,
                 what="the handover to start")
        os.kill(old, signal.SIGSTOP)
        try:
            state = wait_for(lambda: _state(old) if _state(old) in "TZ" else None,
                             timeout=30, interval=0.001, what="the daemon to stop")
            assert state == "T", "the daemon had exited already: no moment to test"
            os.kill(old, signal.SIGUSR1)
        finally:
            os.kill(old, signal.SIGCONT)
        wait_for(lambda: not _alive(pids), timeout=30, what="break-glass during the handover")
        assert daemon.proc.wait(60) == 0
        assert "while it was starting or stopping" in (daemon.root / "run" / "HALT").read_text()

        daemon.start()
        assert daemon.client.health()["global_halt"] is True
        [glass] = daemon.audit_rows("break_glass")
        assert f"SIGUSR1 to the daemon (pid {old})" in glass["reason"]
        kills = daemon.audit_rows("watchdog_kill")
        assert kills and "break-glass" in kills[-1]["reason"], kills
        assert not [r for r in daemon.audit_rows("adopt") if r["outcome"] == "ok"]
    finally:
        daemon.finish()


def test_sigusr1_before_the_next_daemons_break_glass_kills_every_agent(tmp_root: Path) -> None:
    """A SIGUSR1 the next daemon gets before its break-glass starts waited, pending, until
    then: the runs were adopted first and ran on meanwhile (through the adoption, the
    reconcile, the self-test). Now it kills them at once, before anything is adopted, and
    the start applies the HALT file it left as a global halt."""
    daemon = new_daemon(tmp_root, daemon={"adopt_window": "10m"})
    daemon.start()
    try:
        daemon.agentctl("run", "--detach", "--name", "held", "--", "sleep", "600", check=True)
        wait_for(daemon.agent_pids, timeout=30, what="the agent to run")
        pids = daemon.agent_pids()
        assert daemon.stop(signal.SIGUSR2) == 0, daemon.logs()
        assert _alive(pids) == pids

        daemon.launcher = [sys.executable, "-c", PENDING]
        daemon.start()
        assert daemon.proc is not None
        wait_for(lambda: not _alive(pids), timeout=30, what="break-glass at the start")
        assert not [r for r in daemon.audit_rows("adopt") if r["outcome"] == "ok"]
        assert daemon.client.health()["global_halt"] is True
        [glass] = daemon.audit_rows("break_glass")
        assert f"SIGUSR1 to the daemon (pid {daemon.proc.pid})" in glass["reason"]
    finally:
        daemon.launcher = []
        daemon.finish()
