"""A restart (SIGUSR2, systemd's RestartKillSignal=) or a stop (SIGTERM) that reaches the
daemon while it is still starting, after it adopted the runs an earlier daemon handed over:
the signal waits, pending, until the loop's handlers exist, and is acted on then (the restart
hands the adopted runs on to the next daemon, the stop kills them through the audited path).
Its default action would end the daemon mid-start with the runs adopted, and its watchdog
would kill them all. The start is held at a point of the test's choosing by a runc wrapper
that waits at the self-test's `runc create` (the self-test runs after the adoption). Real
daemon processes, runc, cgroups; needs root."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, new_daemon, wait_for
from tests.support.procs import alive as _alive
from tests.support.procs import lasting as _lasting

# Waits at the self-test canary's `runc create` while the gate file is absent, saying so.
_GATED_RUNC = """#!/bin/sh
case " $* " in
  *" create "*selftest*)
    : > "{gate}.reached"
    while [ ! -e "{gate}" ]; do sleep 0.05; done ;;
esac
exec {runc} "$@"
"""


def _gated(tmp_root: Path) -> tuple[Daemon, Path]:
    runc = shutil.which("runc")
    assert runc is not None
    gate = tmp_root / "gate"
    gate.touch()
    wrapper = tmp_root / "gated-runc"
    wrapper.write_text(_GATED_RUNC.format(gate=gate, runc=runc))
    wrapper.chmod(0o755)
    daemon = new_daemon(tmp_root, daemon={"adopt_window": "10m"},
                        sandbox={"runc_path": str(wrapper)})
    return daemon, gate


def _pending(pid: int) -> int:
    """The process's shared pending signals (what a signal blocked in every thread waits in)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            return int(line.split()[1], 16)
    return 0


def _signal_while_starting(daemon: Daemon, gate: Path, signum: int) -> int:
    """Hand the runs over, start the next daemon and hold it at its self-test (after the
    adoption), send `signum`, let the start go on; the daemon's exit status."""
    assert daemon.stop(signal.SIGUSR2) == 0, daemon.logs()
    reached = gate.with_name(gate.name + ".reached")
    reached.unlink(missing_ok=True)  # the first daemon's self-test went through
    gate.unlink()
    daemon.start(ready=False)
    assert daemon.proc is not None
    wait_for(lambda: reached.exists() or daemon.proc.poll() is not None, timeout=60,
             what="the next daemon's self-test")
    assert daemon.proc.poll() is None, daemon.logs()
    assert "adopted agent held" in daemon.logs(), [
        line for line in daemon.logs().splitlines() if "adopt" in line or "handover" in line]
    os.kill(daemon.proc.pid, signum)
    # Pending, not acted on: the daemon blocks it until its loop's handlers exist.
    assert _pending(daemon.proc.pid) & (1 << (signum - 1)), daemon.logs()
    gate.touch()
    code = daemon.proc.wait(120)
    assert f"{signal.Signals(signum).name} arrived while the daemon was starting" in \
        daemon.logs()
    return code


@pytest.fixture
def held(tmp_root: Path) -> tuple[Daemon, Path, list[int], str]:
    daemon, gate = _gated(tmp_root)
    daemon.start()
    daemon.agentctl("run", "--detach", "--name", "held", "--", "sleep", "600", check=True)
    wait_for(lambda: len(_lasting(daemon.client.agent("held")["run"]["pid"] or 0)) == 2,
             timeout=30, what="the agent's init and its sleep")
    run = daemon.client.agent("held")["run"]
    return daemon, gate, _lasting(run["pid"]), run["id"]


def test_a_restart_during_the_start_hands_the_adopted_runs_on(
        held: tuple[Daemon, Path, list[int], str]) -> None:
    daemon, gate, pids, run_id = held
    try:
        assert _signal_while_starting(daemon, gate, signal.SIGUSR2) == 0, daemon.logs()
        assert _alive(pids) == pids, daemon.logs()
        assert "handing the agents over to the next daemon" in daemon.logs() or \
            "restarting: handing the agents over" in daemon.logs()

        daemon.start()
        view = daemon.client.agent("held")
        assert view["state"] == "active", view
        assert view["run"]["id"] == run_id
        assert _lasting(view["run"]["pid"]) == pids
        handovers = daemon.audit_rows("daemon_handover")
        assert len(handovers) == 2, handovers
        assert [r["run_id"] for r in handovers[-1]["detail"]["runs"]] == [run_id]
        assert [r["outcome"] for r in daemon.audit_rows("adopt")] == ["ok", "ok"]
        assert not daemon.audit_rows("watchdog_kill")
        assert not daemon.audit_rows("reap")
    finally:
        daemon.finish()


def test_a_stop_during_the_start_kills_the_adopted_runs_audited(
        held: tuple[Daemon, Path, list[int], str]) -> None:
    daemon, gate, pids, run_id = held
    try:
        assert _signal_while_starting(daemon, gate, signal.SIGTERM) == 0, daemon.logs()
        wait_for(lambda: not _alive(pids), timeout=30, what="the agent's processes to die")

        daemon.start()
        kills = [r for r in daemon.audit_rows("shutdown") if r["target"] == "held"]
        assert len(kills) == 1, kills
        assert run_id in json.dumps(kills[0]), kills
        stops = daemon.audit_rows("daemon_stop")
        assert len(stops) == 2 and "handover" not in (stops[-1]["detail"] or {}), stops
        assert not daemon.audit_rows("watchdog_kill")
        assert daemon.client.agent("held")["run"]["state"] == "killed"
    finally:
        daemon.finish()
