"""Restart without dropping agents on the docker runtime (issue 13): an orderly restart
(SIGUSR2) leaves the container running under the engine, in the run's cgroup; the next daemon
adopts it (same init, output read on from the engine's log where the old daemon stopped, with
nothing lost or doubled), learns an exit during the gap from the engine, and a container that
cannot be adopted is reaped. While no daemon holds it the watchdog's window and break-glass
kill it through its cgroup. Real daemon processes, dockerd, cgroups; needs root and dockerd."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor.sandbox.cgroups import Cgroup
from tests.conftest import require_docker
from tests.support.daemon import Daemon, engine_request, new_daemon, runtime_config, wait_for
from tests.support.procs import alive as _alive
from tests.support.procs import lasting as _lasting

# Prints a numbered line every 0.05 s: output that goes on across the handover.
TICKER = ["/bin/sh", "-c", "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.05; done"]
# Waits for /tmp/go inside its container (written from the host through /proc/<pid>/root),
# then exits 7: an exit that happens while no daemon holds the run, at a moment the test picks.
EXITS_ON_CUE = ["/bin/sh", "-c", "while [ ! -e /tmp/go ]; do sleep 0.05; done; exit 7"]


@pytest.fixture(autouse=True)
def _docker() -> None:
    require_docker()


def _daemon(tmp_root: Path, **daemon: Any) -> Daemon:
    return new_daemon(tmp_root, **runtime_config("docker"),
                      **({"daemon": daemon} if daemon else {}))


def _ticks(daemon: Daemon, name: str) -> list[int]:
    out = daemon.agentctl("logs", name, check=True).stdout
    return _numbers(out)


def _numbers(out: str) -> list[int]:
    return [int(line[5:]) for line in out.splitlines() if line.startswith("tick-")]


def _finish(daemon: Daemon) -> None:
    """A test that failed between the handover and the next start leaves the runs with the
    watchdog: a start adopts (or reaps) them, so the stop at the end kills them."""
    if daemon.proc is None or daemon.proc.poll() is not None:
        daemon.start()
    daemon.finish()


def _container(daemon: Daemon, name: str) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = engine_request("GET", f"/containers/{name}/json")["State"]
    except OSError:
        return None
    return state


def _hand_over(daemon: Daemon) -> None:
    assert daemon.stop(signal.SIGUSR2) == 0, daemon.logs()


def _handed_over(daemon: Daemon, name: str, command: list[str]) -> dict[str, Any]:
    """An agent started, then handed over; its run (with its lasting pids), alive with no
    daemon and its container running under the engine."""
    daemon.agentctl("run", "--detach", "--name", name, "--", *command, check=True)
    wait_for(lambda: len(_lasting(daemon.client.agent(name)["run"]["pid"] or 0)) == 2,
             timeout=30, what="the agent's init and its command")
    run: dict[str, Any] = daemon.client.agent(name)["run"]
    run["lasting"] = _lasting(run["pid"])
    assert set(run["lasting"]) <= set(daemon.agent_pids()), run
    _hand_over(daemon)
    assert _alive(run["lasting"]) == run["lasting"]
    state = _container(daemon, f"{daemon.prefix}-{run['id']}")
    assert state is not None and state["Running"] and state["Pid"] == run["pid"], state
    return run


def test_a_restart_keeps_a_docker_agent_and_the_next_daemon_adopts_it(tmp_root: Path) -> None:
    daemon = _daemon(tmp_root)
    daemon.start()
    try:
        daemon.agentctl("run", "--detach", "--name", "ticker", "--", *TICKER, check=True)
        daemon.agentctl("run", "--detach", "--name", "polite", "--", "/bin/sh", "-c",
                        "trap 'echo bye; exit 0' TERM; echo hello; while :; do sleep 0.1; done",
                        check=True)
        wait_for(lambda: len(_ticks(daemon, "ticker")) >= 3, timeout=30, what="output")
        wait_for(lambda: "hello" in daemon.agentctl("logs", "polite").stdout, timeout=30,
                 what="the polite agent's first line")
        run = daemon.client.agent("ticker")["run"]
        pids = _lasting(run["pid"])
        assert len(pids) == 2 and set(pids) <= set(daemon.agent_pids()), pids

        _hand_over(daemon)
        handed = daemon.root / "state" / "handover.json"
        assert handed.exists()
        log = daemon.root / "state" / "logs" / f"{run['id']}.log"
        at_handover = len(_numbers(log.read_text()))  # the log as the old daemon left it
        # No daemon: the agent runs on under the engine, in its cgroup, writing output.
        time.sleep(1.0)
        assert _lasting(run["pid"]) == pids
        assert set(pids) <= set(daemon.agent_pids())
        assert len(_numbers(log.read_text())) == at_handover  # nobody records meanwhile

        daemon.start()
        view = daemon.client.agent("ticker")
        assert view["state"] == "active", view
        assert (view["run"]["id"], view["run"]["pid"]) == (run["id"], run["pid"])
        assert _lasting(run["pid"]) == pids  # the same processes
        wait_for(lambda: len(_ticks(daemon, "ticker")) > at_handover + 30, timeout=30,
                 what="the gap's output and more after the adoption")
        ticks = _ticks(daemon, "ticker")
        # Nothing lost and nothing twice: the engine kept the gap's lines, the next daemon
        # read on from the last one the old daemon recorded.
        assert ticks == list(range(1, len(ticks) + 1)), ticks
        assert "may be missing" not in daemon.agentctl("logs", "ticker").stdout

        handover = daemon.audit_rows("daemon_handover")[-1]["detail"]
        assert run["id"] in [r["run_id"] for r in handover["runs"]]
        assert len(handover["runs"]) == 2
        assert handover["killed"] == {}
        adopted = [r for r in daemon.audit_rows("adopt") if r["target"] == "ticker"][-1]
        assert adopted["outcome"] == "ok", adopted
        detail = adopted["detail"]
        assert (detail["run"], detail["pid"], detail["runtime"]) == (run["id"], run["pid"],
                                                                     "docker")
        assert detail["runtime_state"] == "running"
        assert detail["output"]["since"] is not None
        assert not daemon.audit_rows("reap")
        assert not daemon.audit_rows("watchdog_kill")

        # A full handle again: telemetry goes on; `stop --grace` ends an agent by its SIGTERM
        # (forwarded by its init), with its last words recorded and its own exit status from
        # the engine; pause freezes the cgroup, resume thaws it, kill ends it.
        summary = daemon.client.telemetry(run["id"])["summary"]
        assert (summary["output_bytes"] or 0) > 0, summary
        polite = daemon.client.agent("polite")["run"]
        stopped = daemon.agentctl_json("stop", "polite", "--grace", "600s", "--reason", "bye")
        assert stopped["results"][0]["new_state"] == "idle", stopped
        view = daemon.client.agent("polite")
        assert (view["run"]["state"], view["run"]["exit_code"]) == ("exited", 0), view
        words = daemon.agentctl("logs", polite["id"]).stdout
        assert words.count("hello") == 1 and "bye" in words, words
        wait_for(lambda: f"run {polite['id']} cleaned up" in daemon.logs(), timeout=60,
                 what="the polite run's cleanup")
        assert _container(daemon, f"{daemon.prefix}-{polite['id']}") is None  # removed
        cgroup = daemon.cgroup_dir() / f"{daemon.prefix}-{run['id']}"
        daemon.agentctl_json("pause", "ticker", "--reason", "look")
        assert "frozen 1" in (cgroup / "cgroup.events").read_text()
        daemon.agentctl_json("resume", "ticker", "--reason", "fine")
        assert "frozen 0" in (cgroup / "cgroup.events").read_text()
        killed = daemon.agentctl_json("kill", "ticker", "--reason", "done with it")
        assert killed["results"][0]["new_state"] == "killed"
        wait_for(lambda: not _alive(pids), timeout=10, what="the agent's processes to die")
        assert daemon.client.agent("ticker")["run"]["state"] == "killed"
        kills = [r for r in daemon.audit_rows("kill") if r["target"] == "ticker"]
        assert kills and kills[-1]["new_state"] == "killed", kills
        assert daemon.settled("ticker") == {}  # the container removed, cgroup and netns gone
        assert daemon.client.audit_verify()["ok"]
    finally:
        _finish(daemon)


def test_an_exit_while_no_daemon_holds_it_is_recorded_with_the_engines_status(
        tmp_root: Path) -> None:
    daemon = _daemon(tmp_root)
    daemon.start()
    try:
        run = _handed_over(daemon, "cue", EXITS_ON_CUE)
        Path(f"/proc/{run['pid']}/root/tmp/go").touch()
        name = f"{daemon.prefix}-{run['id']}"
        wait_for(lambda: not (_container(daemon, name) or {"Running": True})["Running"],
                 timeout=30, what="the container to exit")
        assert _container(daemon, name)["ExitCode"] == 7  # type: ignore[index]
        cgroup = daemon.cgroup_dir() / name
        assert cgroup.is_dir() and "populated 0" in (cgroup / "cgroup.events").read_text()

        daemon.start()
        adopt = [r for r in daemon.audit_rows("adopt") if r["target"] == "cue"][-1]
        assert adopt["outcome"] == "failed:no_processes", adopt
        assert adopt["detail"]["exit_code"] == 7
        exits = [r for r in daemon.audit_rows("exit") if r["target"] == "cue"]
        assert exits[-1]["detail"]["exit_code"] == 7, exits
        view = daemon.client.agent("cue")
        assert (view["run"]["state"], view["run"]["exit_code"]) == ("exited", 7), view
        # Its container is removed by the start's reconcile, like any leftover.
        wait_for(lambda: _container(daemon, name) is None, timeout=30,
                 what="the exited container to be removed")
    finally:
        _finish(daemon)


def test_a_container_gone_while_no_daemon_holds_it_is_not_adopted(tmp_root: Path) -> None:
    daemon = _daemon(tmp_root)
    daemon.start()
    try:
        run = _handed_over(daemon, "gone", ["sleep", "600"])
        engine_request("DELETE", f"/containers/{daemon.prefix}-{run['id']}?force=1")
        daemon.start()
        adopt = [r for r in daemon.audit_rows("adopt") if r["target"] == "gone"][-1]
        assert adopt["outcome"] == "failed:container_missing", adopt
        view = daemon.client.agent("gone")
        assert view["run"]["state"] == "killed" and view["state"] != "active", view
        assert any(r["target"] == "gone" for r in daemon.audit_rows("reap"))
        assert not _alive(run["lasting"])
    finally:
        _finish(daemon)


def test_a_docker_run_whose_cgroup_vanished_is_reaped_not_recorded_as_its_own_exit(
        tmp_root: Path) -> None:
    daemon = _daemon(tmp_root)
    daemon.start()
    try:
        run = _handed_over(daemon, "broken", ["sleep", "600"])
        cgroup = daemon.cgroup_dir() / f"{daemon.prefix}-{run['id']}"
        (cgroup / "cgroup.kill").write_text("1")
        wait_for(lambda: "populated 0" in (cgroup / "cgroup.events").read_text(), timeout=10,
                 what="the run's cgroup to empty")
        name = f"{daemon.prefix}-{run['id']}"
        wait_for(lambda: not (_container(daemon, name) or {"Running": True})["Running"],
                 timeout=30, what="the engine to see the container end")
        wait_for(lambda: not [p for p in cgroup.iterdir() if p.is_dir()], timeout=30,
                 what="the container's own cgroup (runc's, under the run's) to go")
        cgroup.rmdir()

        daemon.start()
        adopt = [r for r in daemon.audit_rows("adopt") if r["target"] == "broken"][-1]
        assert adopt["outcome"] == "failed:cgroup_missing", adopt
        assert adopt["detail"]["exit_code"] == 137  # noted: the engine saw the SIGKILL
        view = daemon.client.agent("broken")
        assert view["run"]["state"] == "killed" and view["state"] != "active", view
        assert any(r["target"] == "broken" for r in daemon.audit_rows("reap"))
    finally:
        _finish(daemon)


def test_no_daemon_within_the_window_means_the_watchdog_kills_a_docker_run(
        tmp_root: Path) -> None:
    daemon = _daemon(tmp_root, adopt_window="2s")
    daemon.start()
    try:
        run = _handed_over(daemon, "left", ["sleep", "600"])
        wait_for(lambda: not _alive(run["lasting"]), timeout=30,
                 what="the watchdog to kill the agent after the window")
        daemon.start()
        kills = daemon.audit_rows("watchdog_kill")
        assert "adopt_window" in kills[-1]["reason"], kills
        assert kills[-1]["detail"]["confirmed_empty"] is True
        assert not daemon.audit_rows("adopt")
        assert daemon.client.agent("left")["run"]["state"] == "killed"
        wait_for(lambda: _container(daemon, f"{daemon.prefix}-{run['id']}") is None,
                 timeout=30, what="the container to be reaped")
    finally:
        _finish(daemon)


@pytest.mark.parametrize("how", ["halt_file", "sigusr1"])
def test_break_glass_kills_a_handed_over_docker_run(tmp_root: Path, how: str) -> None:
    daemon = _daemon(tmp_root, adopt_window="10m")
    daemon.start()
    try:
        run = _handed_over(daemon, "held", ["sleep", "600"])
        if how == "halt_file":
            (daemon.root / "run" / "HALT").write_text("incident\n")
        else:
            [watchdog] = Cgroup(daemon.cgroup_parent.rstrip("/") + "-watchdog").pids()
            os.kill(watchdog, signal.SIGUSR1)
        wait_for(lambda: not _alive(run["lasting"]), timeout=10,
                 what="break-glass without a daemon")
        daemon.start()
        kills = daemon.audit_rows("watchdog_kill")
        assert "break-glass" in kills[-1]["reason"], kills
        assert kills[-1]["detail"]["confirmed_empty"] is True
        assert daemon.client.agent("held")["run"]["state"] == "killed"
    finally:
        _finish(daemon)
