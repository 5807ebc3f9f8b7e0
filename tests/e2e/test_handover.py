"""Restart without dropping agents (issue 13): an orderly restart (SIGUSR2 outside systemd)
hands the running agents to the watchdog, the next daemon adopts them; with no next daemon
within [daemon] adopt_window, or on break-glass meanwhile, the watchdog kills them; a run that
is not whole any more is not adopted. Real daemon processes, runc, cgroups; needs root."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from supervisor.sandbox.abi_probe import COMPAT_CHECKS, DONE, NOTIFIED_CHECKS, PROBE
from supervisor.sandbox.cgroups import Cgroup, unified_root
from tests.support.daemon import TEST_CGROUP_ROOT, Daemon, new_daemon, wait_for
from tests.support.procs import alive as _alive
from tests.support.procs import lasting as _lasting

# Prints a numbered line every 0.1 s: output that goes on across the handover.
TICKER = ["/bin/sh", "-c", "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.1; done"]


def _ticks(daemon: Daemon, name: str) -> list[int]:
    out = daemon.agentctl("logs", name, check=True).stdout
    return [int(line[5:]) for line in out.splitlines() if line.startswith("tick-")]


def _hand_over(daemon: Daemon) -> None:
    assert daemon.stop(signal.SIGUSR2) == 0, daemon.logs()


def _sleeper_handed_over(daemon: Daemon, name: str) -> list[int]:
    """An agent that only sleeps, handed over; its processes, alive with no daemon."""
    daemon.agentctl("run", "--detach", "--name", name, "--", "sleep", "600", check=True)
    # The init (tini) and the sleep it started: not the first pids the cgroup shows, which
    # can include runc's setup processes on their way out.
    wait_for(lambda: len(_lasting(daemon.client.agent(name)["run"]["pid"] or 0)) == 2,
             timeout=30, what="the agent's init and its sleep")
    pids = _lasting(daemon.client.agent(name)["run"]["pid"])
    assert set(pids) <= set(daemon.agent_pids()), pids
    _hand_over(daemon)
    assert _alive(pids) == pids
    return pids


def test_a_restart_hands_the_agent_over_and_the_next_daemon_adopts_it(tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        daemon.agentctl("run", "--detach", "--name", "ticker", "--", *TICKER, check=True)
        wait_for(lambda: len(_ticks(daemon, "ticker")) >= 3, timeout=30, what="output")
        run = daemon.client.agent("ticker")["run"]
        run_id, pids = run["id"], _lasting(run["pid"])
        assert len(pids) == 2 and set(pids) <= set(daemon.agent_pids()), pids

        _hand_over(daemon)
        # No daemon: the agent runs on, contained in its cgroup.
        assert _lasting(run["pid"]) == pids
        assert set(pids) <= set(daemon.agent_pids())
        assert (daemon.root / "run" / "handover.sock").exists()
        time.sleep(1.0)  # the agent writes into its pipe meanwhile

        daemon.start()
        view = daemon.client.agent("ticker")
        assert view["state"] == "active", view
        assert view["run"]["id"] == run_id
        assert view["run"]["pid"] == run["pid"]
        assert _lasting(run["pid"]) == pids  # the same processes
        assert set(pids) <= set(daemon.agent_pids())
        before = _ticks(daemon, "ticker")
        wait_for(lambda: len(_ticks(daemon, "ticker")) > len(before) + 3, timeout=30,
                 what="output to go on after the adoption")
        ticks = _ticks(daemon, "ticker")
        # Nothing lost: the pipe held what the agent wrote while no daemon drained it.
        assert ticks == list(range(1, len(ticks) + 1)), ticks

        handover = daemon.audit_rows("daemon_handover")
        assert [r["run_id"] for r in handover[-1]["detail"]["runs"]] == [run_id]
        adopted = daemon.audit_rows("adopt")
        assert adopted[-1]["outcome"] == "ok"
        assert adopted[-1]["detail"]["run"] == run_id
        assert adopted[-1]["detail"]["pid"] == run["pid"]
        assert daemon.audit_rows("daemon_adopt")[-1]["detail"]["adopted"] == [run_id]
        assert not daemon.audit_rows("reap")
        assert not daemon.audit_rows("watchdog_kill")

        killed = daemon.agentctl_json("kill", "ticker", "--reason", "done with it")
        result = killed["results"][0]
        assert result["new_state"] == "killed"
        assert killed["time_to_halt_ms"] is not None
        wait_for(lambda: not _alive(pids), timeout=10, what="the agent's processes to die")
        assert daemon.client.agent("ticker")["run"]["state"] == "killed"
        assert daemon.client.audit_verify()["ok"]
    finally:
        daemon.finish()


def test_no_daemon_within_the_window_means_the_watchdog_kills_them(tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root, daemon={"adopt_window": "2s"})
    daemon.start()
    try:
        pids = _sleeper_handed_over(daemon, "left")
        wait_for(lambda: not _alive(pids), timeout=30,
                 what="the watchdog to kill the agents after the window")
        assert not (daemon.root / "run" / "handover.sock").exists()

        daemon.start()
        kills = daemon.audit_rows("watchdog_kill")
        assert "adopt_window" in kills[-1]["reason"], kills
        assert kills[-1]["detail"]["confirmed_empty"] is True
        assert not daemon.audit_rows("adopt")
        view = daemon.client.agent("left")
        assert view["state"] != "active"
        assert view["run"]["state"] == "killed"
    finally:
        daemon.finish()


@pytest.mark.parametrize("how", ["halt_file", "sigusr1"])
def test_break_glass_kills_handed_over_agents_at_once(tmp_root: Path, how: str) -> None:
    daemon = new_daemon(tmp_root, daemon={"adopt_window": "10m"})
    daemon.start()
    try:
        pids = _sleeper_handed_over(daemon, "held")
        if how == "halt_file":
            (daemon.root / "run" / "HALT").write_text("incident\n")
        else:
            watchdogs = Cgroup(daemon.cgroup_parent.rstrip("/") + "-watchdog").pids()
            assert len(watchdogs) == 1, watchdogs
            os.kill(watchdogs[0], signal.SIGUSR1)
        wait_for(lambda: not _alive(pids), timeout=10, what="break-glass without a daemon")

        daemon.start()
        kills = daemon.audit_rows("watchdog_kill")
        assert "break-glass" in kills[-1]["reason"], kills
        assert kills[-1]["detail"]["confirmed_empty"] is True
        # The HALT file stays for the next daemon, which applies it as a global halt.
        assert daemon.client.health()["global_halt"] is (how == "halt_file")
    finally:
        daemon.finish()


def test_a_run_whose_cgroup_vanished_is_not_adopted(tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        for name in ("whole", "broken"):
            daemon.agentctl("run", "--detach", "--name", name, "--", "sleep", "600", check=True)
        wait_for(lambda: len(daemon.agent_pids()) >= 2, timeout=30, what="both agents")
        broken = daemon.client.agent("broken")["run"]
        whole = daemon.client.agent("whole")["run"]
        _hand_over(daemon)
        # The broken run's cgroup goes while no daemon holds it.
        cgroup = daemon.cgroup_dir() / f"{daemon.prefix}-{broken['id']}"
        (cgroup / "cgroup.kill").write_text("1")
        wait_for(lambda: "populated 0" in (cgroup / "cgroup.events").read_text(), timeout=10,
                 what="the broken run's cgroup to empty")
        cgroup.rmdir()

        daemon.start()
        adopts = {r["detail"]["run"]: r for r in daemon.audit_rows("adopt")}
        assert adopts[whole["id"]]["outcome"] == "ok"
        assert adopts[broken["id"]]["outcome"] == "failed:cgroup_missing"
        # Its init's end is known (SIGKILL by cgroup.kill) but was not its own doing: noted,
        # and the run is reaped, its agent held, as any run whose cgroup vanished.
        assert adopts[broken["id"]]["detail"]["exit_code"] == 137
        assert daemon.client.agent("whole")["state"] == "active"
        broken_view = daemon.client.agent("broken")
        assert broken_view["run"]["state"] == "killed"
        assert broken_view["state"] != "active"
        assert any(r["target"] == "broken" for r in daemon.audit_rows("reap"))
        daemon.agentctl_json("kill", "whole", "--reason", "end of test")
    finally:
        daemon.finish()


def test_a_paused_run_stays_paused_and_a_window_keeps_its_time(tmp_root: Path) -> None:
    """What a run carries across the handover: its pause (still frozen, resumable) and its
    execution window (re-armed with the time left, so it still ends on time)."""
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        daemon.agentctl("run", "--detach", "--name", "paused", "--", "sleep", "600", check=True)
        daemon.agentctl("run", "--detach", "--name", "windowed", "--timeout", "20s", "--",
                        "sleep", "600", check=True)
        wait_for(lambda: len(daemon.agent_pids()) >= 2, timeout=30, what="both agents")
        daemon.agentctl_json("pause", "paused", "--reason", "looks wrong")
        _hand_over(daemon)
        daemon.start()
        assert {r["target"]: r["outcome"] for r in daemon.audit_rows("adopt")} == {
            "paused": "ok", "windowed": "ok"}
        view = daemon.client.agent("paused")
        assert (view["state"], view["run"]["state"]) == ("paused", "paused")
        cgroup = daemon.cgroup_dir() / f"{daemon.prefix}-{view['run']['id']}"
        assert "frozen 1" in (cgroup / "cgroup.events").read_text()
        resumed = daemon.agentctl_json("resume", "paused", "--reason", "checked")
        assert resumed["results"][0]["new_state"] == "active"
        assert "frozen 0" in (cgroup / "cgroup.events").read_text()

        left = daemon.audit_rows("adopt")
        windowed = next(r for r in left if r["target"] == "windowed")
        assert 0 < windowed["detail"]["timeout_left_s"] < 20
        wait_for(lambda: daemon.client.agent("windowed")["run"]["state"] != "running",
                 timeout=40, what="the execution window to end the adopted run")
        assert "execution window of 20s expired" in daemon.client.agent("windowed")["run"][
            "end_reason"]
        daemon.agentctl_json("kill", "paused", "--reason", "end of test")
    finally:
        daemon.finish()


def test_no_handover_to_a_watchdog_outside_its_cgroup(tmp_root: Path) -> None:
    """A watchdog left in the daemon's cgroup dies with the daemon's unit (systemd's
    KillMode=mixed kills what is left once the daemon exits), so the handed-over agents would
    have no killer: the restart kills every run through the kill path instead, audited with
    why, and the watchdog stands down as at a stop."""
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        daemon.agentctl("run", "--detach", "--name", "kept", "--", "sleep", "600", check=True)
        wait_for(daemon.agent_pids, timeout=30, what="the agent to run")
        pids_before = daemon.agent_pids()
        run_id = daemon.client.agent("kept")["run"]["id"]
        [watchdog] = Cgroup(daemon.cgroup_parent.rstrip("/") + "-watchdog").pids()
        # Where a failed escape leaves it: outside its own cgroup (here, this test's).
        own = Path("/proc/self/cgroup").read_text().splitlines()
        [mine] = [line.split("::", 1)[1] for line in own if line.startswith("0::")]
        (unified_root() / mine.strip("/") / "cgroup.procs").write_text(str(watchdog))

        _hand_over(daemon)
        assert not _alive(pids_before)
        assert not (daemon.root / "run" / "handover.sock").exists()
        wait_for(lambda: not _alive([watchdog]), timeout=30, what="the watchdog to stand down")

        daemon.start()
        [handover] = daemon.audit_rows("daemon_handover")
        assert f"pid {watchdog}" in handover["detail"]["refused"]
        assert handover["detail"]["runs"] == []
        assert run_id in handover["detail"]["killed"]
        kills = [r for r in daemon.audit_rows("shutdown") if r["target"] == "kept"]
        assert kills and "not in its cgroup" in kills[-1]["reason"], kills
        assert daemon.client.agent("kept")["run"]["state"] == "killed"
        assert not daemon.audit_rows("adopt") and not daemon.audit_rows("watchdog_kill")
    finally:
        daemon.finish()


# Ends with `code` on SIGUSR1 (after the `sleep` under way); until then it waits.
def _exits_on_usr1(code: int) -> list[str]:
    return ["/bin/sh", "-c", f"trap 'exit {code}' USR1; while :; do sleep 0.1; done"]


def _shell_of(init: int) -> int:
    [shell] = _lasting(init)[1:]
    return shell


def test_an_adopted_runs_exit_status_is_its_own(tmp_root: Path) -> None:
    """Its init is not the next daemon's child, so waitpid there finds nothing: the status
    comes from the kernel's process exit events, through a socket the previous daemon opened
    before it stopped watching and handed over with the runs. Docker's codes: its own exit
    code, 143 after SIGTERM, 137 after SIGKILL; and a run that exits while no daemon holds it
    is recorded exited with its code, not reaped."""
    daemon = new_daemon(tmp_root)
    # Under a cgroup root of its own: every test session's end removes the empty cgroups under
    # the shared one, and the run that exits while handed over has an empty cgroup until the
    # next daemon starts (removed, it would be a run whose cgroup vanished: reaped).
    private = Cgroup(f"{TEST_CGROUP_ROOT}-exits-{daemon.prefix}")
    daemon.cgroup_parent = f"/{private.relative.strip('/')}/{daemon.prefix}"
    daemon.start()
    try:
        daemon.agentctl("run", "--detach", "--name", "three", "--", *_exits_on_usr1(3),
                        check=True)
        daemon.agentctl("run", "--detach", "--name", "meanwhile", "--",
                        *_exits_on_usr1(7), check=True)
        for name in ("termed", "killed"):
            daemon.agentctl("run", "--detach", "--name", name, "--", "sleep", "600",
                            check=True)
        wait_for(lambda: all(len(_lasting(daemon.client.agent(n)["run"]["pid"])) == 2
                             for n in ("three", "meanwhile", "termed", "killed")),
                 timeout=30, what="the four agents")
        inits = {n: daemon.client.agent(n)["run"]["pid"]
                 for n in ("three", "meanwhile", "termed", "killed")}
        runs = {n: daemon.client.agent(n)["run"]["id"] for n in inits}
        _hand_over(daemon)
        # While no daemon holds it, one run ends by itself: its init is reaped by whoever
        # inherits it, and its status waits in the handed-over socket.
        os.kill(_shell_of(inits["meanwhile"]), signal.SIGUSR1)
        wait_for(lambda: not _alive([inits["meanwhile"]]), timeout=10,
                 what="the run to exit while handed over")

        daemon.start()
        adopts = {r["target"]: r for r in daemon.audit_rows("adopt")}
        assert {n: adopts[n]["outcome"] for n in ("three", "termed", "killed")} == {
            "three": "ok", "termed": "ok", "killed": "ok"}, adopts
        assert adopts["three"]["detail"]["exit_status"] == \
            "from the kernel's process exit events"
        assert adopts["meanwhile"]["outcome"].startswith("failed:"), adopts["meanwhile"]
        assert adopts["meanwhile"]["detail"]["exit_code"] == 7
        meanwhile = daemon.client.agent("meanwhile")["run"]
        assert (meanwhile["id"], meanwhile["state"], meanwhile["exit_code"]) == (
            runs["meanwhile"], "exited", 7), meanwhile
        assert daemon.audit_rows("daemon_adopt")[-1]["detail"]["exit_events"] == "handed over"

        os.kill(_shell_of(inits["three"]), signal.SIGUSR1)
        os.kill(_shell_of(inits["termed"]), signal.SIGTERM)  # tini: 128 + SIGTERM
        os.kill(inits["killed"], signal.SIGKILL)  # the init itself: 128 + SIGKILL
        for name in ("three", "termed", "killed"):
            wait_for(lambda name=name: daemon.client.agent(name)["run"]["state"] != "running",
                     timeout=30, what=f"{name} to end")
        codes = {n: daemon.client.agent(n)["run"] for n in ("three", "termed", "killed")}
        assert {n: (r["id"], r["state"], r["exit_code"]) for n, r in codes.items()} == {
            "three": (runs["three"], "exited", 3), "termed": (runs["termed"], "exited", 143),
            "killed": (runs["killed"], "exited", 137)}, codes
        exits = {r["target"]: r["detail"] for r in daemon.audit_rows("exit")}
        assert {n: exits[n]["exit_code"] for n in inits} == {
            "three": 3, "meanwhile": 7, "termed": 143, "killed": 137}, exits
        assert not any("exit_status" in d for d in exits.values()), exits
        assert not any(r["target"] == "meanwhile" for r in daemon.audit_rows("reap"))
        assert daemon.client.audit_verify()["ok"]
    finally:
        try:
            daemon.finish()
        finally:
            private.remove(strict=False)


def test_an_adopted_runs_compat_calls_are_counted(tmp_root: Path) -> None:
    """The calls the kernel kills at the filter's architecture check (i386 `int 0x80`, x32)
    are counted from the kernel's audit records by the run's audit session, found from its
    init: adopted with the init's pid, so an adopted run's are counted as a launched run's
    are (with its notify fd's refusals). The probe runs only once the run is adopted."""
    probe_on_usr1 = ["/bin/sh", "-c",
                     "trap '/usr/bin/python3 -c \"$0\"' USR1; while :; do sleep 0.1; done",
                     PROBE]
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        daemon.agentctl("run", "--detach", "--name", "prober", "--", *probe_on_usr1,
                        check=True)
        wait_for(lambda: len(_lasting(daemon.client.agent("prober")["run"]["pid"])) == 2,
                 timeout=30, what="the agent")
        init = daemon.client.agent("prober")["run"]["pid"]
        _hand_over(daemon)
        daemon.start()
        [adopted] = daemon.audit_rows("adopt")
        assert (adopted["outcome"], adopted["detail"]["seccomp_fds"]) == ("ok", 1), adopted
        os.kill(_shell_of(init), signal.SIGUSR1)
        wait_for(lambda: DONE in daemon.agentctl("logs", "prober", check=True).stdout,
                 timeout=60, what="the probe to finish")
        expected = len(NOTIFIED_CHECKS) + len(COMPAT_CHECKS)

        def attempts() -> object:
            summary = daemon.agentctl_json("telemetry", "prober").get("summary") or {}
            return summary.get("syscall_attempts")

        wait_for(lambda: attempts() == expected, timeout=20,
                 what=f"{expected} attempts ({len(COMPAT_CHECKS)} of them killed compat "
                      f"calls) in the adopted run's telemetry")
        daemon.agentctl_json("kill", "prober", "--reason", "end of test")
    finally:
        daemon.finish()


def test_a_tripwire_mid_window_fires_on_time_after_the_restart(tmp_root: Path) -> None:
    """Auto-containment counts consecutive violating samples; a restart in the middle of the
    count carries it (daemon_handover says where it was), so the adopted run is contained
    after the samples it still lacked, not after a whole new window, and the alert that
    opened the window is not raised again."""
    threshold = 60
    daemon = new_daemon(tmp_root)
    (daemon.root / "profiles" / "watchful.toml").write_text(
        f"[tripwires]\nauto_containment_threshold = {threshold}\n"
        "[[tripwires.rules]]\nname = \"alive\"\nmetric = \"processes\"\nabove = 0\n"
        "action = \"alert\"\n")
    daemon.start()
    try:
        daemon.agentctl("run", "--detach", "--name", "watched", "--profile", "watchful", "--",
                        "sleep", "600", check=True)
        wait_for(lambda: len(daemon.agentctl_json("telemetry", "watched", "--limit", "100")
                             ["samples"]) >= 10, timeout=30, what="10 samples")
        _hand_over(daemon)
        daemon.start()
        [handed] = daemon.audit_rows("daemon_handover")[-1]["detail"]["runs"]
        before = handed["tripwires"]["consecutive"]
        assert 10 <= before < threshold, handed
        assert handed["tripwires"]["disarmed"] == ["alive"]
        wait_for(lambda: daemon.client.agent("watched")["state"] == "paused", timeout=60,
                 what="auto-containment of the adopted run")
        rows = [r for r in daemon.audit_rows("tripwire") if r["target"] == "watched"]
        assert [r["outcome"] for r in rows] == ["alert", "pause"], rows
        contain = rows[1]["detail"]
        assert contain["auto_containment"] is True
        samples = daemon.agentctl_json("telemetry", "watched", "--limit", "1000")["samples"]
        handed_at = daemon.audit_rows("daemon_handover")[-1]["ts"]
        after = [s for s in samples if handed_at < s["ts"] <= contain["sample_ts"]]
        # The adopting daemon's samples up to the containment: exactly those it lacked (the
        # window holds the previous daemon's too, carried over).
        assert len(after) == threshold - before, (len(after), before)
        pause = next(r for r in daemon.audit_rows("pause") if r["target"] == "watched")
        assert pause["reason"].startswith(
            f"auto-containment after {threshold} consecutive violations"), pause
        daemon.agentctl_json("kill", "watched", "--reason", "end of test")
    finally:
        daemon.finish()


def test_syscall_attempts_before_the_restart_count_toward_a_tripwire_after_it(
        tmp_root: Path) -> None:
    """A count that crosses its line only with the attempts made before the restart: the
    adopted run is killed at the third, two of which the previous daemon counted."""
    attempt_on_usr1 = ["/bin/sh", "-c",
                       "trap '/usr/bin/python3 -c \"$0\"' USR1; while :; do sleep 0.1; done",
                       "import socket\ntry:\n    socket.socket(40, 1)\nexcept OSError:\n"
                       "    print('refused', flush=True)\n"]
    daemon = new_daemon(tmp_root)
    daemon.start()

    def attempts() -> object:
        summary = daemon.agentctl_json("telemetry", "tried").get("summary") or {}
        return summary.get("syscall_attempts")

    try:
        daemon.agentctl("run", "--detach", "--name", "tried", "--tripwire",
                        "esc:syscall_attempts>2:kill", "--", *attempt_on_usr1, check=True)
        wait_for(lambda: len(_lasting(daemon.client.agent("tried")["run"]["pid"])) == 2,
                 timeout=30, what="the agent")
        shell = _shell_of(daemon.client.agent("tried")["run"]["pid"])
        for n in (1, 2):
            os.kill(shell, signal.SIGUSR1)
            wait_for(lambda n=n: attempts() == n, timeout=30, what=f"attempt {n} counted")
        _hand_over(daemon)
        daemon.start()
        assert daemon.client.agent("tried")["state"] == "active"
        assert attempts() == 2  # carried, not started again at zero
        os.kill(shell, signal.SIGUSR1)
        wait_for(lambda: daemon.client.agent("tried")["state"] == "killed", timeout=30,
                 what="the tripwire to kill the adopted run at its third attempt")
        [fired] = [r for r in daemon.audit_rows("tripwire") if r["target"] == "tried"]
        assert (fired["outcome"], fired["detail"]["rule"], fired["detail"]["value"]) == (
            "kill", "esc", 3), fired
    finally:
        daemon.finish()


def test_telemetry_after_the_adoption_shows_the_samples_from_before_the_restart(
        tmp_root: Path) -> None:
    """The sampler's window goes with the run (bounded, in the handover record): `agentctl
    telemetry` right after the adoption shows what the previous daemon sampled."""
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        daemon.agentctl("run", "--detach", "--name", "sampled", "--", "sleep", "600",
                        check=True)
        wait_for(lambda: len(daemon.agentctl_json("telemetry", "sampled", "--limit", "100")
                             ["samples"]) >= 5, timeout=30, what="5 samples")
        _hand_over(daemon)
        daemon.start()
        handed_at = daemon.audit_rows("daemon_handover")[-1]["ts"]
        samples = daemon.agentctl_json("telemetry", "sampled", "--limit", "1000")["samples"]
        before = [s for s in samples if s["ts"] < handed_at]
        assert len(before) >= 5, samples
        assert all(s["processes"] >= 1 for s in before)
        assert [s["ts"] for s in samples] == sorted(s["ts"] for s in samples)
        wait_for(lambda: any(s["ts"] > handed_at for s in daemon.agentctl_json(
            "telemetry", "sampled", "--limit", "1000")["samples"]), timeout=30,
            what="a sample of the adopting daemon after those carried")
        daemon.agentctl_json("kill", "sampled", "--reason", "end of test")
    finally:
        daemon.finish()
