"""`Runc.remove_stopped` (supervisor/runtime/runc.py), a stopped container deleted without a
runc process: with the real runc, once the container's init is dead and its cgroup empty,
removing its state directory and then its cgroup leaves what `runc delete` leaves: runc no
longer knows the container and nothing of it is left under the root or in any cgroup
hierarchy. A directory that is not runc's is left to `runc delete`. Real runc, cgroups and a
network namespace; needs root."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.runtime.runc import STATE_FILE, Runc
from supervisor.sandbox.cgroups import Cgroup, v1_hierarchies
from tests.support.runc_bundle import runc_bundle


@pytest.fixture
def bundle(tmp_root: Path) -> Iterator[tuple[Path, str]]:
    """(bundle, container name); the container goes with it whatever the test reached."""
    with runc_bundle(tmp_root, "ds", "runc-delete") as made:
        yield made


def _runc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runc", "--root", str(root), *args], capture_output=True,
                          text=True, check=False)


def _stopped(runc: Runc, path: Path, name: str, tmp_root: Path) -> Cgroup:
    """The container created, started, and its init SIGKILLed: dead and its cgroup empty,
    as a run's cleanup finds a run whose agent has exited."""

    async def run() -> None:
        with open(os.devnull, "wb") as null:
            pid = await runc.create(name, path, tmp_root / "init.pid", null.fileno(),
                                    tmp_root / "runc.log")
        pidfd = os.pidfd_open(pid)
        try:
            await runc.start(name, init_pidfd=pidfd)
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            assert select.select([pidfd], [], [], 30)[0], "the init did not die"
        finally:
            os.close(pidfd)

    asyncio.run(run())
    cgroups_path: str = json.loads((path / "config.json").read_text())["linux"]["cgroupsPath"]
    cgroup = Cgroup(cgroups_path.strip("/"))
    deadline = time.monotonic() + 30
    while cgroup.populated():
        assert time.monotonic() < deadline, "the container's cgroup stayed populated"
        time.sleep(0.01)
    assert '"status": "stopped"' in _runc(runc.root, "state", name).stdout
    return cgroup


def test_a_stopped_container_goes_as_runc_delete_removes_it(
        tmp_root: Path, bundle: tuple[Path, str]) -> None:
    path, name = bundle
    root = tmp_root / "runc-root"
    runc = Runc("runc", root)
    cgroup = _stopped(runc, path, name, tmp_root)
    trees = [cgroup.path, *(h / cgroup.relative for h in v1_hierarchies(cgroup.host_root))]
    assert any(tree.is_dir() for tree in trees)  # runc made them; nobody removed them yet

    assert runc.remove_stopped(name) is True
    assert sorted(os.listdir(root)) == []
    assert asyncio.run(runc.list()) == []
    state = _runc(root, "state", name)
    assert state.returncode != 0 and "does not exist" in state.stderr, state
    assert "does not exist" in _runc(root, "delete", name).stderr  # nothing left for runc
    assert cgroup.remove() == []  # the run's cleanup then removes its cgroup, as runc did
    assert not any(tree.exists() for tree in trees)


def test_what_is_not_runcs_is_left_to_runc_delete(tmp_root: Path) -> None:
    root = tmp_root / "runc-root"
    root.mkdir()
    runc = Runc("runc", root)
    assert runc.remove_stopped("asds-none") is False  # no such container
    other = root / "asds-other"
    other.mkdir()
    (other / "status").write_text("stopped")  # another runtime's layout: no state.json
    assert runc.remove_stopped("asds-other") is False
    assert (other / "status").read_text() == "stopped"
    (other / STATE_FILE).write_text("{}")  # runc's: removed whole
    assert runc.remove_stopped("asds-other") is True
    assert not other.exists()
