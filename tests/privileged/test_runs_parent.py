"""A runs' parent cgroup that is someone else's is refused, for real: a cgroup of the test's own
holding a foreign `sleep` (or a foreign child cgroup) named as [sandbox] cgroup_parent stops
the daemon's start with exit 78 before it writes a limit there or arms a kill, and the sleep
lives on; a systemd unit's name is refused at load. The parent a daemon makes is marked as
its own. Needs root and runc; touches only cgroups the test made."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from supervisor.sandbox import runs_parent
from supervisor.sandbox.cgroups import CGROUP_ROOT, Cgroup, unified_root, v1_hierarchies
from tests.support.daemon import TEST_CGROUP_ROOT, Daemon, new_daemon


@pytest.fixture
def foreign_cgroup() -> Iterator[Cgroup]:
    """A cgroup of the test's own (under the tests' root), removed with all it holds after."""
    cgroup = Cgroup(f"{TEST_CGROUP_ROOT}/foreign-{secrets.token_hex(3)}")
    cgroup.create(("pids", "memory"))
    try:
        yield cgroup
    finally:
        cgroup.remove(strict=False)  # children first; their processes are the tests' own


@contextmanager
def stranger_in(cgroup: Cgroup, *controllers: str) -> Iterator[subprocess.Popen[bytes]]:
    """A `sleep` that is not the supervisor's, placed in `cgroup` (and in the v1 hierarchies
    of `controllers`), killed after."""
    sleep = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        cgroup.place(sleep.pid, controllers)
        yield sleep
    finally:
        os.kill(sleep.pid, signal.SIGKILL)
        sleep.wait()


@pytest.fixture
def foreign_sleep(foreign_cgroup: Cgroup) -> Iterator[subprocess.Popen[bytes]]:
    """A process that is not the supervisor's, in the cgroup (v2 and, on a hybrid host, the v1
    pids and memory hierarchies, where the runs' budget would be written)."""
    with stranger_in(foreign_cgroup, "pids", "memory") as sleep:
        yield sleep


def refused_start(daemon: Daemon) -> str:
    """Start the daemon, which must refuse with 78 naming sandbox.cgroup_parent, no traceback."""
    with pytest.raises(RuntimeError, match="daemon exited 78"):
        daemon.start()
    log = daemon.logs()
    assert "sandbox.cgroup_parent" in log and "Traceback" not in log, log
    check = daemon.check_config()
    assert check.returncode == 78 and "sandbox.cgroup_parent" in check.stderr, check.stderr
    return log


def untouched(cgroup: Cgroup, daemon: Daemon) -> None:
    """No limit written, nothing of the daemon's beside it, no mark."""
    for hierarchy in v1_hierarchies(CGROUP_ROOT):
        pids_max = hierarchy / cgroup.relative / "pids.max"
        if hierarchy.name == "pids" and pids_max.exists():
            assert pids_max.read_text().strip() == "max"
    if (cgroup.path / "pids.max").exists():
        assert (cgroup.path / "pids.max").read_text().strip() == "max"
    assert not Cgroup(cgroup.relative + "-watchdog").exists()
    assert not runs_parent.is_marked(cgroup.relative)
    assert not (daemon.root / "run" / "control.sock").exists()


def test_a_parent_holding_a_foreign_process_is_refused_and_it_survives(
        tmp_root: Path, foreign_cgroup: Cgroup, foreign_sleep: subprocess.Popen[bytes]) -> None:
    daemon = new_daemon(tmp_root)
    daemon.cgroup_parent = "/" + foreign_cgroup.relative
    log = refused_start(daemon)
    assert f"pid {foreign_sleep.pid}" in log
    untouched(foreign_cgroup, daemon)
    assert foreign_sleep.poll() is None
    os.kill(foreign_sleep.pid, 0)  # alive
    assert foreign_cgroup.pids() == [foreign_sleep.pid]


def test_a_parent_holding_a_foreign_cgroup_is_refused(tmp_root: Path,
                                                      foreign_cgroup: Cgroup) -> None:
    child = Cgroup(f"{foreign_cgroup.relative}/database").create(("pids",))
    with stranger_in(child, "pids") as sleep:
        daemon = new_daemon(tmp_root)
        daemon.cgroup_parent = "/" + foreign_cgroup.relative
        assert "database" in refused_start(daemon)
        untouched(foreign_cgroup, daemon)
        assert sleep.poll() is None and child.pids() == [sleep.pid]


def test_a_stranger_in_the_watchdogs_cgroup_is_refused_and_survives(tmp_root: Path) -> None:
    """The start SIGKILLs whatever it finds in <parent>-watchdog (it takes it for an earlier
    watchdog): a process of someone else's there is refused instead, and lives on."""
    parent = f"{TEST_CGROUP_ROOT}/beside-{secrets.token_hex(3)}"
    beside = Cgroup(f"{parent}-watchdog").create()
    try:
        with stranger_in(beside) as sleep:
            daemon = new_daemon(tmp_root)
            daemon.cgroup_parent = parent
            assert f"pid {sleep.pid}" in refused_start(daemon)
            assert not Cgroup(parent).exists()
            assert sleep.poll() is None and beside.pids() == [sleep.pid]
    finally:
        beside.remove(strict=False)


@pytest.mark.parametrize("name", ["runs.slice", "ssh.service", "session-9.scope"])
def test_a_systemd_units_cgroup_is_refused_before_anything_is_made(tmp_root: Path,
                                                                   name: str) -> None:
    daemon = new_daemon(tmp_root)
    daemon.cgroup_parent = f"{TEST_CGROUP_ROOT}/{secrets.token_hex(3)}/{name}"
    refused_start(daemon)
    assert not Cgroup(daemon.cgroup_parent).exists()
    assert not Cgroup(daemon.cgroup_parent.rsplit("/", 1)[0]).exists()


def test_the_parent_a_daemon_makes_is_marked_its_own(tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        assert runs_parent.is_marked(daemon.cgroup_parent)
        assert os.getxattr(daemon.cgroup_dir(), runs_parent.MARK).decode() == \
            daemon.cgroup_parent
        # A check while it runs (a reload's, --check-config's) finds it the supervisor's.
        assert runs_parent.why_foreign(daemon.cgroup_parent) is None
        assert daemon.check_config().returncode == 0
    finally:
        daemon.finish()


def test_a_parent_inside_a_running_daemons_parent_is_refused(tmp_root: Path) -> None:
    """The first daemon's halt or watchdog kills all of its parent: a second daemon's parent
    inside it would go with it."""
    first = new_daemon(tmp_root)
    first.start()
    try:
        second = new_daemon(tmp_root)
        second.cgroup_parent = f"{first.cgroup_parent}/sub"
        log = refused_start(second)
        assert f"lies inside {first.cgroup_parent}" in log, log
        assert not Cgroup(second.cgroup_parent).exists()
        assert not Cgroup(second.cgroup_parent + "-watchdog").exists()
        assert first.client.health()
    finally:
        first.finish()


def test_a_parent_holding_a_running_daemons_parent_is_refused(tmp_root: Path) -> None:
    """A second daemon's parent above the first one's: its halt would kill the first's runs."""
    outer = f"{TEST_CGROUP_ROOT}/outer-{secrets.token_hex(3)}"
    first = new_daemon(tmp_root)
    first.cgroup_parent = f"{outer}/inner"
    first.start()
    try:
        second = new_daemon(tmp_root)
        second.cgroup_parent = outer
        log = refused_start(second)
        assert f"holds {unified_root() / first.cgroup_parent.strip('/')}" in log, log
        assert not runs_parent.is_marked(outer)
        assert first.client.health()
    finally:
        first.finish()
        Cgroup(outer).remove(strict=False)


def test_a_marked_ancestor_of_any_supervisor_refuses_a_parent_below(
        tmp_root: Path, foreign_cgroup: Cgroup) -> None:
    """A variant: the mark alone (another daemon's parent, whatever its path says) refuses a
    parent any depth below it, and a check of that parent names the marked one."""
    os.setxattr(foreign_cgroup.path, runs_parent.MARK, b"/elsewhere")
    below = f"{foreign_cgroup.relative}/a/b"
    why = runs_parent.why_foreign(below)
    assert why is not None and f"inside /{foreign_cgroup.relative}," in why
    daemon = new_daemon(tmp_root)
    daemon.cgroup_parent = "/" + below
    refused_start(daemon)
    assert not Cgroup(below).exists()


def test_a_stranger_in_the_gateways_cgroup_is_refused_and_survives(tmp_root: Path) -> None:
    """A gateway launch cgroup.kills <parent>-gateway: a foreign sleep there refuses the
    parent (absent itself), and lives on."""
    suffix = "-gateway"
    daemon = new_daemon(tmp_root)
    sibling = Cgroup(daemon.cgroup_parent + suffix).create(("pids",))
    try:
        with stranger_in(sibling, "pids") as sleep:
            log = refused_start(daemon)
            assert f"pid {sleep.pid}" in log and suffix in log, log
            assert not Cgroup(daemon.cgroup_parent).exists()
            assert sleep.poll() is None and sibling.pids() == [sleep.pid]
    finally:
        sibling.remove(strict=False)


def test_a_marked_parent_holding_a_foreign_cgroup_is_refused(
        tmp_root: Path, foreign_cgroup: Cgroup) -> None:
    """The mark covered everything under the parent: a `docker` cgroup made in it since was
    taken as the supervisor's, and a halt would kill what runs there."""
    os.setxattr(foreign_cgroup.path, runs_parent.MARK, ("/" + foreign_cgroup.relative).encode())
    assert runs_parent.is_marked(foreign_cgroup.relative)
    child = Cgroup(f"{foreign_cgroup.relative}/docker").create(("pids",))
    with stranger_in(child, "pids") as sleep:
        daemon = new_daemon(tmp_root)
        daemon.cgroup_parent = "/" + foreign_cgroup.relative
        assert "docker" in refused_start(daemon)
        assert sleep.poll() is None and child.pids() == [sleep.pid]


def test_a_run_named_cgroup_holding_a_foreign_process_is_refused(
        tmp_root: Path, foreign_cgroup: Cgroup) -> None:
    """An unmarked parent with no watchdog of ours beside it and no handover naming it: a
    process in a cgroup named as a run's is no run to adopt, and it lives on."""
    child = Cgroup(f"{foreign_cgroup.relative}/as-0123456789ab").create(("pids",))
    with stranger_in(child, "pids") as sleep:
        daemon = new_daemon(tmp_root)
        daemon.cgroup_parent = "/" + foreign_cgroup.relative
        log = refused_start(daemon)
        assert f"pid {sleep.pid}" in log and "no handover naming it" in log, log
        assert sleep.poll() is None and child.pids() == [sleep.pid]
        untouched(foreign_cgroup, daemon)


def test_an_existing_empty_cgroup_is_taken_but_not_marked(tmp_root: Path,
                                                          foreign_cgroup: Cgroup) -> None:
    """It may be another tool's, waiting for its processes: every later start judges it
    again instead of taking the mark's word."""
    daemon = new_daemon(tmp_root)
    daemon.cgroup_parent = "/" + foreign_cgroup.relative
    daemon.start()
    try:
        assert not runs_parent.is_marked(foreign_cgroup.relative)
        assert "not marked as the supervisor's" in daemon.logs()
    finally:
        daemon.finish()
