"""One daemon per state and runtime directory (issue 13, audit F15): the lock a start takes
before it touches anything, how a second start is refused (at once, naming the holder), how a
start waits (bounded) for a holder that is stopping, and that no child and no stale file
keeps it. Real flock(2) on tmp files, real child processes; no root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config import Config, DaemonSection
from supervisor.daemon import instance
from supervisor.daemon.instance import (
    HANDOVER_WAIT,
    SERVING,
    STOPPING,
    InstanceLock,
    lock_paths,
    read_holder,
)
from supervisor.errors import DaemonRunning
from tests.unit.conftest import WAIT

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, state: str = "state", runtime: str = "run", **daemon: str
            ) -> Config:
    return Config(daemon=DaemonSection(state_dir=tmp_path / state,
                                       runtime_dir=tmp_path / runtime, **daemon))


class _Clock:
    """A clock that moves only when slept on, so no test depends on real time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds


def test_a_second_start_is_refused_at_once_naming_the_holder(tmp_path: Path) -> None:
    first = InstanceLock.acquire(_config(tmp_path))
    first.mark(SERVING)
    clock = _Clock()
    try:
        with pytest.raises(DaemonRunning) as refused:
            InstanceLock.acquire(_config(tmp_path), clock=clock, sleep=clock.sleep)
        assert clock.sleeps == 0  # no wait for a holder that serves
        error = refused.value
        assert error.code == "daemon_already_running" and error.exit_status == 69
        assert error.detail["holder_pid"] == os.getpid()
        assert error.detail["holder_state"] == SERVING
        assert error.detail["lock"] == str(tmp_path / "state" / "daemon.lock")
        assert f"pid {os.getpid()}" in error.message
        assert "state_dir" in (error.hint or "")
    finally:
        first.release()


def test_the_same_state_dir_with_another_runtime_dir_and_socket_is_refused(
        tmp_path: Path) -> None:
    first = InstanceLock.acquire(_config(tmp_path))
    try:
        other = _config(tmp_path, runtime="run2", socket_path=str(tmp_path / "other.sock"))
        with pytest.raises(DaemonRunning, match=r"state/daemon\.lock"):
            InstanceLock.acquire(other)
        # ...and the same runtime dir with another state dir: the runtime dir's lock.
        with pytest.raises(DaemonRunning, match=r"/run/daemon\.lock") as refused:
            InstanceLock.acquire(_config(tmp_path, state="state2"))
        # What it took before the refusal (the other state dir's lock) is let go again.
        assert refused.value.detail["holder_pid"] == os.getpid()
        InstanceLock.acquire(_config(tmp_path, state="state2", runtime="run3")).release()
    finally:
        first.release()


def test_a_released_lock_is_taken_and_the_record_names_the_new_holder(tmp_path: Path) -> None:
    InstanceLock.acquire(_config(tmp_path)).release()
    second = InstanceLock.acquire(_config(tmp_path))
    try:
        for path in lock_paths(_config(tmp_path)):
            assert read_holder(path)["pid"] == os.getpid()
            assert read_holder(path)["state"] == "starting"
            assert path.stat().st_mode & 0o777 == 0o600
    finally:
        second.release()


def test_a_start_waits_for_a_holder_that_is_stopping(tmp_path: Path) -> None:
    first = InstanceLock.acquire(_config(tmp_path))
    first.mark(STOPPING)
    clock = _Clock()

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.sleeps == 3:  # the stopping daemon exits
            first.release()

    second = InstanceLock.acquire(_config(tmp_path), clock=clock, sleep=sleep)
    try:
        assert clock.sleeps == 3
        assert read_holder(tmp_path / "state" / "daemon.lock")["state"] == "starting"
    finally:
        second.release()
        first.release()


def test_the_wait_for_a_stopping_holder_is_bounded(tmp_path: Path) -> None:
    first = InstanceLock.acquire(_config(tmp_path))
    first.mark(STOPPING)
    clock = _Clock()
    try:
        with pytest.raises(DaemonRunning, match="still stopping") as refused:
            InstanceLock.acquire(_config(tmp_path), clock=clock, sleep=clock.sleep)
        assert refused.value.detail["waited"] is True
        assert HANDOVER_WAIT <= clock.now < HANDOVER_WAIT + 1
    finally:
        first.release()


def test_an_unreadable_record_is_refused_not_waited_for(tmp_path: Path) -> None:
    """A holder whose record says nothing (between its lock and its first write) is treated
    as running: only a holder that says it is stopping is waited for."""
    first = InstanceLock.acquire(_config(tmp_path))
    path = tmp_path / "state" / "daemon.lock"
    os.pwrite(first.held[0][1], b"\0" * 256, 0)
    clock = _Clock()
    try:
        assert read_holder(path) == {"pid": None, "state": "unknown"}
        with pytest.raises(DaemonRunning, match="a process, unknown") as refused:
            InstanceLock.acquire(_config(tmp_path), clock=clock, sleep=clock.sleep)
        assert clock.sleeps == 0 and refused.value.detail["holder_pid"] is None
    finally:
        first.release()


def _child_holding(tmp_path: Path) -> subprocess.Popen[str]:
    """A process that takes the lock, says so and waits on stdin."""
    code = ("import sys; from pathlib import Path; from supervisor.config import Config, "
            "DaemonSection; from supervisor.daemon.instance import InstanceLock; "
            f"root = Path({str(tmp_path)!r}); "
            "lock = InstanceLock.acquire(Config(daemon=DaemonSection(state_dir=root / 'state', "
            "runtime_dir=root / 'run'))); print('held', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert child.stdout is not None
    assert child.stdout.readline() == "held\n"
    return child


def test_a_holder_that_dies_leaves_no_lock_behind(tmp_path: Path) -> None:
    """A crash (SIGKILL) releases it: the file stays, the lock does not."""
    child = _child_holding(tmp_path)
    try:
        with pytest.raises(DaemonRunning) as refused:
            InstanceLock.acquire(_config(tmp_path))
        assert refused.value.detail["holder_pid"] == child.pid
    finally:
        child.kill()
        child.communicate(timeout=WAIT)
    assert (tmp_path / "state" / "daemon.lock").exists()
    InstanceLock.acquire(_config(tmp_path)).release()


def _file_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def test_no_child_inherits_the_lock(tmp_path: Path) -> None:
    """A child that outlives the daemon (its watchdog) must not keep the next one out: the
    descriptors are O_CLOEXEC, so even a child spawned without close_fds has none."""
    lock = InstanceLock.acquire(_config(tmp_path))
    # Compared by the file behind each descriptor, not by number: the test runner may hand
    # down descriptors of its own (a CI harness does) that share the lock's numbers.
    held = {_file_id(os.fstat(fd)) for _path, fd in lock.held}
    assert len(held) == len(lock.held)
    # The child says when its start-up is over, so the files it opens while it imports are
    # closed before its descriptors are read.
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; print('up', flush=True); time.sleep(600)"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, close_fds=False)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"up\n"
        fd_dir = Path(f"/proc/{child.pid}/fd")
        names = os.listdir(fd_dir)
        assert names
        inherited = {_file_id(os.stat(fd_dir / n)) for n in names}
        assert not inherited & held
        lock.release()
        InstanceLock.acquire(_config(tmp_path)).release()  # the child alive, the lock free
    finally:
        child.kill()
        child.communicate(timeout=WAIT)
        lock.release()


def test_one_lock_when_state_and_runtime_are_one_directory(tmp_path: Path) -> None:
    config = _config(tmp_path, state="both", runtime="both")
    assert lock_paths(config) == [tmp_path / "both" / "daemon.lock"]
    InstanceLock.acquire(config).release()


def test_a_lock_path_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "daemon.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DaemonRunning, match="cannot open"):
        InstanceLock.acquire(_config(tmp_path))
    assert not (tmp_path / "elsewhere").exists()


def test_a_record_that_would_be_too_long_is_shortened(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    monkeypatch.setattr(instance, "__version__", "x" * 400)
    lock = InstanceLock.acquire(_config(tmp_path))
    try:
        assert read_holder(tmp_path / "state" / "daemon.lock")["pid"] == os.getpid()
    finally:
        lock.release()
