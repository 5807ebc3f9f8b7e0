"""Break-glass: halt every agent when the control socket or the role config is broken. Needs
only root on the host, and still audits.

Two triggers, both root-only by construction:
- the HALT file (default <runtime_dir>/HALT, a directory only root can write): create it,
  optionally with a reason inside (`echo "reason" > /run/agent-supervisor/HALT`, or
  `agent-supervisord --halt "reason"`). The daemon sees it at once through inotify (and on a
  slow safety poll, and at startup when it was written while the daemon was down), applies a
  global kill, and renames the file to HALT.done.<time>;
- SIGUSR1 to the daemon (`systemctl kill -s USR1 agent-supervisor`).
Either is a global halt: every agent is killed through the audited kill path and new launches
are refused until an owner lifts it with `agentctl reactivate --all`."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import stat
import struct
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from supervisor.daemon.arbiter import Arbiter
from supervisor.errors import SupervisorError
from supervisor.models import REASON_MAX, ActionRequest, Actor, Scope
from supervisor.sandbox.libc import libc

log = logging.getLogger(__name__)

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")
_SAFETY_POLL = 5.0
_MAX_FILE = 4096
_libc = libc


class BreakGlass:
    def __init__(self, arbiter: Arbiter, halt_file: Path) -> None:
        self.arbiter = arbiter
        self.halt_file = halt_file
        self._fd: int | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._busy = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.halt_file.parent.mkdir(parents=True, exist_ok=True)
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            log.error("inotify unavailable (%s): the HALT file is polled every %gs",
                      os.strerror(ctypes.get_errno()), _SAFETY_POLL)
        else:
            watch = _libc.inotify_add_watch(fd, str(self.halt_file.parent).encode(),
                                            IN_CLOSE_WRITE | IN_MOVED_TO)
            if watch < 0:
                os.close(fd)
                log.error("cannot watch %s: %s", self.halt_file.parent,
                          os.strerror(ctypes.get_errno()))
            else:
                self._fd = fd
                loop.add_reader(fd, self._on_inotify)
        loop.add_signal_handler(signal.SIGUSR1, self._on_signal)
        self._poll_task = asyncio.create_task(self._poll())
        await self.check_file()  # written while the daemon was down

    def stop(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGUSR1)
        if self._fd is not None:
            loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._poll_task is not None:
            self._poll_task.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_inotify(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        offset, wanted = 0, self.halt_file.name.encode()
        hit = False
        while offset + _EVENT.size <= len(data):
            _wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size: offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            hit = hit or name == wanted
        if hit:
            self._spawn(self.check_file())

    def _on_signal(self) -> None:
        self._spawn(self.halt(Actor(kind="user", uid=0, name="break-glass"),
                              "break-glass: SIGUSR1 to the daemon", trigger="signal"))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(_SAFETY_POLL)
            await self.check_file()

    async def check_file(self) -> None:
        """Apply the HALT file if it is there and trustworthy (a root-owned regular file)."""
        try:
            st = os.lstat(self.halt_file)
        except FileNotFoundError:
            return
        done = self.halt_file.with_name(f"{self.halt_file.name}.done.{int(time.time())}")
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
            log.critical("ignoring %s: not a regular file owned by root", self.halt_file)
            os.rename(self.halt_file, done.with_name(done.name + ".rejected"))
            return
        with open(self.halt_file, "rb") as handle:
            text = handle.read(_MAX_FILE).decode("utf-8", errors="replace").strip()
        os.rename(self.halt_file, done)
        reason = f"break-glass: {text}" if text else "break-glass: HALT file"
        await self.halt(Actor(kind="user", uid=st.st_uid, name="break-glass"),
                        reason[:REASON_MAX], trigger=f"file {self.halt_file}")

    async def halt(self, actor: Actor, reason: str, trigger: str) -> None:
        async with self._busy:
            log.critical("BREAK-GLASS global halt (%s): %s", trigger, reason)
            self.arbiter.audit.append(actor=actor.label(), verb="break_glass", scope="global",
                                      reason=reason, detail={"trigger": trigger})
            try:
                await self.arbiter.act("kill", ActionRequest(scope=Scope(all=True),
                                                             reason=reason), actor)
            except SupervisorError as exc:
                log.critical("break-glass halt incomplete: %s: %s", exc.code, exc.message)


def request_halt(halt_file: Path, reason: str, wait: float = 10.0) -> bool:
    """Write the HALT file atomically (root); True once a running daemon has consumed it."""
    halt_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = halt_file.with_name(f".{halt_file.name}.{os.getpid()}")
    tmp.write_text(reason[:REASON_MAX] + "\n")
    os.chmod(tmp, 0o600)
    os.rename(tmp, halt_file)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not halt_file.exists():
            return True
        time.sleep(0.05)
    return False
