"""sd_notify datagrams and the heartbeat's health gate (supervisor/daemon/notify.py), on real
Unix datagram sockets. No privilege."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from supervisor.daemon.notify import Notifier, first_problem


def bound(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_datagram_to_a_path_and_the_variables_leave_the_environment(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with bound(path) as sock:
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID":
               str(os.getpid()), "LISTEN_FDS": "2", "INVOCATION_ID": "x", "PATH": "/bin"}
        notifier = Notifier(env)
        assert env == {"PATH": "/bin"}
        assert notifier.watchdog_usec == 4_000_000
        notifier.ready("accepting runs")
        assert sock.recv(1024) == b"READY=1\nSTATUS=accepting runs"


def test_abstract_namespace_address() -> None:
    name = f"as-unit-notify-{os.getpid()}"
    with bound("\0" + name) as sock:
        Notifier({"NOTIFY_SOCKET": "@" + name}).stopping("bye")
        assert sock.recv(1024) == b"STOPPING=1\nSTATUS=bye"


def test_outside_systemd_nothing_is_sent_and_a_foreign_watchdog_is_ignored() -> None:
    assert Notifier({}).send("READY=1") is False
    assert Notifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_usec is None


def test_heartbeat_only_while_every_check_passes(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    broken = {"now": False}

    async def scenario(sock: socket.socket) -> list[bytes]:
        notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "80000"})
        notifier.start_heartbeat([("check", lambda: "broken" if broken["now"] else None)])
        got: list[bytes] = []
        loop = asyncio.get_running_loop()
        got.append(await loop.run_in_executor(None, sock.recv, 1024))
        broken["now"] = True
        got.append(await loop.run_in_executor(None, sock.recv, 1024))
        await notifier.stop_heartbeat()
        return got

    with bound(path) as sock:
        got = asyncio.run(scenario(sock))
        assert got[0] == b"WATCHDOG=1"
        # Broken: the next datagram is the status naming it, never another heartbeat.
        while got[-1] == b"WATCHDOG=1":
            got.append(sock.recv(1024))
        assert got[-1] == b"STATUS=kill path unhealthy: check: broken; heartbeat stopped"


def test_a_check_that_raises_is_a_failed_check() -> None:
    def boom() -> str | None:
        raise OSError("EBADF")

    assert first_problem([("ok", lambda: None), ("fds", boom)]) == "fds: OSError: EBADF"


def test_a_reader_that_falls_behind_never_blocks_the_sender(tmp_path: Path) -> None:
    """The kernel queues ~10 datagrams for a reader that does not read; more must be
    dropped, not wait (a blocked sendto would stop the control loop and every kill)."""
    path = str(tmp_path / "notify")
    with bound(path):
        notifier = Notifier({"NOTIFY_SOCKET": path})
        sent = [notifier.send("WATCHDOG=1") for _ in range(1000)]
        assert sent[0] is True
        assert sent[-1] is False
