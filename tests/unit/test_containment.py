"""Automatic containment over the fake runtime: samples and syscall attempts trip rules, the
agent is paused or killed by system:tripwire with the rule in the audit. No root."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from supervisor.daemon.containment import Containment
from supervisor.models import ActionRequest, Actor, RunRequest, Scope
from supervisor.runtime.output import OutputCounts
from supervisor.telemetry import Sample, SyscallAttempt
from tests.unit.conftest import ArbiterEnv

ALICE = Actor(kind="user", uid=1000, name="alice")


def request(name: str, *rules: dict[str, Any]) -> RunRequest:
    return RunRequest.model_validate({"name": name, "command": ["agent"],
                                      "tripwires": list(rules)})


async def settle(containment: Containment) -> None:
    while containment._tasks:
        await asyncio.gather(*list(containment._tasks))


def test_a_sample_over_a_kill_rule_kills_with_the_rule_in_the_audit(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        containment = Containment(arbiter)
        env.audit.subscribe(containment.on_audit)
        view = await arbiter.launch(request(
            "a1", {"name": "fork", "metric": "processes", "above": 10, "action": "kill"}), ALICE)
        containment.run_started(view.id)
        containment.on_sample(view.id, Sample(ts=time.time(), wall_seconds=1, processes=5))
        await settle(containment)
        assert arbiter.agents["a1"].state == "active"
        containment.on_sample(view.id, Sample(ts=time.time(), wall_seconds=2, processes=50))
        await settle(containment)
        assert arbiter.agents["a1"].state == "killed"
        rows = env.audit.list()
        fired = next(r for r in rows if r.verb == "tripwire")
        assert (fired.actor, fired.outcome, fired.detail["rule"]) == (
            "system:tripwire", "kill", "fork")
        kill = next(r for r in rows if r.verb == "kill")
        assert kill.actor == "system:tripwire"
        assert kill.reason == "tripwire fork: processes 50 > 10"
        assert kill.time_to_halt_ms is not None

    asyncio.run(body())


def test_a_syscall_attempt_trips_at_once(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        counted: list[tuple[str, int]] = []
        containment = Containment(arbiter, counter=lambda run_id, n: counted.append((run_id, n)))
        view = await arbiter.launch(request(
            "a1", {"name": "escape", "metric": "syscall_attempts", "above": 0,
                   "action": "kill"}), ALICE)
        containment.run_started(view.id)
        container = arbiter.live[view.id].record.container_id
        # A coalesced record of three attempts counts three.
        containment.on_attempt(SyscallAttempt(time.time(), container, 4242, "unshare", 272,
                                              count=3))
        await settle(containment)
        assert counted == [(view.id, 3)]
        assert containment.attempts[view.id] == 3
        assert arbiter.agents["a1"].state == "killed"
        fired = next(r for r in env.audit.list() if r.verb == "tripwire")
        assert fired.detail["syscall"]["name"] == "unshare"
        # An attempt from a container the daemon does not know changes nothing.
        containment.on_attempt(SyscallAttempt(time.time(), "other", 1, "mount", 165))

    asyncio.run(body())


def test_an_attempt_before_the_tripwires_are_armed_trips_when_they_are(env: ArbiterEnv) -> None:
    # The command runs a moment before the arbiter arms its tripwires; an attempt in that
    # moment is not lost, and the rule fires on it once armed (never on a later attempt).
    async def body() -> None:
        arbiter = env.arbiter()
        containment = Containment(arbiter)
        view = await arbiter.launch(request(
            "a1", {"name": "escape", "metric": "syscall_attempts", "above": 0,
                   "action": "kill"}), ALICE)
        container = arbiter.live[view.id].record.container_id
        containment.on_attempt(SyscallAttempt(time.time(), container, 4242, "unshare", 272))
        await settle(containment)
        assert arbiter.agents["a1"].state == "active"
        containment.run_started(view.id)
        await settle(containment)
        assert arbiter.agents["a1"].state == "killed"
        [fired] = [r for r in env.audit.list() if r.verb == "tripwire"]
        assert (fired.detail["value"], fired.detail["syscall"]["pid"]) == (1, 4242)
        assert containment.unarmed == {}

    asyncio.run(body())


def test_alerts_auto_contain_by_pause_and_resume_rearms(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        containment = Containment(arbiter)
        env.audit.subscribe(containment.on_audit)
        view = await arbiter.launch(request(
            "a1", {"name": "cpu", "metric": "cpu_percent", "above": 80}), ALICE)
        containment.run_started(view.id)
        live = arbiter.live[view.id]
        assert live.profile is not None
        threshold = live.profile.tripwires.auto_containment_threshold
        for i in range(threshold):
            containment.on_sample(view.id, Sample(ts=i, wall_seconds=i, processes=1,
                                                  cpu_percent=99))
            await settle(containment)
        assert arbiter.agents["a1"].state == "paused"
        pause = next(r for r in env.audit.list() if r.verb == "pause")
        assert pause.actor == "system:tripwire"
        assert pause.reason.startswith(f"auto-containment after {threshold} consecutive")
        await arbiter.act("resume", ActionRequest(scope=Scope(agent="a1")), ALICE)
        for i in range(threshold):
            containment.on_sample(view.id, Sample(ts=10 + i, wall_seconds=i, processes=1,
                                                  cpu_percent=99))
            await settle(containment)
        assert arbiter.agents["a1"].state == "paused", "resume re-arms containment"

    asyncio.run(body())


def test_a_run_without_rules_is_not_tracked(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        containment = Containment(arbiter)
        view = await arbiter.launch(request("a1"), ALICE)
        containment.run_started(view.id)
        assert view.id not in containment.runs
        containment.on_sample(view.id, Sample(ts=0, wall_seconds=0, processes=10_000))
        containment.run_ended(view.id)
        assert arbiter.agents["a1"].state == "active"

    asyncio.run(body())


def test_an_output_cap_fires_the_output_tripwire_with_the_profiles_action(
        env: ArbiterEnv) -> None:
    async def body() -> None:
        (env.root / "profiles").mkdir(parents=True, exist_ok=True)
        (env.root / "profiles" / "quiet.toml").write_text(
            '[output]\nmax_bytes = "1M"\naction = "pause"\n')
        arbiter = env.arbiter()
        containment = Containment(arbiter)
        view = await arbiter.launch(RunRequest(name="a1", command=["agent"], profile="quiet"),
                                    ALICE)
        counts = OutputCounts(produced=2 * 1024**2, recorded=1024**2, cap=1024**2, capped=True)
        containment.output_capped(view.id, counts)
        await settle(containment)
        assert arbiter.agents["a1"].state == "paused"
        fired = [r for r in env.audit.list() if r.verb == "tripwire"]
        assert len(fired) == 1
        assert (fired[0].outcome, fired[0].detail["rule"], fired[0].detail["metric"]) == (
            "pause", "output_cap", "output_bytes")
        assert fired[0].detail["output"]["discarded"] == 1024**2
        pause = next(r for r in env.audit.list() if r.verb == "pause")
        assert pause.actor == "system:tripwire"
        containment.output_capped("no-such-run", counts)  # a run that ended meanwhile
        assert len([r for r in env.audit.list() if r.verb == "tripwire"]) == 1

    asyncio.run(body())
