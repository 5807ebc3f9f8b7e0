"""One daemon per state directory (issue 13, audit F15): a second agent-supervisord started by
hand while one runs, on the same configuration or on the same state directory with another
socket and runtime directory, is refused at once (exit 69, naming the holder) and touches
nothing: the first daemon's watchdog, sockets and agents stay, and the agent is still
killable by the first. --check-config and --halt work while it runs; a start by hand during
a restart waits for the old daemon and adopts its agents. Real daemon processes, runc,
cgroups; needs root."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from supervisor.daemon.instance import STOPPING, read_holder
from supervisor.sandbox.cgroups import Cgroup
from tests.support.daemon import REPO, Daemon, new_daemon, wait_for


def _start_by_hand(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor.daemon", "--config",
                           str(config_path), *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def _watchdogs(daemon: Daemon) -> list[int]:
    return Cgroup(daemon.cgroup_parent.rstrip("/") + "-watchdog").pids()


def _inodes(daemon: Daemon) -> dict[str, int]:
    run = daemon.root / "run"
    return {p.name: p.stat().st_ino for p in run.iterdir() if p.suffix in (".sock", ".lock")}


def _sleeper(daemon: Daemon, name: str) -> dict[str, object]:
    daemon.agentctl("run", "--detach", "--name", name, "--", "sleep", "600", check=True)
    run: dict[str, object] = wait_for(
        lambda: (r := daemon.client.agent(name)["run"]) and r["state"] == "running" and r,
        timeout=30, what="the agent running")
    return run


def _assert_untouched(daemon: Daemon, watchdogs: list[int], inodes: dict[str, int],
                      refused: subprocess.CompletedProcess[str]) -> None:
    assert refused.returncode == 69, (refused.returncode, refused.stderr)
    assert "daemon_already_running" in refused.stderr, refused.stderr
    assert daemon.proc is not None and f"pid {daemon.proc.pid}" in refused.stderr
    assert "hint:" in refused.stderr
    assert daemon.proc.poll() is None
    assert _watchdogs(daemon) == watchdogs and all(Path(f"/proc/{p}").exists()
                                                   for p in watchdogs)
    assert _inodes(daemon) == inodes
    assert daemon.client.health()


def test_a_second_daemon_on_the_same_config_is_refused_and_touches_nothing(
        tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        run = _sleeper(daemon, "held")
        watchdogs, inodes = _watchdogs(daemon), _inodes(daemon)
        assert len(watchdogs) == 1 and "control.sock" in inodes, (watchdogs, inodes)
        pids = daemon.agent_pids()
        assert pids

        refused = _start_by_hand(daemon.config_path)
        _assert_untouched(daemon, watchdogs, inodes, refused)
        assert set(pids) <= set(daemon.agent_pids())
        assert daemon.client.agent("held")["run"]["id"] == run["id"]
        starts = daemon.audit_rows("daemon_start")
        assert len(starts) == 1, starts  # the refused one wrote nothing

        killed = daemon.agentctl_json("kill", "held", "--reason", "the first still kills")
        assert killed["results"][0]["new_state"] == "killed"
        wait_for(lambda: not [p for p in pids if Path(f"/proc/{p}").exists()], timeout=10,
                 what="the agent's processes to die")
    finally:
        daemon.finish()


def test_another_socket_and_runtime_dir_on_the_same_state_dir_is_refused(
        tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        _sleeper(daemon, "held")
        watchdogs, inodes = _watchdogs(daemon), _inodes(daemon)
        pids = daemon.agent_pids()
        other_run = daemon.root / "run2"
        other = daemon.root / "other.toml"
        other.write_text(daemon.config_path.read_text().replace(
            f'runtime_dir = "{daemon.root / "run"}"',
            f'runtime_dir = "{other_run}"\nsocket_path = "{daemon.root / "other.sock"}"'))
        assert str(other_run) in other.read_text()

        refused = _start_by_hand(other)
        _assert_untouched(daemon, watchdogs, inodes, refused)
        assert "state/daemon.lock" in refused.stderr
        assert not (daemon.root / "other.sock").exists()
        assert not (other_run / "seccomp.sock").exists()
        assert set(pids) <= set(daemon.agent_pids())
        daemon.agentctl("kill", "held", "--reason", "the first still kills", check=True)
        wait_for(lambda: not [p for p in pids if Path(f"/proc/{p}").exists()], timeout=10,
                 what="the agent's processes to die")
    finally:
        daemon.finish()


def test_check_config_and_halt_work_while_the_daemon_holds_the_lock(tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        _sleeper(daemon, "held")
        pids = daemon.agent_pids()
        checked = _start_by_hand(daemon.config_path, "--check-config")
        assert checked.returncode == 0, checked.stderr

        halted = _start_by_hand(daemon.config_path, "--halt", "incident while locked")
        assert halted.returncode == 0, halted.stderr
        assert "global halt applied by the running daemon" in halted.stdout
        wait_for(lambda: not [p for p in pids if Path(f"/proc/{p}").exists()], timeout=10,
                 what="the halt to kill the agent")
        assert daemon.client.health()["global_halt"] is True
    finally:
        daemon.finish()


def test_a_start_by_hand_during_a_restart_waits_and_adopts(tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        run = _sleeper(daemon, "kept")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGUSR2)
        lock = daemon.root / "state" / "daemon.lock"
        # Marked at the signal; gone with the process (the record then names a dead pid).
        wait_for(lambda: read_holder(lock)["state"] == STOPPING or daemon.proc.poll() is not None,
                 timeout=30, what="the old daemon to stop")
        old = daemon.proc
        daemon.start()  # right away, with the old one perhaps still handing over
        assert old.wait(60) == 0, daemon.logs()
        view = daemon.client.agent("kept")
        assert view["state"] == "active" and view["run"]["id"] == run["id"], view
        assert daemon.audit_rows("daemon_adopt")[-1]["detail"]["adopted"] == [run["id"]]
        assert read_holder(lock)["pid"] == daemon.proc.pid
        daemon.agentctl("kill", "kept", "--reason", "the test is over", check=True)
    finally:
        daemon.finish()
