"""The daemon under a systemd-like environment (NOTIFY_SOCKET on a real datagram socket,
WATCHDOG_USEC, LISTEN_*, INVOCATION_ID, CREDENTIALS_DIRECTORY and secret-looking variables):
it speaks sd_notify (READY, STATUS, WATCHDOG heartbeats, RELOADING on SIGHUP, STOPPING), and
none of those variables reaches runc, the watchdog process or an agent. Needs root and runc."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.sandbox.cgroups import unified_root
from tests.support.daemon import Daemon, new_daemon, wait_for

# What the daemon's environment holds beyond an ordinary shell's: each must stay with it.
DAEMON_ONLY = {
    "WATCHDOG_USEC": "2000000",
    "LISTEN_FDS": "1",
    "LISTEN_PID": "1",
    "LISTEN_FDNAMES": "control",
    "INVOCATION_ID": "0123456789abcdef0123456789abcdef",
    "CREDENTIALS_DIRECTORY": "/run/credentials/agent-supervisor.service",
    "AGENT_SUPERVISOR_TEST_API_TOKEN": "sk-live-hunter2",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
}


class NotifySocket:
    """A systemd-like notification socket: every datagram the daemon sends, in order."""

    def __init__(self, path: str, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.address = ("\0" + path) if abstract else path
        self.env_value = ("@" + path) if abstract else path
        self.sock.bind(self.address)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def fields(self) -> list[str]:
        return [line for message in self.drain() for line in message.split("\n")]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    abstract = request.param == "abstract"
    name = f"as-test-notify-{os.getpid()}-{time.monotonic_ns()}" if abstract else str(
        tmp_path / "notify.sock")
    sock = NotifySocket(name, abstract)
    yield sock
    sock.close()


def runc_recorder(directory: Path) -> Path:
    """A runc that writes its arguments and its own environment to files, then is runc. The
    environment's file is renamed into place whole: a runc the daemon runs after a run's
    answer (its cleanup) may be starting while the test reads the records, and must not show
    as an empty one."""
    found = shutil.which("runc")
    assert found is not None
    real = Path(found).resolve()
    script = directory / "runc-recorder"
    script.write_text(f"#!/bin/sh\ncat /proc/$$/environ > {directory}/.runc-env.$$\n"
                      f"printf '%s\\n' \"$@\" > {directory}/runc-args.$$\n"
                      f"mv {directory}/.runc-env.$$ {directory}/runc-env.$$\n"
                      f"exec {real} \"$@\"\n")
    script.chmod(0o755)
    directory.chmod(directory.stat().st_mode | stat.S_IXOTH)
    return script


def environ_names(raw: bytes | str) -> set[str]:
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return {item.split("=", 1)[0] for item in text.split("\0") if "=" in item}


def start(daemon: Daemon, notify: NotifySocket) -> None:
    daemon.env = {**os.environ, **DAEMON_ONLY, "NOTIFY_SOCKET": notify.env_value}
    daemon.start(timeout=90)


def test_no_daemon_environment_reaches_runc_watchdog_or_agent(tmp_root: Path,
                                                                notify: NotifySocket) -> None:
    record_dir = tmp_root / "runc-env"
    record_dir.mkdir()
    daemon = new_daemon(tmp_root, sandbox={"runc_path": str(runc_recorder(record_dir))})
    start(daemon, notify)
    try:
        forbidden = {*DAEMON_ONLY, "NOTIFY_SOCKET", "WATCHDOG_PID", "JOURNAL_STREAM"}
        result = daemon.agentctl("run", "--name", "environ", "--", "cat", "/proc/self/environ",
                                 check=True)
        agent = environ_names(result.stdout)
        assert "AGENT_SUPERVISOR_RUN" in agent  # it is the agent's environment
        assert not agent & forbidden
        # The self-test and this run each ran `runc create` (their start reads the exec fifo
        # and a stopped container's delete removes its state: no runc process for either):
        # every invocation had a clean environment.
        records = list(record_dir.glob("runc-env.*"))
        creates = [args for args in record_dir.glob("runc-args.*")
                   if "create" in args.read_text().split("\n")]
        assert len(creates) >= 2, sorted(p.read_text() for p in record_dir.glob("runc-args.*"))
        assert len(records) >= len(creates)
        for record in records:
            names = environ_names(record.read_bytes())
            assert "PATH" in names
            assert not names & forbidden, (record, names & forbidden)
        # The watchdog process too (it needs nothing of the daemon's but where the code is).
        assert daemon.proc is not None
        watchdog = watchdog_pid(daemon.proc.pid)
        assert not environ_names(Path(f"/proc/{watchdog}/environ").read_bytes()) & forbidden
    finally:
        daemon.stop()
        daemon.cleanup_host()


def test_sd_notify_ready_status_heartbeat_reload_stopping(tmp_root: Path,
                                                         notify: NotifySocket) -> None:
    daemon = new_daemon(tmp_root)
    start(daemon, notify)
    try:
        fields = notify.fields()
        ready = fields.index("READY=1")
        # The self-test's status came before READY, and READY came with the socket listening.
        assert "STATUS=running the startup self-test" in fields[:ready]
        assert fields[ready + 1].startswith("STATUS=accepting runs")
        # WATCHDOG_USEC=2s: a heartbeat every 0.5 s while the kill path is healthy.
        wait_for(lambda: notify.fields().count("WATCHDOG=1") >= 2, timeout=30,
                 what="two watchdog heartbeats")

        assert daemon.proc is not None
        before = len(notify.fields())
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "READY=1" in notify.fields()[before:], timeout=30,
                 what="READY=1 after the reload")
        after = notify.fields()[before:]
        assert after.index("RELOADING=1") < after.index("READY=1")
        assert daemon.proc.poll() is None  # SIGHUP reloads; it no longer kills the daemon
        rows = daemon.agentctl_json("audit", "--limit", "50")["entries"]
        reloads = [r for r in rows if r["verb"] == "config_reload"]
        assert reloads and reloads[-1]["outcome"] == "ok"
        assert reloads[-1]["actor"] == "system:sighup"

        notify.fields()  # drained, as systemd would: room for STOPPING=1
        assert daemon.stop() == 0
        assert any(f == "STOPPING=1" for f in notify.fields())
    finally:
        daemon.stop()
        daemon.cleanup_host()


def test_heartbeat_stops_while_the_watchdog_process_cannot_act(
        tmp_root: Path, notify: NotifySocket) -> None:
    """A stopped watchdog process is alive but could not kill anything if the daemon died:
    no heartbeat then (systemd would restart the daemon), and it resumes once it can."""
    daemon = new_daemon(tmp_root)
    start(daemon, notify)
    watchdog = 0
    try:
        assert daemon.proc is not None
        watchdog = watchdog_pid(daemon.proc.pid)
        wait_for(lambda: "WATCHDOG=1" in notify.fields(), timeout=30, what="a heartbeat")
        os.kill(watchdog, signal.SIGSTOP)
        wait_for(lambda: any(f.startswith("STATUS=kill path unhealthy: watchdog process")
                             for f in notify.fields()), timeout=30,
                 what="the unhealthy status")
        mark = len(notify.fields())
        time.sleep(2)  # four heartbeat periods
        assert "WATCHDOG=1" not in notify.fields()[mark:]
        os.kill(watchdog, signal.SIGCONT)
        wait_for(lambda: "WATCHDOG=1" in notify.fields()[mark:], timeout=30,
                 what="the heartbeat to resume")
    finally:
        if watchdog:
            os.kill(watchdog, signal.SIGCONT)
        daemon.stop()
        daemon.cleanup_host()


def test_a_sighup_during_the_start_is_a_reload_once_it_serves(
        tmp_root: Path, notify: NotifySocket) -> None:
    """SIGHUP's default action ends a process: sent while the daemon still starts (here: as
    soon as its first line has run, during its self-test), it must wait and be applied as a
    reload once the daemon serves, not kill the daemon and leave its agents to the watchdog."""
    daemon = new_daemon(tmp_root)
    starting = threading.Thread(target=start, args=(daemon, notify))
    starting.start()
    try:
        def hup_blocked() -> bool:
            proc = daemon.proc
            if proc is None or proc.poll() is not None:
                return False
            status = Path(f"/proc/{proc.pid}/status").read_text()
            blocked = int(next(line.split()[1] for line in status.splitlines()
                               if line.startswith("SigBlk:")), 16)
            return bool(blocked & (1 << (signal.SIGHUP - 1)))

        wait_for(hup_blocked, timeout=30, what="the daemon's first line")
        assert daemon.proc is not None
        assert "READY=1" not in notify.fields()
        daemon.proc.send_signal(signal.SIGHUP)
        starting.join(120)
        assert daemon.proc.poll() is None, daemon.logs()
        wait_for(lambda: "RELOADING=1" in notify.fields(), timeout=30, what="the reload")
        fields = notify.fields()
        assert fields.index("READY=1") < fields.index("RELOADING=1")

        def reloads() -> list[dict[str, object]]:
            rows = daemon.agentctl_json("audit", "--limit", "50")["entries"]
            return [r for r in rows if r["verb"] == "config_reload"]

        found = wait_for(reloads, timeout=30, what="the config_reload row")
        assert found and found[-1]["outcome"] == "ok"
    finally:
        starting.join(120)
        daemon.stop()
        daemon.cleanup_host()


def v2_cgroup(pid: int) -> Path:
    """The process's cgroup in the v2 tree (pure v2 or hybrid)."""
    relative = next(line.split(":", 2)[2] for line in
                    Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                    if line.startswith("0::"))
    return unified_root() / relative.strip().lstrip("/")


def test_heartbeat_stops_while_the_watchdog_is_out_of_its_own_cgroup(
        tmp_root: Path, notify: NotifySocket) -> None:
    """Moved into the daemon's cgroup, the watchdog would die with the daemon's unit (a
    `systemctl kill`, KillMode=mixed at a stop) and leave the agents with no killer: no
    heartbeat then, and it resumes once the watchdog is back in its own cgroup."""
    daemon = new_daemon(tmp_root)
    start(daemon, notify)
    own: Path | None = None
    watchdog = 0
    try:
        assert daemon.proc is not None
        watchdog = watchdog_pid(daemon.proc.pid)
        own = v2_cgroup(watchdog)
        assert own.name.endswith("-watchdog"), own
        wait_for(lambda: "WATCHDOG=1" in notify.fields(), timeout=30, what="a heartbeat")
        (v2_cgroup(daemon.proc.pid) / "cgroup.procs").write_text(str(watchdog))
        wait_for(lambda: any(f.startswith("STATUS=kill path unhealthy: watchdog cgroup")
                             for f in notify.fields()), timeout=30,
                 what="the unhealthy status")
        mark = len(notify.fields())
        time.sleep(2)  # four heartbeat periods
        assert "WATCHDOG=1" not in notify.fields()[mark:]
        # Emptied, its directory may have been pruned meanwhile: the same path again.
        own.mkdir(exist_ok=True)
        (own / "cgroup.procs").write_text(str(watchdog))
        wait_for(lambda: "WATCHDOG=1" in notify.fields()[mark:], timeout=30,
                 what="the heartbeat to resume")
    finally:
        if own is not None and watchdog:
            with contextlib.suppress(OSError):
                (own / "cgroup.procs").write_text(str(watchdog))
        daemon.stop()
        daemon.cleanup_host()


def watchdog_pid(daemon_pid: int) -> int:
    for pid in Path(f"/proc/{daemon_pid}/task/{daemon_pid}/children").read_text().split():
        if b"supervisor.daemon.watchdog" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return int(pid)
    raise AssertionError("no watchdog process among the daemon's children")
