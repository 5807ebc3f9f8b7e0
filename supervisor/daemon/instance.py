"""One daemon per state directory and per runtime directory. A second agent-supervisord on the
same directories (started by hand while the service runs, or by a confused unit) would take
over the control and seccomp sockets and, at its start, end the running daemon's watchdog as
an earlier one's (Watchdog.await_previous), leaving the agents with no killer. So the daemon's
first act after reading its configuration, before it touches a socket, a cgroup, a watchdog or
the state, is an exclusive, non-blocking flock(2) on `<state_dir>/daemon.lock` and then on
`<runtime_dir>/daemon.lock`; a start that cannot take both exits DaemonRunning (69), naming the
holder's pid. `--check-config` and `--halt` take no lock: they work while a daemon runs.

The lock belongs to the daemon's process alone. The descriptors are O_CLOEXEC and every child is
spawned with close_fds, so no watchdog, runc, gateway worker or agent ever holds it: the
watchdog outlives the daemon by design (a handover's window, a crash's kill) and must not keep
the next daemon out, which adopts from it or waits for it (Watchdog.await_previous). The kernel
releases the lock when the process exits, whatever the way (a crash included), so a stale lock
file is never an obstacle: only a live holder is.

A restart: the old daemon marks its lock `stopping` when the signal to stop (or hand over)
arrives, and releases it at its exit, after the handover is with its watchdog and the state is
closed. Under systemd the next daemon starts only after that exit. Started by hand meanwhile,
a daemon that finds the lock held by one that is stopping waits for it, at most
HANDOVER_WAIT seconds (the unit's TimeoutStopSec: a stop that takes longer is SIGKILLed by
systemd); a holder that is starting or serving refuses it at once.

The file holds one fixed-size JSON record (pid, state, since, version) that the holder
rewrites in place and never truncates, so a reader sees a whole record or retries. The file is
never removed: removing a lock file lets two processes lock two different inodes."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervisor import __version__
from supervisor.config import Config
from supervisor.errors import DaemonRunning

log = logging.getLogger(__name__)

LOCK_NAME = "daemon.lock"
# How long a start waits for a holder that is stopping or handing over (the unit's
# TimeoutStopSec=30s).
HANDOVER_WAIT = 30.0
_POLL = 0.05
_RECORD_SIZE = 256
STARTING, SERVING, STOPPING = "starting", "serving", "stopping"
# A holder in these states goes away by itself: a start waits for it (bounded).
_LEAVING = frozenset({STOPPING})


def lock_paths(config: Config) -> list[Path]:
    """The state directory's lock first, then the runtime directory's (one if they are the
    same directory)."""
    paths = [config.daemon.state_dir / LOCK_NAME, config.daemon.runtime_dir / LOCK_NAME]
    return paths[:1] if paths[0] == paths[1] else paths


def read_holder(path: Path) -> dict[str, Any]:
    """The holder's record: {"pid": int | None, "state": str, ...}; state "unknown" when the
    file says nothing readable (a holder between its lock and its first write)."""
    try:
        raw = path.read_bytes()[:_RECORD_SIZE]
        record = json.loads(raw.decode().strip() or "null")
    except (OSError, UnicodeDecodeError, ValueError):
        record = None
    if not isinstance(record, dict):
        return {"pid": None, "state": "unknown"}
    pid = record.get("pid")
    return {**record, "pid": pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            "state": str(record.get("state", "unknown"))}


def _record(state: str, since: float) -> bytes:
    line = json.dumps({"pid": os.getpid(), "state": state, "since": round(since, 3),
                       "version": __version__}, separators=(",", ":")).encode()
    if len(line) >= _RECORD_SIZE:  # a version string that long: drop it rather than truncate
        line = json.dumps({"pid": os.getpid(), "state": state}).encode()
    return line.ljust(_RECORD_SIZE - 1) + b"\n"


class InstanceLock:
    """The held locks. `acquire` takes them or raises DaemonRunning; `mark` rewrites the
    record (never raises); `release` closes them (the process's exit does too)."""

    def __init__(self, held: list[tuple[Path, int]]) -> None:
        self.held = held
        self.state = STARTING
        self.mark(STARTING)

    @classmethod
    def acquire(cls, config: Config, *, wait: float = HANDOVER_WAIT,
                clock: Callable[[], float] = time.monotonic,
                sleep: Callable[[float], None] = time.sleep) -> InstanceLock:
        deadline = clock() + wait
        held: list[tuple[Path, int]] = []
        try:
            for path, mode in zip(lock_paths(config), (0o700, 0o751), strict=False):
                held.append((path, _take(path, mode, deadline, clock, sleep)))
        except BaseException:
            for _path, fd in held:
                os.close(fd)
            raise
        return cls(held)

    def mark(self, state: str) -> None:
        """Say what the holder is doing (a start that finds it stopping waits for it)."""
        self.state = state
        record = _record(state, time.time())
        for path, fd in self.held:
            try:
                os.pwrite(fd, record, 0)
            except OSError as exc:  # the lock holds all the same; only its record is stale
                log.error("cannot write %s: %s", path, exc)

    def release(self) -> None:
        held, self.held = self.held, []
        for _path, fd in held:
            with contextlib.suppress(OSError):
                os.close(fd)


def _take(path: Path, mode: int, deadline: float, clock: Callable[[], float],
          sleep: Callable[[float], None]) -> int:
    path.parent.mkdir(mode=mode, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise DaemonRunning(f"cannot open the daemon's lock {path}: {exc.strerror}",
                            lock=str(path), errno=errno.errorcode.get(exc.errno or 0),
                            hint="the state and runtime directories must be root's and "
                                 "writable; the lock file a regular file") from exc
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = read_holder(path)
                if holder["state"] in _LEAVING and clock() < deadline:
                    if not waited:
                        log.warning("%s is held by a daemon that is stopping (pid %s): "
                                    "waiting for it", path, holder["pid"])
                        waited = True
                    sleep(_POLL)
                    continue
                raise DaemonRunning(_refusal(path, holder), lock=str(path),
                                    holder_pid=holder["pid"], holder_state=holder["state"],
                                    holder_since=holder.get("since"),
                                    waited=waited) from None
            os.ftruncate(fd, _RECORD_SIZE)
            return fd
    except BaseException:
        os.close(fd)
        raise


def _refusal(path: Path, holder: dict[str, Any]) -> str:
    pid = f"pid {holder['pid']}" if holder["pid"] is not None else "a process"
    if holder["state"] in _LEAVING:
        return (f"another agent-supervisord ({pid}) was still {holder['state']} after "
                f"{HANDOVER_WAIT:g} s and holds {path}: not starting")
    return (f"another agent-supervisord ({pid}, {holder['state']}) holds {path}: not "
            f"starting, nothing was touched")
