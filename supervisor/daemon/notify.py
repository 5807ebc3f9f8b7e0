"""systemd's notification protocol (sd_notify(3)) and the service watchdog's heartbeat. No
privilege: one datagram to the socket systemd named.

The datagram is written here, not through a package: it is one `sendto` on an AF_UNIX
SOCK_DGRAM socket to $NOTIFY_SOCKET, whose name starts with "@" for an abstract-namespace
address (systemd's own convention, replaced by a NUL byte). The variables systemd hands the
daemon for this (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID) are taken out of the
environment when the notifier is made, so nothing the daemon executes can see them (runc,
finding NOTIFY_SOCKET, would bind-mount the socket into the sandbox).

Heartbeat (WatchdogSec= in the unit): WATCHDOG=1 is sent from a task on the control loop, so
a loop that stops turning (a hang, a SIGSTOP, a blocking call) stops the heartbeat; and only
while the kill path could act: the watchdog process is alive (it kills every agent if the
daemon dies), the audit writer thread is alive (a kill is recorded), and every cgroup
descriptor the kill path holds still refers to an open file (a kill needs no new
descriptor). When a check fails the heartbeat stops and STATUS= names the check; systemd then
aborts the daemon after WatchdogSec=, its watchdog process kills every agent, and
Restart=on-failure starts a fresh daemon."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

# Variables that belong to the daemon's dealings with systemd and must reach no child.
_SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS",
                 "LISTEN_FDNAMES", "INVOCATION_ID", "CREDENTIALS_DIRECTORY", "MONITOR_PID",
                 "MONITOR_EXIT_CODE", "MONITOR_EXIT_STATUS", "MONITOR_INVOCATION_ID",
                 "MONITOR_UNIT")

# A check of the kill path: None when healthy, else what is wrong (shown in STATUS=).
HealthCheck = Callable[[], str | None]


class Notifier:
    """The daemon's one channel to systemd. Outside systemd every call is a no-op."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address
        self.watchdog_usec = _watchdog_usec(env)
        # systemd started this process as a service (daemon/stopintent.py asks it why it stops).
        self.service = bool(env.get("INVOCATION_ID"))
        for name in _SYSTEMD_VARS:
            env.pop(name, None)
        self._heartbeat: asyncio.Task[None] | None = None
        self.unhealthy: str | None = None

    def send(self, *fields: str) -> bool:
        """One datagram of KEY=VALUE lines; False when it could not be sent (logged).

        Never blocks: a datagram socket whose reader has fallen behind (its queue holds
        net.unix.max_dgram_qlen datagrams, 10 by default) would otherwise stop the control
        loop in sendto, and with it every kill. A dropped heartbeat costs at most one period."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                               | socket.SOCK_NONBLOCK) as sock:
                sock.sendto("\n".join(fields).encode(), self.address)
        except BlockingIOError:
            log.warning("sd_notify %s dropped: %r is not reading", fields, self.address)
            return False
        except OSError as exc:
            log.error("sd_notify %s to %r failed: %s", fields, self.address, exc)
            return False
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", "STATUS=reloading the configuration")

    def reloaded(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def start_heartbeat(self, checks: list[tuple[str, HealthCheck]]) -> None:
        """WATCHDOG=1 every WatchdogSec/4 while every check passes; nothing without
        WatchdogSec= (WATCHDOG_USEC unset or meant for another pid)."""
        if self.watchdog_usec is None or not self.address:
            return
        interval = self.watchdog_usec / 4 / 1e6
        self._heartbeat = asyncio.create_task(self._beat(interval, checks))

    async def _beat(self, interval: float, checks: list[tuple[str, HealthCheck]]) -> None:
        while True:
            problem = first_problem(checks)
            if problem is None:
                if self.unhealthy is not None:
                    log.warning("kill path healthy again; watchdog heartbeat resumed")
                    self.unhealthy = None
                self.send("WATCHDOG=1")
            elif problem != self.unhealthy:
                self.unhealthy = problem
                log.critical("kill path unhealthy (%s): watchdog heartbeat stopped, systemd "
                             "will restart the daemon", problem)
                self.status(f"kill path unhealthy: {problem}; heartbeat stopped")
            await asyncio.sleep(interval)

    async def stop_heartbeat(self) -> None:
        task, self._heartbeat = self._heartbeat, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def first_problem(checks: list[tuple[str, HealthCheck]]) -> str | None:
    for name, check in checks:
        try:
            problem = check()
        except Exception as exc:  # a check that fails is itself a failed check
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            return f"{name}: {problem}"
    return None


def _watchdog_usec(env: dict[str, str] | os._Environ[str]) -> int | None:
    """WATCHDOG_USEC when it is meant for this process (sd_watchdog_enabled(3))."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    return usec if usec > 0 else None
