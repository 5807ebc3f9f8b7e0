"""The daemon's handle on the gateway worker (supervisor.egress.worker): started in a cgroup of
its own with its limits and a lower CPU priority, as an unprivileged user, restarted when it
dies. Runs in the daemon's loop and never waits on the worker without a deadline: sends are
fire-and-forget into a bounded buffer, requests have a timeout, and a worker that stops
reading or answering is killed (its listeners, and so every gateway run's network, go with
it: fail closed). Needs root (cgroups, setuid, setpriority).

While the worker is down, launches of gateway runs are refused (`gateway_unavailable`); runs
that were behind it have no network until their end (their tokens died with the worker and are
never re-issued), and the exit is reported for the audit log."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import supervisor
from supervisor.config import Config
from supervisor.egress import ipc
from supervisor.egress.confinement import V1_CONTROLLERS, ConfinementFailed, WorkerLimits, confine
from supervisor.errors import GatewayUnavailable
from supervisor.sandbox.cgroups import Cgroup

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0  # interpreter start and the HTTP stack's import on a loaded host
REQUEST_TIMEOUT = 10.0
_STOP_GRACE = 3.0
_RESTART_BACKOFF = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)


def worker_cgroup_path(config: Config) -> str:
    """Beside the runs' parent, never inside it: a global kill of the runs' parent must not
    take the gateway, and the gateway's limits must not count against the runs'."""
    return config.sandbox.cgroup_parent.rstrip("/") + "-gateway"


def worker_limits(config: Config) -> WorkerLimits:
    egress = config.egress
    return WorkerLimits(memory_max=egress.worker_memory_max, pids_max=egress.worker_pids_max,
                        cpu_weight=egress.worker_cpu_weight, cpu_max=egress.worker_cpu_max)


def _log_failure(attempt: asyncio.Task[None]) -> None:
    """Whoever waited for a start may have given up (a launch's deadline): its outcome is
    logged here, and so always retrieved."""
    if not attempt.cancelled() and (exc := attempt.exception()) is not None:
        log.error("egress gateway worker start failed: %s", exc)


class WorkerProcess:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop,
                 on_event: Callable[[ipc.Message], None],
                 on_exit: Callable[[dict[str, Any]], None]) -> None:
        self.config = config
        self.loop = loop
        self.on_event = on_event
        self.on_exit = on_exit
        self.cgroup = Cgroup(worker_cgroup_path(config))
        self.limits = worker_limits(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: ipc.FrameProtocol | None = None
        self.pid: int | None = None
        self.generation = 0  # one per started worker; a run's grant belongs to one
        self.restarts = 0
        self.last_exit: dict[str, Any] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._attempt: asyncio.Task[None] | None = None  # the start under way, if any
        self._restarter: asyncio.Task[None] | None = None
        self._pidfd: int | None = None
        self._fds: socket.socket | None = None  # descriptors to the worker (send_fds)
        self._pending: dict[int, asyncio.Future[ipc.Message]] = {}
        self._ids = itertools.count(1)
        self._exit_reason: str | None = None
        self._stopping = False
        self._failures = 0
        self._backoff = False  # down, and a restart is scheduled after a delay

    @property
    def up(self) -> bool:
        return (self._ready is not None and self._ready.done() and not self._ready.cancelled()
                and self._ready.exception() is None and self.channel is not None
                and self.channel.open)

    # ------------------------------------------------------------------ start

    async def ensure_up(self, timeout: float = START_TIMEOUT) -> None:
        """Start the worker if it is not running; GatewayUnavailable when it cannot be had."""
        if self._stopping:
            raise GatewayUnavailable("the supervisor is stopping; no new gateway runs")
        if self.up:
            return
        if self._backoff:
            raise GatewayUnavailable(
                "the egress gateway worker is down and waiting to be restarted; gateway runs "
                "are refused until it is back", last_exit=self.last_exit, restarts=self.restarts)
        attempt = self._attempt
        if attempt is None or attempt.done():
            attempt = self._begin()
        try:
            await asyncio.wait_for(asyncio.shield(attempt), timeout)
        except GatewayUnavailable:
            raise
        except (TimeoutError, OSError, ConfinementFailed) as exc:
            raise GatewayUnavailable(f"the egress gateway is not running: {exc}",
                                     last_exit=self.last_exit) from exc

    def _begin(self) -> asyncio.Task[None]:
        attempt = self._attempt = self.loop.create_task(self._start())
        attempt.add_done_callback(_log_failure)
        return attempt

    async def _start(self) -> None:
        try:
            await self._spawn()
        except BaseException:
            self._failures += 1
            raise
        self._failures = 0

    async def _spawn(self) -> None:
        await self.loop.run_in_executor(None, confine, self.cgroup, self.limits)
        if self.cgroup.pids():
            # A worker of a previous daemon instance that outlived it would hold the ports.
            self._kill_strays()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds_parent, fds_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = self._popen(child, fds_child)
        except (KeyError, OSError) as exc:
            parent.close()
            fds_parent.close()
            raise GatewayUnavailable(f"the egress gateway worker cannot be started: {exc}",
                                     worker_user=self.config.egress.worker_user) from exc
        finally:
            child.close()
            fds_child.close()
        fds_parent.setblocking(False)
        if self._fds is not None:
            self._fds.close()
        self._fds = fds_parent
        self.proc, self.pid = proc, proc.pid
        self.generation += 1
        self._exit_reason = None
        try:
            self.cgroup.place(proc.pid, V1_CONTROLLERS)
            # Threads inherit the nice value of the thread that makes them: set before the
            # worker has read its configuration, so all of them run below the daemon.
            os.setpriority(os.PRIO_PROCESS, proc.pid, self.config.egress.worker_nice)
            self._pidfd = os.pidfd_open(proc.pid)
            self.loop.add_reader(self._pidfd, self._reaped)
            self._ready = self.loop.create_future()
            _, self.channel = await self.loop.create_unix_connection(
                lambda: ipc.FrameProtocol(ipc.TO_DAEMON_LIMIT, ipc.WRITE_BUFFER_LIMIT,
                                          self._message, self._channel_lost), sock=parent)
            if not self.channel.send(ipc.encode(self._configuration(), ipc.TO_WORKER_LIMIT)):
                raise GatewayUnavailable("the gateway worker's channel closed at once")
            await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT)
        except BaseException as exc:
            self._kill(f"start failed: {exc}")
            parent.close()
            raise
        log.info("egress gateway worker %d started (cgroup %s)", proc.pid,
                 self.cgroup.relative)

    def _popen(self, child: socket.socket, fds: socket.socket) -> subprocess.Popen[bytes]:
        user = self.config.egress.worker_user
        ids: list[str] = []
        if user and user != "root":
            entry = pwd.getpwnam(user)
            ids = ["--uid", str(entry.pw_uid), "--gid", str(entry.pw_gid)]
        # Not -I: the worker must import this same package, found from its directory (cwd);
        # -E and -s keep the environment and user site out. The environment is empty of the
        # daemon's: `env:` secrets live there. Started as root, it takes its user itself, not
        # dumpable first (worker.main): exec'd as that user, it was open to ptrace by any
        # process of the user's until its main() ran, and a process seized then kept it, and
        # its secrets (tests/e2e/test_egress_worker.py).
        root = str(Path(supervisor.__file__).resolve().parent.parent)
        return subprocess.Popen(
            [sys.executable, "-E", "-s", "-m", "supervisor.egress.worker",
             "--fd", str(child.fileno()), "--fds-fd", str(fds.fileno()), *ids],
            pass_fds=(child.fileno(), fds.fileno()), close_fds=True, cwd=root,
            start_new_session=True, stdin=subprocess.DEVNULL,
            env={"PATH": os.defpath, "LANG": "C.UTF-8"})

    def _configuration(self) -> ipc.Message:
        egress = self.config.egress
        ca = None
        if egress.ca_file is not None:
            # Read here (root) and sent: the worker's user need not be able to read it.
            ca = egress.ca_file.read_text()
        return {"op": "configure", "config": egress.model_dump(mode="json"), "ca": ca}

    # ------------------------------------------------------------------ channel

    def _message(self, message: ipc.Message) -> None:
        op = message["op"]
        if op == "hello":
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        elif op == "reply":
            future = self._pending.pop(int(message.get("re") or 0), None)
            if future is not None and not future.done():
                future.set_result(message)
        else:
            try:
                self.on_event(message)
            except Exception:  # one bad event must not take the channel down
                log.exception("gateway event %r", op)

    def _channel_lost(self, reason: str) -> None:
        self._kill(reason)

    def send(self, message: ipc.Message) -> bool:
        """Fire and forget. False when the worker is down; a worker that has stopped reading
        is killed, which revokes everything it held at once."""
        if self.channel is None or not self.channel.open:
            return False
        try:
            frame = ipc.encode(message, ipc.TO_WORKER_LIMIT)
        except ipc.FrameError as exc:
            log.error("gateway message not sent: %s", exc)
            return False
        if not self.channel.send(frame):
            self._kill("the gateway worker stopped reading its channel")
            return False
        return True

    def send_fds(self, key: str, fd: int) -> bool:
        """Pass a descriptor to the worker (a stdio MCP server's end), named `key`; send the
        message that uses it afterwards. Never blocks: False when it cannot go now."""
        if self._fds is None or not self.up:
            return False
        try:
            socket.send_fds(self._fds, [key.encode()], [fd])
        except OSError as exc:  # BlockingIOError included: the worker is not reading
            log.error("descriptor %s not sent to the gateway worker: %s", key, exc)
            return False
        return True

    async def request(self, message: ipc.Message, timeout: float = REQUEST_TIMEOUT, *,
                      kill_on_timeout: bool = True) -> ipc.Message:
        """Send and wait for the answer, at most `timeout`; GatewayUnavailable without one.
        Where a missing answer leaves a listener in doubt (open, close), the worker that did
        not answer is killed; a read (kill_on_timeout=False) just goes without."""
        request_id = next(self._ids)
        future: asyncio.Future[ipc.Message] = self.loop.create_future()
        self._pending[request_id] = future
        if not self.send({**message, "id": request_id}):
            self._pending.pop(request_id, None)
            raise GatewayUnavailable("the egress gateway is not running",
                                     last_exit=self.last_exit)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            if not kill_on_timeout:
                raise GatewayUnavailable(f"the egress gateway did not answer "
                                         f"{message['op']!r} within {timeout:g}s") from None
            self._kill(f"no answer to {message['op']!r} within {timeout:g}s")
            raise GatewayUnavailable(f"the egress gateway did not answer {message['op']!r} "
                                     f"within {timeout:g}s; it was restarted") from None
        finally:
            self._pending.pop(request_id, None)

    # ------------------------------------------------------------------ death

    def _kill(self, reason: str) -> None:
        if self._exit_reason is None:
            self._exit_reason = reason
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.abort()
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        self._kill_strays()

    def _kill_strays(self) -> None:
        """Whatever is left in the worker's cgroup (its threads die with it; this is for
        strays); a cgroup already gone has none."""
        with contextlib.suppress(OSError):
            self.cgroup.kill()

    def _reaped(self) -> None:
        """The worker's pidfd became readable: it has exited."""
        proc = self.proc
        if self._pidfd is not None:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.abort()
        self.channel = None
        status = proc.wait() if proc is not None else None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(GatewayUnavailable("the egress gateway worker exited"))
        self._pending.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(GatewayUnavailable("the egress gateway worker exited "
                                                         "before it was ready"))
            self._ready.exception()  # retrieved: the starter raises its own error
        self._kill_strays()
        self.last_exit = {"pid": proc.pid if proc else None, "status": status,
                          "signal": signal.Signals(-status).name
                          if status is not None and status < 0 else None,
                          "reason": self._exit_reason or "it exited on its own",
                          "generation": self.generation, "at": time.time()}
        self.proc = None
        if self._stopping:
            return
        self.on_exit(self.last_exit)
        self.restarts += 1
        self._restarter = self.loop.create_task(self._restart())

    async def _restart(self) -> None:
        while not self._stopping:
            delay = _RESTART_BACKOFF[min(self._failures, len(_RESTART_BACKOFF) - 1)]
            if delay:
                self._backoff = True
                try:
                    await asyncio.sleep(delay)
                finally:
                    self._backoff = False
            try:
                await self._begin()
                return
            except (GatewayUnavailable, OSError, ConfinementFailed, TimeoutError):
                pass  # logged by _begin; the next try waits longer

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        """Orderly shutdown (every run has ended): ask, wait briefly, then kill; the cgroup
        goes. Blocks up to a few seconds, like the watchdog's stand-down."""
        self._stopping = True
        for task in (self._attempt, self._restarter):
            if task is not None and not task.done():
                task.cancel()
        proc = self.proc
        if proc is not None:
            self.send({"op": "stop"})
            try:
                proc.wait(timeout=_STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._pidfd is not None:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.abort()
        if self._fds is not None:
            self._fds.close()
            self._fds = None
        self._kill_strays()
        for _ in range(50):
            try:
                self.cgroup.remove()
                return
            except OSError:
                time.sleep(0.02)  # the killed worker's last exit is still being accounted
        log.warning("the gateway worker's cgroup %s could not be removed", self.cgroup.relative)
