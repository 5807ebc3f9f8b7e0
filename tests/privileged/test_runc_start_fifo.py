"""`Runc.start` without a runc process (supervisor/runtime/runc.py): with the real runc, reading
the created init's exec fifo to its end and removing it starts the container as `runc start`
does (runc then says running, the init runs the command); an init that died before it is
refused with runc's own words, at once, not waited on; a container without the fifo goes to
`runc start`. Real runc, cgroups and a network namespace; needs root."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.errors import RuntimeFailure
from supervisor.runtime.runc import EXEC_FIFO, Runc
from tests.support.runc_bundle import runc_bundle


@pytest.fixture
def bundle(tmp_root: Path) -> Iterator[tuple[Path, str]]:
    """(bundle, container name); the container goes with it whatever the test reached."""
    with runc_bundle(tmp_root, "sf", "runc-start") as made:
        yield made


def _status(root: Path, name: str) -> str:
    done = subprocess.run(["runc", "--root", str(root), "state", name], capture_output=True,
                          text=True, check=True)
    status: str = json.loads(done.stdout)["status"]
    return status


async def _created(runc: Runc, path: Path, name: str, tmp_root: Path) -> tuple[int, int]:
    with open(os.devnull, "wb") as null:
        pid = await runc.create(name, path, tmp_root / "init.pid", null.fileno(),
                                tmp_root / "runc.log")
    return pid, os.pidfd_open(pid)


def test_reading_the_exec_fifo_starts_the_container_as_runc_start_does(
        tmp_root: Path, bundle: tuple[Path, str]) -> None:
    path, name = bundle
    root = tmp_root / "runc-root"
    runc = Runc("runc", root)

    async def start() -> tuple[int, str, str]:
        pid, pidfd = await _created(runc, path, name, tmp_root)
        try:
            before = _status(root, name)
            await asyncio.wait_for(runc.start(name, init_pidfd=pidfd), 30)
            return pid, before, _status(root, name)
        finally:
            os.close(pidfd)

    pid, before, after = asyncio.run(start())
    assert (before, after) == ("created", "running")
    assert not (root / name / EXEC_FIFO).exists()
    # the init let go: it exec'd the bundle's command
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", b"30"]


def test_an_init_dead_before_its_start_is_refused_at_once(
        tmp_root: Path, bundle: tuple[Path, str]) -> None:
    path, name = bundle
    runc = Runc("runc", tmp_root / "runc-root")

    async def start() -> str:
        _pid, pidfd = await _created(runc, path, name, tmp_root)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            with pytest.raises(RuntimeFailure) as refused:
                await asyncio.wait_for(runc.start(name, init_pidfd=pidfd), 30)
            return refused.value.message
        finally:
            os.close(pidfd)

    assert asyncio.run(start()) == "runc start failed: container process is already dead"


def test_a_container_without_the_fifo_goes_to_runc_start(tmp_root: Path) -> None:
    runc = Runc("runc", tmp_root / "runc-root")

    async def start() -> str:
        pidfd = os.pidfd_open(os.getpid())
        try:
            with pytest.raises(RuntimeFailure) as refused:
                await runc.start("assf-none", init_pidfd=pidfd)
            return refused.value.message
        finally:
            os.close(pidfd)

    message = asyncio.run(start())
    assert message.startswith("runc start failed: ") and "does not exist" in message
