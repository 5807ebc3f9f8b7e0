"""The watchdog's stand-down (supervisor/daemon/watchdog.py) on the real cgroup tree: told
"done" without waiting (an embedded CI run gathers its evidence meanwhile), it exits on its own
and a later disarm() reaps it; with an agent process still alive under the parent it stays
armed, and the pipe closing without "done" makes it kill that process. Made with settle=False
(as Core.assemble does), it is in its own cgroup once settle() returns. Started early (an
embedded CI run's entry: start_early), the process is the one the first Watchdog takes, armed
with the arguments it sends; one whose starter never made a Watchdog exits holding nothing, and
one that died before is replaced. Needs root."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisor.daemon import watchdog as watchdog_module
from supervisor.daemon.watchdog import Watchdog
from supervisor.sandbox.cgroups import Cgroup, unified_root
from tests.conftest import require


@pytest.fixture
def parent() -> Iterator[Cgroup]:
    require(os.geteuid() == 0, "needs root (cgroups)")
    group = Cgroup(f"as-test-watchdog-{secrets.token_hex(4)}")
    (group.path / "run").mkdir(parents=True)
    yield group
    Cgroup(f"{group.relative}-watchdog").remove(strict=False)  # the watchdog's own
    group.remove(strict=False)


def test_stand_down_without_waiting_then_reaped(parent: Cgroup, tmp_path: Path) -> None:
    record = tmp_path / "watchdog.jsonl"
    watchdog = Watchdog(parent.path, record, timeout=5)
    assert watchdog.disarm(wait=False)
    assert watchdog.proc.returncode is None  # not waited for
    assert watchdog.disarm()  # only waits now
    assert watchdog.proc.returncode == 0
    assert not watchdog.cgroup.path.exists()  # its own cgroup goes with it
    assert watchdog.disarm() and watchdog.proc.returncode == 0  # again: a no-op
    assert not record.exists()


def agent_killed_as_the_channel_closes(parent: Cgroup, watchdog: Watchdog,
                                       armed: Callable[[], None] | None = None) -> None:
    """An agent in the parent's run cgroup; `armed` checked with it there; the watchdog's
    channel closed without "done" (its starter's death, as it sees it): the agent dies by
    SIGKILL and the watchdog exits 0."""
    agent = subprocess.Popen(["sleep", "300"])
    try:
        (parent.path / "run" / "cgroup.procs").write_text(str(agent.pid))
        if armed is not None:
            armed()
        watchdog.channel.close()
        assert agent.wait(timeout=60) == -9
        assert watchdog.proc.wait(timeout=60) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def test_an_agent_alive_keeps_it_armed_and_the_pipe_closing_kills_it(
        parent: Cgroup, tmp_path: Path) -> None:
    record = tmp_path / "watchdog.jsonl"
    watchdog = Watchdog(parent.path, record, timeout=5)
    def armed() -> None:
        assert parent.populated()
        assert not watchdog.disarm(wait=False)
        assert not watchdog.disarmed

    # The daemon's death, as the watchdog sees it.
    agent_killed_as_the_channel_closes(parent, watchdog, armed)
    [line] = record.read_text().splitlines()
    report = json.loads(line)
    assert report["confirmed_empty"] is True
    assert report["cgroup"] == str(unified_root() / parent.relative)


def test_moved_into_its_cgroup_once_settled(parent: Cgroup, tmp_path: Path) -> None:
    """settle=False (Core.assemble): the move into its own cgroup runs while the caller goes
    on; settle() returns with the process there (the handover's check agrees)."""
    watchdog = Watchdog(parent.path, tmp_path / "watchdog.jsonl", timeout=5, settle=False)
    watchdog.settle()
    assert watchdog.escape_error is None
    assert watchdog.proc.pid in watchdog.cgroup.pids()
    assert watchdog.cannot_hold() is None
    watchdog.settle()  # again: a no-op
    assert watchdog.disarm() and watchdog.proc.returncode == 0



@pytest.fixture
def early() -> Iterator[None]:
    """start_early's process for one test; whatever is left of it ended at the end."""
    assert watchdog_module._early is None
    watchdog_module.start_early()
    assert watchdog_module._early is not None
    yield
    left = watchdog_module._early
    watchdog_module._early = None
    if left is not None:
        proc, channel = left
        channel.close()
        proc.wait(timeout=60)


def test_started_early_armed_with_the_arguments_it_is_sent(
        parent: Cgroup, tmp_path: Path, early: None) -> None:
    """The first Watchdog takes the early process (no second one), sends it its arguments,
    and that process then kills an agent when the channel closes without "done", in its own
    cgroup, recording to the record path it was sent."""
    assert watchdog_module._early is not None
    started = watchdog_module._early[0]
    record = tmp_path / "watchdog.jsonl"
    watchdog = Watchdog(parent.path, record, timeout=5, settle=False)
    assert watchdog.proc is started
    assert watchdog_module._early is None
    watchdog.settle()
    assert watchdog.cannot_hold() is None
    agent_killed_as_the_channel_closes(parent, watchdog)  # the runner's death
    [line] = record.read_text().splitlines()
    assert json.loads(line)["cgroup"] == str(unified_root() / parent.relative)
    second = Watchdog(parent.path, tmp_path / "second.jsonl", timeout=5)
    assert second.proc.args == second.args  # started as always, not with --arguments-on-channel
    assert second.disarm() and second.proc.returncode == 0


def test_started_early_and_never_taken_exits_holding_nothing(early: None) -> None:
    """The runner left before making its core (a refused spec): the channel closes with no
    arguments sent, and the process exits 0 without a traceback or a kill."""
    assert watchdog_module._early is not None
    proc, channel = watchdog_module._early
    watchdog_module._early = None
    channel.close()
    assert proc.wait(timeout=60) == 0
    assert proc.args[-1] == watchdog_module.ARGUMENTS_ON_CHANNEL


def test_started_early_and_dead_is_replaced(parent: Cgroup, tmp_path: Path,
                                            early: None) -> None:
    """An early process that died before it was taken: the Watchdog starts one as always,
    armed and standing down on "done"."""
    assert watchdog_module._early is not None
    dead = watchdog_module._early[0]
    dead.kill()
    dead.wait(timeout=60)
    watchdog = Watchdog(parent.path, tmp_path / "watchdog.jsonl", timeout=5)
    assert watchdog.proc is not dead
    assert watchdog.proc.args == watchdog.args
    assert watchdog_module._early is None
    assert watchdog.cannot_hold() is None
    assert watchdog.disarm() and watchdog.proc.returncode == 0


def test_imports_nothing_from_its_starters_directory(
        parent: Cgroup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon started by hand in a directory others write (a checkout): its root watchdog
    runs in "/", and does not import that directory's json.py before the standard library's."""
    marker = tmp_path / "imported-as-root"
    planted = tmp_path / "checkout"
    planted.mkdir()
    (planted / "json.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(planted)
    watchdog = Watchdog(parent.path, Path("watchdog.jsonl"), timeout=5)
    assert watchdog.disarm() and watchdog.proc.returncode == 0
    assert not marker.exists()
    assert watchdog.options[watchdog.options.index("--record") + 1] == str(
        planted / "watchdog.jsonl")  # a relative record is its starter's, made absolute
