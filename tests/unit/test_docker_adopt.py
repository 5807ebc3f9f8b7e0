"""A docker run's init found by `DockerRunHandle._adopt` just after the engine started it: a
short command may already have ended and been reaped by then. Reaped before /proc/PID/cgroup
is opened, the kernel answers ENOENT; reaped between the open and the read, ESRCH. Either is
the command having ended (the launch goes on, the engine says its status), never an internal
error (a CI run saw `agentctl run` answered 500 on a fast command). No root: the read is the
seam, the pidfd a real one on this test's own process."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest

from supervisor.runtime import containerized
from supervisor.runtime.containerized import DockerRunHandle


def _handle() -> DockerRunHandle:
    handle = DockerRunHandle.__new__(DockerRunHandle)
    handle.pid, handle._pidfd, handle.netns_path = None, None, None
    return handle


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("error", [FileNotFoundError, ProcessLookupError])
def test_an_init_reaped_while_its_cgroup_is_read_is_a_command_that_ended(
        monkeypatch: pytest.MonkeyPatch, error: type[OSError]) -> None:
    def reaped(pid: int) -> str:
        raise error(f"/proc/{pid}/cgroup: the process was reaped")

    monkeypatch.setattr(containerized, "_v2_cgroup_of", reaped)
    handle = _handle()
    before = _open_fds()
    handle._adopt(os.getpid())
    assert handle.pid is None and handle._pidfd is None
    assert _open_fds() == before  # the pidfd it opened is closed again


def test_an_init_in_another_cgroup_is_still_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ended-command path is only for a pid that is gone: a live one elsewhere fails."""
    monkeypatch.setattr(containerized, "_v2_cgroup_of", lambda pid: "/elsewhere")
    handle = _handle()
    handle.container = "c1"
    handle.params = type("P", (), {"cgroup": "agent-supervisor/c1"})()  # type: ignore[assignment]
    with pytest.raises(containerized.EnforcementError, match="not under /agent-supervisor/c1"):
        handle._adopt(os.getpid())
    assert handle.pid is None


def test_a_namespace_that_cannot_be_named_for_a_live_init_is_an_enforcement_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail closed, and said as a launch that could not be contained (exit 125 with the
    reason), not as the daemon's own internal error."""
    def refused(name: str, pid: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(containerized, "_v2_cgroup_of", lambda pid: "/agent-supervisor/c1")
    monkeypatch.setattr(containerized.netns, "adopt", refused)
    monkeypatch.setattr(containerized, "_EXITING_GRACE", 0.0)
    handle = _handle()
    handle.container = "c1"
    handle.params = type("P", (), {"cgroup": "agent-supervisor/c1",  # type: ignore[assignment]
                                   "netns": "c1"})()
    with pytest.raises(containerized.EnforcementError,
                       match=r"cannot name its network namespace.*Operation not permitted"):
        handle._adopt(os.getpid())
    assert handle._pidfd is not None  # the launch's abort (cleanup) closes it
    os.close(handle._pidfd)


def test_a_failed_removal_after_a_failed_start_never_replaces_the_starts_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """The caller is told why the start failed (exit 125 and its reason), not the removal's
    OSError (a 500): the removal's failure goes to the log."""
    killed: list[bool] = []

    class Cgroup:
        def kill(self) -> None:
            killed.append(True)

    async def cleanup() -> None:
        raise OSError(16, "Device or resource busy")

    handle = _handle()
    handle.container = "c1"
    handle.cgroup = Cgroup()  # type: ignore[assignment]
    handle.cleanup = cleanup  # type: ignore[method-assign]
    asyncio.run(handle._abort())
    assert killed == [True]
    assert "c1: its removal after a failed start failed" in caplog.text
    assert "Device or resource busy" in caplog.text


def test_the_init_is_adopted_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exiting init can hold `_adopt` for up to _EXITING_GRACE (it waits for the exit to
    complete): that wait must not stop the loop that carries every other run's kill."""
    threads: list[int] = []

    class Engine:
        def start(self, container: str) -> None: ...

        def inspect(self, container: str) -> dict[str, object]:
            return {"State": {"Pid": 4242}}

    class Runtime:
        engine = Engine()

        async def call(self, func: Any, *args: Any) -> Any:
            return func(*args)

        async def open_log(self, container: str, cursor: object) -> object:
            return object()

    handle = _handle()
    handle.container, handle.gate, handle.cursor = "c1", None, None  # type: ignore[assignment]
    handle.runtime = Runtime()  # type: ignore[assignment]
    handle.params = type("P", (), {"network": None})()  # type: ignore[assignment]
    monkeypatch.setattr(handle, "follow", lambda stream: None)
    monkeypatch.setattr(handle, "_adopt", lambda pid: threads.append(threading.get_ident()))

    async def start() -> int:
        await handle.start()
        return threading.get_ident()

    loop_thread = asyncio.run(start())
    assert len(threads) == 1 and threads[0] != loop_thread
