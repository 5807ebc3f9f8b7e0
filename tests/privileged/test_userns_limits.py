"""A run's user namespace limits (supervisor/sandbox/userns.py `apply`), written through
nsenter into a real user namespace as runc leaves a created container's: what is written is
read back and holds there (and not in the host's namespace); a value the kernel refuses
refuses the run (fail closed). Needs root."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from supervisor.errors import EnforcementError
from supervisor.sandbox import userns


@pytest.fixture
def namespace() -> Iterator[int]:
    """The pid of a process in a user namespace of its own (root mapped), as a created
    container's init is."""
    if os.geteuid() != 0:
        pytest.fail("needs root")
    proc = subprocess.Popen(["unshare", "--user", "--map-root-user", "sleep", "60"])
    try:
        mine = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{proc.pid}/ns/user") == mine:
            assert time.monotonic() < deadline, "unshare made no user namespace"
            time.sleep(0.01)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _read_in(pid: int, names: list[str]) -> list[str]:
    done = subprocess.run(["nsenter", f"--user=/proc/{pid}/ns/user", "--", "cat",
                           *(str(userns.USER_SYSCTL / name) for name in names)],
                          capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_the_limits_are_written_into_the_runs_namespace_and_read_back(namespace: int) -> None:
    limits = userns.UsernsLimits.for_runs(7, 1234).present()
    names = sorted(limits.values)
    host_before = [(userns.USER_SYSCTL / name).read_text().strip() for name in names]
    asyncio.run(userns.apply(namespace, limits))
    assert _read_in(namespace, names) == [str(limits.values[name]) for name in names]
    assert limits.values["max_inotify_instances"] == 7 and "max_user_namespaces" in names
    assert [(userns.USER_SYSCTL / name).read_text().strip() for name in names] == host_before


def test_a_value_the_kernel_refuses_refuses_the_run(namespace: int) -> None:
    limits = userns.UsernsLimits({"max_inotify_instances": 5, "max_user_namespaces": -1})
    with pytest.raises(EnforcementError) as refused:
        asyncio.run(userns.apply(namespace, limits))
    assert refused.value.message == "the run's user namespace limits did not hold"
    assert refused.value.detail["status"] != 0


def test_a_namespace_that_is_gone_refuses_the_run() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(EnforcementError):
        asyncio.run(userns.apply(proc.pid, userns.UsernsLimits.for_runs(7, 1234).present()))
