"""An embedded CI run's watchdog (supervisor/daemon/watchdog.py) killed while the agent runs: the
runner notices the death on its loop (the process's pidfd) and starts a new one at once, as the
daemon does (daemon/core.py `watch_watchdog`), so the runner's own SIGKILL afterwards still gets
the agent killed, by the replacement. When no new watchdog can be started the runner kills the
run itself (fail closed) and ends with `watchdog_lost`, status 84. Real runc, cgroups and
processes; needs root."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.ci import ENV_VAR
from supervisor.cli import fast
from supervisor.sandbox.cgroups import unified_root
from tests.conftest import require_root_and_runc
from tests.support.daemon import wait_for
from tests.support.embedded import (
    CI_CGROUP_ROOT,
    WORKSPACE_UID,
    agentctl_command,
    agentctl_env,
    clean_state_root,
    hold_slot,
    run_in_slot,
)

pytestmark = pytest.mark.e2e

AGENT = ["sh", "-c", "echo ready > ready; sleep 300"]

# The runner as agentctl execs it (python -I -m supervisor.ci), with every watchdog after the
# first refused as a fork the host cannot make would be: the first is the one the runner's
# entry starts early (watchdog.start_early), the next would replace it.
RESPAWN_REFUSED = """
import errno, runpy
from supervisor.daemon import watchdog
start = watchdog._start
started = []
def refused(args):
    started.append(args)
    if len(started) > 1:
        raise OSError(errno.EAGAIN, "fork refused by the test")
    return start(args)
watchdog._start = refused
runpy.run_module("supervisor.ci", run_name="__main__")
"""


@pytest.fixture
def ci(tmp_root: Path) -> Iterator[Path]:
    require_root_and_runc()
    with clean_state_root(tmp_root / "ci-state") as state_root:
        yield state_root


@pytest.fixture
def workspace(tmp_root: Path) -> Path:
    path = tmp_root / "workspace"
    path.mkdir()
    os.chown(path, WORKSPACE_UID, WORKSPACE_UID)
    return path


def _audit(slot: Path, verb: str) -> list[dict[str, Any]]:
    """The run's audit rows of `verb` so far (its outcome and detail), read from the slot's
    live database; [] while a write holds it."""
    database = slot / "state" / "state.db"
    if not database.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True,
                                                timeout=1)) as db:
            rows = db.execute("SELECT outcome, detail FROM audit WHERE verb = ? ORDER BY seq",
                              (verb,)).fetchall()
    except sqlite3.OperationalError:  # locked by a write, or not made yet
        return []
    return [{"outcome": outcome, **json.loads(detail)} for outcome, detail in rows]


def _respawns(slot: Path, at_least: int) -> list[dict[str, Any]]:
    """The run's `watchdog_respawn` rows, once there are `at_least`; else []."""
    rows = _audit(slot, "watchdog_respawn")
    return rows if len(rows) >= at_least else []


def _kill_watchdog(pid: int, runner: int) -> None:
    """SIGKILL the runner's watchdog `pid`, once it is sure to be that: a child of `runner`
    running the watchdog's module (no other process of the host is ever signalled)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert int(stat.rpartition(")")[2].split()[1]) == runner, stat
    assert b"supervisor.daemon.watchdog" in cmdline, cmdline
    os.kill(pid, signal.SIGKILL)


def _populated(slot: Path) -> bool:
    """Whether a process is left in the slot's cgroup (the agent's lies below it)."""
    events = unified_root() / CI_CGROUP_ROOT / slot.name / "cgroup.events"
    with contextlib.suppress(FileNotFoundError):
        return "populated 1" in events.read_text().splitlines()
    return False


def _running(ci: Path, workspace: Path, argv: list[str], env: dict[str, str]
             ) -> tuple[subprocess.Popen[str], Path, int]:
    """The run started by `argv`, its agent up: (its process, its slot's directory, the
    watchdog pid its start row records)."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, cwd="/")
    try:
        wait_for(lambda: (workspace / "ready").exists() or proc.poll() is not None,
                 timeout=60, what="the agent")
        assert proc.poll() is None, proc.communicate()
        (slot,) = ci.glob("slot*")
        [start] = wait_for(lambda: _audit(slot, "ci_run_start"), what="the run's start row")
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc, slot, start["watchdog_pid"]


@pytest.mark.parametrize("kills", [1, 2])
def test_a_watchdog_killed_mid_run_is_replaced_and_the_replacement_kills_the_agent(
        ci: Path, workspace: Path, kills: int) -> None:
    """The watchdog SIGKILLed while the agent runs (twice: the replacement too), then the
    runner: the agent's cgroup is emptied all the same, by the last replacement. Before, the
    dead watchdog stayed dead and the agent outlived the runner."""
    proc, slot, watchdog = _running(
        ci, workspace, agentctl_command("run", "--embedded", "--workspace", str(workspace),
                                        "--", *AGENT), agentctl_env(ci))
    try:
        for kill in range(1, kills + 1):
            _kill_watchdog(watchdog, proc.pid)
            respawns = wait_for(functools.partial(_respawns, slot, kill), timeout=30,
                                what="a new watchdog")
            assert [(r["outcome"], r["exit_code"]) for r in respawns] == [("ok", -9)] * kill
            assert respawns[-1]["new_pid"] != watchdog
            watchdog = respawns[-1]["new_pid"]
        assert _populated(slot) and proc.poll() is None  # the run goes on
        os.killpg(proc.pid, signal.SIGKILL)  # agentctl exec'd the runner: this is the runner
        proc.communicate(timeout=30)
        hold_slot(slot.name)  # until run_in_slot: no other test's run reaps it first
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    wait_for(lambda: not _populated(slot), timeout=60,
             what="the replacement watchdog's kill of the agent")
    # The next run of the slot reaps the rest (its netns, bundle and state); the ci fixture
    # then holds the host clean.
    result = run_in_slot(ci, slot.name, "--", "true")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_watchdog_that_cannot_be_replaced_kills_the_run(
        ci: Path, workspace: Path, tmp_root: Path) -> None:
    """No new watchdog can be started (its fork refused): the runner kills the run through the
    kill path at once rather than go on without a switch, and says so: `watchdog_lost` on
    stderr and in the report's errors, the refusal in its `watchdog`, status 84."""
    report_path = tmp_root / "report.json"
    env = agentctl_env(ci)
    todo = fast.plan(["run", "--embedded", "--workspace", str(workspace), "--report",
                      str(report_path), "--", *AGENT], env)
    assert todo is not None and todo.embedded is not None
    env[ENV_VAR] = json.dumps(todo.embedded)
    proc, slot, watchdog = _running(ci, workspace, [sys.executable, "-I", "-c", RESPAWN_REFUSED],
                                    env)
    try:
        _kill_watchdog(watchdog, proc.pid)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 84, out + err
    assert "watchdog_lost" in err and "no new one could be started" in err, err
    report = json.loads(report_path.read_text())
    assert report["ending"] == "killed" and report["exit_status"] == 84, report
    assert report["end_reason"] == "kill: the watchdog died and no new one could be started"
    assert [e["code"] for e in report["errors"]] == ["watchdog_lost"], report["errors"]
    assert "fork refused by the test" in report["watchdog"]["lost"]
    assert report["teardown"]["clean"], report["teardown"]
    audit = [json.loads(line) for line in
             Path(f"{report_path}.audit.jsonl").read_text().splitlines()]
    [respawn] = [row for row in audit if row["verb"] == "watchdog_respawn"]
    assert respawn["outcome"] == "failed" and respawn["detail"]["exit_code"] == -9
    kills = [row for row in audit if row["verb"] == "kill"]
    assert kills and "no new one could be started" in kills[0]["reason"], kills
    assert not _populated(slot)
