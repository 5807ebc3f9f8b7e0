"""No agent outlives its supervisor: the watchdog kills every agent when the daemon is
SIGKILLed, an orderly SIGTERM kills and audits them, and a restart reaps whatever a dead
instance left (runc containers, and docker containers found by their labels). Real daemon
processes; needs root (and dockerd for docker)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import BOTH_RUNTIMES
from tests.support.daemon import Daemon, new_daemon, runtime_config, wait_for

FORKER = "for i in $(seq 49); do sleep 600 & done; wait"


def _audit_rows(daemon: Daemon) -> list[dict[str, Any]]:
    db = sqlite3.connect(daemon.state_db)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM audit ORDER BY seq")]
    finally:
        db.close()


def _launch_forkers(daemon: Daemon, count: int) -> list[int]:
    for i in range(count):
        daemon.agentctl("run", "--detach", "--name", f"f{i}", "--", "/bin/sh", "-c", FORKER,
                        check=True)
    wait_for(lambda: len(daemon.agent_pids()) >= 50 * count, timeout=30, what="processes")
    return daemon.agent_pids()


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@BOTH_RUNTIMES
def test_sigkill_of_the_daemon_kills_every_agent_within_a_second(tmp_root: Path,
                                                                 runtime: str) -> None:
    daemon = new_daemon(tmp_root, **runtime_config(runtime))
    daemon.start()
    try:
        pids = _launch_forkers(daemon, 2)
        assert len(_alive(pids)) >= 100
        killed_at = time.monotonic()
        daemon.stop(signal.SIGKILL)
        wait_for(lambda: not _alive(pids), timeout=1.0, interval=0.01,
                 what="the watchdog to kill every agent process")
        elapsed_ms = (time.monotonic() - killed_at) * 1000
        print(f"all {len(pids)} agent processes gone {elapsed_ms:.0f} ms after SIGKILL")

        # The next instance audits what the watchdog did and reaps the leftover state.
        daemon.start()
        rows = _audit_rows(daemon)
        watchdog = [r for r in rows if r["verb"] == "watchdog_kill"]
        assert len(watchdog) == 1
        detail = json.loads(watchdog[0]["detail"])
        assert detail["confirmed_empty"] is True
        assert detail["mechanism"] == "cgroup.kill", detail
        assert len(detail["runs"]) == 2
        reaped = [r for r in rows if r["verb"] == "reap"]
        assert {r["target"] for r in reaped if r["scope"] != "global"} == {"f0", "f1"}
        states = {a["name"]: a["state"] for a in daemon.client.agents()["agents"]}
        assert states == {"f0": "idle", "f1": "idle"}
        assert daemon.clean() == {}
        assert daemon.client.audit_verify()["ok"]
    finally:
        daemon.stop()
        daemon.cleanup_host()


@BOTH_RUNTIMES
def test_restart_reaps_agents_even_when_the_watchdog_died_too(tmp_root: Path, runtime: str) -> None:
    daemon = new_daemon(tmp_root, **runtime_config(runtime))
    daemon.start()
    try:
        pids = _launch_forkers(daemon, 1)
        assert daemon.proc is not None
        watchdogs = [c for c in psutil.Process(daemon.proc.pid).children()
                     if "supervisor.daemon.watchdog" in " ".join(c.cmdline())]
        assert len(watchdogs) == 1
        # Kill daemon and watchdog in one go: the worst case, nothing left to pull the switch.
        os.kill(watchdogs[0].pid, signal.SIGSTOP)
        daemon.stop(signal.SIGKILL)
        watchdogs[0].kill()
        time.sleep(0.3)
        assert len(_alive(pids)) >= 50, "with the watchdog gone too, the agents survive..."

        daemon.start()  # ...until the next start finds and kills them
        assert _alive(pids) == []
        rows = _audit_rows(daemon)
        global_reaps = [json.loads(r["detail"]) for r in rows
                        if r["verb"] == "reap" and r["scope"] == "global"]
        assert any(r.get("confirmed_empty") for r in global_reaps), global_reaps
        assert daemon.clean() == {}
    finally:
        daemon.stop()
        daemon.cleanup_host()


def _watchdogs(daemon: Daemon) -> list[psutil.Process]:
    """The daemon's live watchdog processes (a killed one lingers as a zombie for a moment)."""
    assert daemon.proc is not None
    found = []
    for child in psutil.Process(daemon.proc.pid).children():
        try:
            if (child.status() != psutil.STATUS_ZOMBIE
                    and "supervisor.daemon.watchdog" in " ".join(child.cmdline())):
                found.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return found


def test_a_dead_watchdog_is_replaced_and_the_switch_still_works(tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        pids = _launch_forkers(daemon, 1)
        [first] = _watchdogs(daemon)
        first.kill()
        second = wait_for(lambda: [w for w in _watchdogs(daemon) if w.pid != first.pid],
                          what="a new watchdog")[0]
        rows = daemon.client.audit()["entries"]
        respawn = [r for r in rows if r["verb"] == "watchdog_respawn"]
        assert len(respawn) == 1 and respawn[0]["detail"]["new_pid"] == second.pid
        daemon.stop(signal.SIGKILL)
        wait_for(lambda: not _alive(pids), timeout=1.0, interval=0.01,
                 what="the replacement watchdog to kill every agent")
        daemon.start()
        assert daemon.clean() == {}
    finally:
        daemon.stop()
        daemon.cleanup_host()


@BOTH_RUNTIMES
def test_sigterm_is_an_orderly_shutdown_that_kills_and_audits(tmp_root: Path, runtime: str) -> None:
    daemon = new_daemon(tmp_root, **runtime_config(runtime))
    daemon.start()
    try:
        pids = _launch_forkers(daemon, 2)
        assert daemon.stop(signal.SIGTERM) == 0
        assert _alive(pids) == []
        assert daemon.clean() == {}
        rows = _audit_rows(daemon)
        shutdowns = [r for r in rows if r["verb"] == "shutdown"]
        assert sorted(r["target"] for r in shutdowns) == ["f0", "f1"]
        assert all(r["time_to_halt_ms"] is not None for r in shutdowns)
        assert rows[-1]["verb"] == "daemon_stop"
        # ...and a signed checkpoint covers it: nothing is left unanchored.
        db = sqlite3.connect(daemon.state_db)
        try:
            anchored = db.execute("SELECT MAX(seq) FROM audit_checkpoints").fetchone()[0]
        finally:
            db.close()
        assert anchored == rows[-1]["seq"]
        # Orderly: the watchdog stood down and recorded nothing.
        assert not (daemon.root / "state" / "watchdog.jsonl").exists()
    finally:
        daemon.stop()
        daemon.cleanup_host()
