"""An adopted run's exit status without the kernel's process exit events (the proc connector
is refused outside the initial network, user and pid namespaces, as in the systemd tier's
machine): its init is not this daemon's child and another process reaps it, and the status
comes from its pidfd (supervisor/sandbox/proc_exits.py, PIDFD_INFO_EXIT, Linux 6.15+).

The "init" here is a process whose parent is a helper that made itself a child subreaper and
reaps it, as PID 1 reaps an adopted run's init once the daemon that launched it is gone. No
root."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from supervisor.runtime.sandboxed import RuncRunHandle
from supervisor.sandbox.proc_exits import pidfd_exit_status
from tests.conftest import require

# The helper: a child subreaper whose child starts the init (`sh -c 'read line; exit 7'`, its
# stdin the test's pipe), prints its pid and exits, so the helper inherits and reaps it.
REAPER = """
import ctypes, os, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
if os.fork() == 0:
    init = subprocess.Popen(["sh", "-c", "read line; exit 7"], stdin=int(sys.argv[1]))
    print(init.pid, flush=True)
    os._exit(0)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


def kernel_keeps_exit_status() -> bool:
    """PIDFD_INFO_EXIT: an ioctl on our own pidfd answers (alive: no exit in the mask)."""
    fd = os.pidfd_open(os.getpid())
    try:
        pidfd_exit_status(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclass
class Init:
    pid: int
    release: int  # write end: closing it lets the init exit 7
    reaper: subprocess.Popen[str]


@pytest.fixture
def init() -> Iterator[Init]:
    require(kernel_keeps_exit_status(), "needs Linux 6.15+ (PIDFD_INFO_EXIT)")
    read, write = os.pipe()
    reaper = subprocess.Popen([sys.executable, "-c", REAPER, str(read)], pass_fds=[read],
                              stdout=subprocess.PIPE, text=True)
    os.close(read)
    assert reaper.stdout is not None
    pid = int(reaper.stdout.readline())
    try:
        yield Init(pid, write, reaper)
    finally:
        os.close(write)  # a test that failed early: the init exits on EOF
        reaper.wait(timeout=30)
        reaper.stdout.close()


def adopted_handle(pid: int) -> RuncRunHandle:
    """A run as handover.py adopts it with no exit events handed over: its init's pidfd."""
    params = SimpleNamespace(cgroup="agent-supervisor-test/unit-adopted-exit")
    handle = RuncRunHandle(None, params, pid, os.pidfd_open(pid), None)  # type: ignore[arg-type]
    handle.exit_unknown = "the previous daemon handed over no exit events: EPERM"
    return handle


def test_an_adopted_init_that_exits_has_its_real_status_from_its_pidfd(init: Init) -> None:
    handle = adopted_handle(init.pid)
    assert handle.exits is None  # the fallback: no proc connector

    async def body() -> int | None:
        ended = handle.wait_exit()
        os.write(init.release, b"go\n")  # `read` returns: the init exits 7, its reaper reaps
        return await asyncio.wait_for(ended, 30)

    assert asyncio.run(body()) == 7
    assert handle.exit_unknown is None
    assert handle._pidfd is None  # closed once read


def test_an_adopted_init_killed_by_a_signal_reads_as_docker_does(init: Init) -> None:
    handle = adopted_handle(init.pid)

    async def body() -> int | None:
        ended = handle.wait_exit()
        os.kill(init.pid, signal.SIGKILL)
        return await asyncio.wait_for(ended, 30)

    assert asyncio.run(body()) == 128 + signal.SIGKILL
    assert handle.exit_unknown is None


def test_a_live_init_has_no_status_yet(init: Init) -> None:
    fd = os.pidfd_open(init.pid)
    try:
        assert pidfd_exit_status(fd) is None
    finally:
        os.close(fd)
