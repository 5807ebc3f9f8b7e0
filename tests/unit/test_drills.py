"""Drills over the fake runtime: a clean kill passes, a survivor or a missed SLO fails, and the
real `agentctl drill` exits non-zero on failure. No root."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from supervisor.config import DrillSection, KillSection
from supervisor.daemon.drills import Drills
from supervisor.models import Actor
from supervisor.runtime.fake import FakeRuntime
from tests.unit.conftest import MakeEnv, ServeFactory

OWNER = Actor(kind="user", uid=os.getuid(), name="tester")


def _agentctl(socket_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AGENT_SUPERVISOR_SOCKET": str(socket_path)}
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_clean_drill_passes_and_leaves_nothing(serve: ServeFactory) -> None:
    server = serve(runtime=FakeRuntime(start_processes=4))
    result = _agentctl(server.socket_path, "drill", "--processes", "4", "--slo", "1s",
                       "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    drill = json.loads(result.stdout)
    assert drill["passed"] is True
    assert drill["processes_seen"] == 4
    assert drill["survivors"] == []
    assert all(v == "pass" or v.startswith("n/a") for v in drill["checks"].values())
    # The passing drill's agent is gone from the registry; the drill is in history and audit.
    assert server.call(lambda: list(server.arbiter.agents)) == []  # type: ignore[union-attr]
    history = json.loads(_agentctl(server.socket_path, "drill", "--history", "--json").stdout)
    assert [d["id"] for d in history["drills"]] == [drill["id"]]
    audit = server.call(lambda: server.audit.list())
    drill_rows = [e for e in audit if e.verb == "drill"]
    assert len(drill_rows) == 1 and drill_rows[0].outcome == "ok"
    assert drill_rows[0].detail["passed"] is True


def test_a_drill_fails_when_a_process_survives(serve: ServeFactory) -> None:
    server = serve(runtime=FakeRuntime(start_processes=4, leave_survivor=True),
                   kill=KillSection(confirm_timeout=0.05, default_grace=1.0))
    result = _agentctl(server.socket_path, "drill", "--processes", "4")
    assert result.returncode == 12, result.stdout + result.stderr
    assert "FAILED" in result.stdout
    assert "kill_confirmed" in result.stdout and "fail" in result.stdout
    drill = server.call(lambda: server.drills.history())[0]  # type: ignore[union-attr]
    assert drill.passed is False
    assert drill.survivors != []
    assert drill.checks["no_processes"].startswith("fail")
    # The failed drill's agent stays, killed, for the on-call engineer to look at.
    agents = server.call(lambda: dict(server.arbiter.agents))  # type: ignore[union-attr]
    assert [a.state for a in agents.values()] == ["killed"]


def test_a_drill_fails_when_the_slo_is_missed(serve: ServeFactory) -> None:
    server = serve(runtime=FakeRuntime(start_processes=2))
    result = _agentctl(server.socket_path, "drill", "--processes", "2", "--slo", "1ms",
                       "--json")
    drill = json.loads(result.stdout)
    if drill["time_to_halt_ms"] is not None and drill["time_to_halt_ms"] <= 1.0:
        # The fake kills in well under a millisecond; then the SLO check is exercised by value.
        assert drill["checks"]["slo"] == "pass" and result.returncode == 0
        return
    assert result.returncode == 12
    assert drill["checks"]["slo"].startswith("fail")


def test_only_owners_may_drill(serve: ServeFactory) -> None:
    from supervisor.config import RolesSection

    # root is owner by definition (the role table is exercised with real users in e2e); any
    # other uid is made admin here, one role short.
    root = os.geteuid() == 0
    roles = RolesSection() if root else RolesSection(admin=[f"user:{os.getuid()}"])
    server = serve(roles=roles, runtime=FakeRuntime(start_processes=1))
    result = _agentctl(server.socket_path, "drill", "--processes", "1", "--json")
    if root:
        assert result.returncode == 0
    else:
        assert result.returncode == 5
        assert json.loads(result.stdout)["error"]["detail"]["needed_role"] == "owner"


def test_scheduled_drills_run_as_system_and_skip_during_a_global_halt(make_env: MakeEnv) -> None:
    env = make_env(runtime=FakeRuntime(start_processes=2))

    async def body() -> None:
        arbiter = env.arbiter()
        drills = Drills(arbiter, env.db, DrillSection(interval=0.02, processes=2, slo=1.0))
        schedule = asyncio.create_task(drills.schedule())
        try:
            await asyncio.wait_for(_until(lambda: len(drills.history()) >= 2), 5.0)
            assert {d.actor for d in drills.history()} == {"system:supervisor"}
            assert all(d.passed for d in drills.history())
            arbiter.global_halt = True
            count = len(drills.history())
            await asyncio.sleep(0.2)
            assert len(drills.history()) == count, "no drill may launch during a global halt"
        finally:
            schedule.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await schedule

    asyncio.run(body())


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.01)
