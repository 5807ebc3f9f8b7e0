"""The arbiter (supervisor/daemon/arbiter.py) over the in-memory FakeRuntime and a real SQLite
file: launch, the kill path, the other verbs, scopes, timeouts, reconcile and races. No root.
Every test's audit chain is verified afterwards by the `make_env` fixture."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import DiskSection, KillSection
from supervisor.daemon.arbiter import GLOBAL_HALT_KEY, Arbiter
from supervisor.daemon.observers import RunObservers
from supervisor.errors import (
    AgentBusy,
    AgentKilled,
    AgentNotFound,
    DiskSpaceLow,
    GlobalHalt,
    IllegalTransition,
    KillUnconfirmed,
    RuntimeFailure,
)
from supervisor.models import ActionRequest, ActionResult, AuditEntry, RunRequest, RunView, Scope
from supervisor.runtime.base import Leftover, RunParams
from supervisor.runtime.fake import FakeRunHandle, FakeRuntime
from tests.unit.conftest import ALICE, WAIT, ArbiterEnv, MakeEnv, wait_done

SYSTEM_LABEL = "system:supervisor"


def request(name: str, agent_class: str | None = None, **extra: Any) -> RunRequest:
    body: dict[str, Any] = {"name": name, "command": ["sleep", "infinity"], **extra}
    if agent_class is not None:
        body["class"] = agent_class
    return RunRequest.model_validate(body)


def scope(agent: str | None = None, agent_class: str | None = None,
          everything: bool = False) -> Scope:
    if agent is not None:
        return Scope(agent=agent)
    if agent_class is not None:
        return Scope.model_validate({"class": agent_class})
    assert everything
    return Scope(all=True)


async def act(arbiter: Arbiter, verb: str, target: Scope, reason: str = "",
              grace: float | None = None) -> ActionResult:
    return await arbiter.act(verb, ActionRequest(scope=target, reason=reason, grace=grace), ALICE)


def last(env: ArbiterEnv, verb: str | None = None) -> AuditEntry:
    """The latest audit row, or the latest with `verb` (a kill's cleanup row follows it)."""
    if verb is None:
        return env.audit.list(limit=1)[0]
    return next(entry for entry in reversed(env.audit.list(limit=100)) if entry.verb == verb)


def handle_of(env: ArbiterEnv, view: RunView) -> FakeRunHandle:
    return env.runtime.handles[view.id]


async def launch_idle(arbiter: Arbiter, env: ArbiterEnv, name: str) -> RunView:
    """An agent that ran once and exited by itself: registered and idle."""
    view = await arbiter.launch(request(name), ALICE)
    handle_of(env, view).finish(0)
    await wait_done(arbiter, view.id)
    assert arbiter.agents[name].state == "idle"
    return view


# ----------------------------------------------------------------------------- launch


def test_launch_registers_the_agent_and_audits(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(request("a1", "web", workspace="/srv/ws"), ALICE)
        assert (view.agent, view.state) == ("a1", "running")
        assert view.command == ["sleep", "infinity"]
        assert view.profile == "default" and view.workspace == "/srv/ws"
        handle = handle_of(env, view)
        assert handle.started and handle.pid == view.pid
        assert handle.params.cgroup.endswith(f"as-{view.id}")
        assert arbiter.agent_view("a1").state == "active"
        [stored] = env.store.agents()
        assert (stored.name, stored.agent_class, stored.state) == ("a1", "web", "active")
        assert stored.current_run == view.id
        record = env.store.run(view.id)
        assert record is not None and record.state == "running"
        entry = last(env)
        assert (entry.verb, entry.target, entry.outcome) == ("launch", "a1", "ok")
        assert (entry.previous_state, entry.new_state) == ("idle", "active")
        assert entry.actor == ALICE.label()
        assert entry.detail["run"] == view.id and entry.detail["pid"] == view.pid

    asyncio.run(body())


def test_a_run_starts_only_once_before_start_has_answered(env: ArbiterEnv) -> None:
    """`before_start` (an embedded CI run's watchdog still being moved into its cgroup and
    its disk reserve being taken: daemon/core.py) is awaited after the sandbox is created and
    before the command starts; while it waits the command has not started, and when it
    fails the command never starts, the launch fails and the sandbox is cleaned up."""
    async def body() -> None:
        arbiter = env.arbiter()
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        arbiter.before_start = lambda: asyncio.shield(gate)
        launching = asyncio.ensure_future(arbiter.launch(request("a1"), ALICE))
        await asyncio.sleep(0.05)
        [handle] = env.runtime.handles.values()
        assert not launching.done() and not handle.started
        gate.set_result(None)
        view = await asyncio.wait_for(launching, WAIT)
        assert view.state == "running" and handle.started

        async def refuse() -> None:
            raise RuntimeFailure("the watchdog could not be started")

        arbiter.before_start = refuse
        with pytest.raises(RuntimeFailure):
            await arbiter.launch(request("a2"), ALICE)
        refused = next(h for h in env.runtime.handles.values() if h.params.agent == "a2")
        assert not refused.started
        await asyncio.wait_for(arbiter.shutdown("test over"), WAIT)
        assert refused.cleaned
        entry = last(env, "launch")
        assert (entry.target, entry.outcome) == ("a2", "failed:runtime_failed")

    asyncio.run(body())


def test_launch_of_a_killed_agent_is_refused_and_audited(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        await arbiter.launch(request("a1"), ALICE)
        await act(arbiter, "kill", scope("a1"), "runaway")
        launched = len(env.runtime.handles)
        rows = env.audit.count()
        with pytest.raises(AgentKilled) as info:
            await arbiter.launch(request("a1"), ALICE)
        assert info.value.detail["agent"] == "a1"
        assert "runaway" in info.value.message
        assert arbiter.agents["a1"].state == "killed"
        assert len(env.runtime.handles) == launched, "a killed agent reached the runtime"
        assert env.audit.count() == rows + 1
        entry = last(env)
        assert (entry.verb, entry.target, entry.outcome) == ("launch", "a1",
                                                             "refused:agent_killed")

    asyncio.run(body())


def test_reactivate_lifts_the_hold(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        await arbiter.launch(request("a1"), ALICE)
        await act(arbiter, "kill", scope("a1"))
        result = await act(arbiter, "reactivate", scope("a1"), "fixed")
        assert (result.results[0].previous_state, result.results[0].new_state) == (
            "killed", "idle")
        assert (last(env).verb, last(env).new_state) == ("reactivate", "idle")
        view = await arbiter.launch(request("a1"), ALICE)
        assert view.state == "running"

    asyncio.run(body())


def test_launch_while_busy(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        first = await arbiter.launch(request("a1"), ALICE)
        with pytest.raises(AgentBusy):
            await arbiter.launch(request("a1"), ALICE)
        await act(arbiter, "pause", scope("a1"))
        with pytest.raises(AgentBusy):
            await arbiter.launch(request("a1"), ALICE)
        assert list(env.runtime.handles) == [first.id]
        assert arbiter.agents["a1"].current_run == first.id

    asyncio.run(body())


def test_failed_first_launch_leaves_no_agent_and_audits(make_env: MakeEnv) -> None:
    """Bad input changes nothing: a first launch that fails registers no agent (issue 11, item
    9: fuzzing left 920 agents behind); the run's record and the audit row say what happened."""
    env = make_env(runtime=FakeRuntime(fail_launch=RuntimeFailure("runc create failed")))

    async def body() -> None:
        arbiter = env.arbiter()
        with pytest.raises(RuntimeFailure):
            await arbiter.launch(request("a1"), ALICE)
        assert "a1" not in arbiter.agents
        assert [a.name for a in env.store.agents()] == []
        assert arbiter.live == {}
        entry = last(env)
        assert (entry.verb, entry.outcome) == ("launch", "failed:runtime_failed")
        record = env.store.run(entry.detail["run"])
        assert record is not None and record.state == "failed" and record.ended_at

    asyncio.run(body())


def test_failed_relaunch_leaves_the_agent_idle_and_audits(make_env: MakeEnv) -> None:
    runtime = FakeRuntime()
    env = make_env(runtime=runtime)

    async def body() -> None:
        arbiter = env.arbiter()
        first = await arbiter.launch(request("a1"), ALICE)
        runtime.handles[first.id].finish(0)
        await asyncio.wait_for(_until_idle(arbiter, "a1"), WAIT)
        runtime.fail_launch = RuntimeFailure("runc create failed")
        with pytest.raises(RuntimeFailure):
            await arbiter.launch(request("a1"), ALICE)
        agent = arbiter.agents["a1"]
        assert agent.state == "idle" and agent.current_run is None
        assert arbiter.live == {}
        assert agent.last_run is not None and agent.last_run != first.id
        record = env.store.run(agent.last_run)
        assert record is not None and record.state == "failed" and record.ended_at
        entry = last(env)
        assert (entry.verb, entry.outcome) == ("launch", "failed:runtime_failed")

    asyncio.run(body())


async def _until_idle(arbiter: Any, name: str) -> None:
    while arbiter.agents[name].state != "idle" or arbiter.agents[name].current_run:
        await asyncio.sleep(0.01)


def test_relaunch_without_a_class_keeps_the_class(env: ArbiterEnv) -> None:
    """The class is part of the agent's identity: a class-wide kill must still reach an agent
    that was relaunched without repeating --class."""

    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(request("a1", "web"), ALICE)
        handle_of(env, view).finish(0)
        await wait_done(arbiter, view.id)
        await arbiter.launch(request("a1"), ALICE)
        assert arbiter.agents["a1"].agent_class == "web"
        result = await act(arbiter, "kill", scope(agent_class="web"))
        assert [r.agent for r in result.results] == ["a1"]
        assert arbiter.agents["a1"].state == "killed"

    asyncio.run(body())


# ----------------------------------------------------------------------------- kill


def test_a_kill_of_a_class_with_no_agent_here_answers_with_no_results(env: ArbiterEnv) -> None:
    # A fleet halt of a class reaches every host, also those with none of its agents.
    async def body() -> None:
        arbiter = env.arbiter()
        await arbiter.launch(request("a1", "web"), ALICE)
        result = await act(arbiter, "kill", scope(agent_class="batch"), "fleet halt")
        assert result.results == [] and result.time_to_halt_ms is None
        assert arbiter.agents["a1"].state == "active"
        assert not arbiter._cleanup_audits

    asyncio.run(body())



def test_kill_single_agent(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(request("a1"), ALICE)
        handle = handle_of(env, view)
        result = await act(arbiter, "kill", scope("a1"), "runaway")
        [item] = result.results
        assert (item.agent, item.previous_state, item.new_state) == ("a1", "active", "killed")
        assert item.run_id == view.id and item.skipped is None
        halt = item.time_to_halt_ms
        assert halt is not None and halt >= 0
        assert result.time_to_halt_ms == halt
        assert (result.verb, result.scope, result.reason) == ("kill", "agent:a1", "runaway")
        assert result.actor == ALICE.label() and not result.global_halt

        # The kill path ran on the run: SIGKILL, confirmed empty, network gone; the runtime's
        # state goes after the answer.
        assert handle.processes == 0
        assert handle.network is False
        assert view.id not in arbiter.live
        await asyncio.wait_for(arbiter.settled(view.id), WAIT)
        assert handle.cleaned is True

        record = env.store.run(view.id)
        assert record is not None
        assert (record.state, record.exit_code) == ("killed", 128 + signal.SIGKILL)
        assert record.time_to_halt_ms == halt
        assert record.ended_at is not None and record.end_reason == "kill: runaway"

        agent = arbiter.agent_view("a1")
        assert agent.state == "killed" and agent.time_to_halt_ms == halt
        assert agent.last_reason == "runaway" and agent.last_actor == ALICE.label()
        assert agent.run is not None and agent.run.state == "killed"
        [stored] = env.store.agents()
        assert stored.state == "killed" and stored.current_run is None

        entry = last(env, "kill")
        assert (entry.verb, entry.scope, entry.target, entry.outcome) == (
            "kill", "agent:a1", "a1", "ok")
        assert (entry.previous_state, entry.new_state) == ("active", "killed")
        assert entry.time_to_halt_ms == halt and entry.reason == "runaway"
        # Step 6 after the answer has its own row, as a class or global halt's has.
        await asyncio.gather(*arbiter._cleanup_audits)
        cleanup = last(env)
        assert (cleanup.verb, cleanup.scope, cleanup.target, cleanup.reason, cleanup.outcome) == (
            "cleanup", "agent:a1", "a1", "after kill", "ok")
        assert (cleanup.detail["run"], cleanup.detail["runs"], cleanup.detail["failed"]) == (
            view.id, 1, [])
        assert entry.detail["confirmed_empty"] is True
        assert entry.detail["netns_removed"] is True
        assert entry.detail["mechanism"] == "fake.kill"

    asyncio.run(body())


def test_kill_revokes_credentials_before_sigkill(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(request("a1"), ALICE)
        handle = handle_of(env, view)
        seen: list[tuple[str, int]] = []

        class Gateway:
            async def revoke(self, run_id: str) -> bool:
                seen.append((run_id, handle.processes))
                return True

            def revocation_check(self, run_id: str) -> None:
                return None

        arbiter.credentials = Gateway()
        await act(arbiter, "kill", scope("a1"))
        assert seen == [(view.id, 1)], "credentials must go before the processes do"
        assert last(env).detail["credentials_revoked"] is True

    asyncio.run(body())


def test_kill_of_an_idle_agent_holds_it(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        await launch_idle(arbiter, env, "a1")
        result = await act(arbiter, "kill", scope("a1"))
        assert result.results[0].new_state == "killed"
        assert result.results[0].time_to_halt_ms is None  # nothing was running
        with pytest.raises(AgentKilled):
            await arbiter.launch(request("a1"), ALICE)

    asyncio.run(body())


def test_kill_that_leaves_a_survivor_is_unconfirmed(make_env: MakeEnv) -> None:
    env = make_env(runtime=FakeRuntime(leave_survivor=True),
                   kill=KillSection(confirm_timeout=0.05))

    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(request("a1"), ALICE)
        with pytest.raises(KillUnconfirmed) as info:
            await act(arbiter, "kill", scope("a1"), "runaway")
        assert info.value.detail["agent"] == "a1"
        assert info.value.detail["survivors"] == [view.pid]
        entry = last(env)
        assert (entry.verb, entry.target, entry.outcome) == ("kill", "a1", "unconfirmed")
        assert entry.detail["confirmed_empty"] is False
        assert "escalated" in entry.detail
        assert arbiter.agents["a1"].state == "killed"  # the hold stays
        with pytest.raises(AgentKilled):
            await arbiter.launch(request("a1"), ALICE)

    asyncio.run(body())


def test_an_unconfirmed_kill_once_confirmed_audits_its_cleanup(make_env: MakeEnv) -> None:
    env = make_env(runtime=FakeRuntime(leave_survivor=True),
                   kill=KillSection(confirm_timeout=0.05))

    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(request("a1"), ALICE)
        live = arbiter.live[view.id]
        with pytest.raises(KillUnconfirmed):
            await act(arbiter, "kill", scope("a1"), "runaway")
        assert not arbiter._cleanup_audits  # nothing to clean up while it is alive
        env.runtime.leave_survivor = False  # the next SIGKILL of the background retry lands
        await asyncio.wait_for(live.done.wait(), WAIT)
        await asyncio.gather(*arbiter._cleanup_audits)
        verbs = [e.verb for e in env.audit.list(limit=3)]
        assert verbs == ["kill", "kill_confirmed", "cleanup"]
        cleanup = last(env)
        assert (cleanup.target, cleanup.reason, cleanup.outcome, cleanup.detail["run"]) == (
            "a1", "after kill", "ok", view.id)

    asyncio.run(body())


class SurvivorRuntime(FakeRuntime):
    """Runs of the agents in `survivors` leave a process behind when killed; others die."""

    def __init__(self, survivors: set[str]) -> None:
        super().__init__()
        self.survivors = survivors

    async def launch(self, params: RunParams) -> FakeRunHandle:
        handle = await super().launch(params)
        if params.agent in self.survivors:
            def kill_leaving_a_survivor(*, force_fallback: bool = False) -> str:
                handle.processes = 1
                return "fake.kill"

            handle.kill = kill_leaving_a_survivor  # type: ignore[method-assign]
        return handle


def test_class_kill_reports_every_agent_when_one_is_unconfirmed(make_env: MakeEnv) -> None:
    """A scoped kill must not answer as if it succeeded while leaving out the agent whose kill
    the kernel did not confirm: the operator has to learn which agent is still alive."""
    env = make_env(runtime=SurvivorRuntime({"a2"}), kill=KillSection(confirm_timeout=0.05))

    async def body() -> None:
        arbiter = env.arbiter()
        await arbiter.launch(request("a1", "red"), ALICE)
        await arbiter.launch(request("a2", "red"), ALICE)
        try:
            result = await act(arbiter, "kill", scope(agent_class="red"), "red alert")
        except KillUnconfirmed as exc:
            assert exc.detail["agent"] == "a2"
        else:
            assert sorted(r.agent for r in result.results) == ["a1", "a2"], (
                "the unconfirmed kill of a2 is missing from the answer")
        outcomes = {e.target: e.outcome for e in env.audit.list() if e.verb == "kill"}
        assert outcomes == {"a1": "ok", "a2": "unconfirmed"}

    asyncio.run(body())


# ----------------------------------------------------------------------------- other verbs


def test_pause_and_resume(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(request("a1"), ALICE)
        handle = handle_of(env, view)
        result = await act(arbiter, "pause", scope("a1"), "look")
        assert (result.results[0].previous_state, result.results[0].new_state) == (
            "active", "paused")
        assert (handle.frozen, handle.processes) == (True, 1)
        assert arbiter.agent_view("a1").state == "paused"
        assert arbiter.agent_view("a1").run.state == "paused"  # type: ignore[union-attr]
        assert (last(env).verb, last(env).new_state) == ("pause", "paused")

        result = await act(arbiter, "resume", scope("a1"))
        assert result.results[0].new_state == "active"
        assert (handle.frozen, handle.processes) == (False, 1)
        assert arbiter.agent_view("a1").run.state == "running"  # type: ignore[union-attr]
        assert (last(env).verb, last(env).new_state) == ("resume", "active")
        assert handle.processes == 1 and handle.network, "pause/resume must not kill"

    asyncio.run(body())


@pytest.mark.parametrize("paused", [False, True])
def test_graceful_stop(env: ArbiterEnv, paused: bool) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(request("a1"), ALICE)
        handle = handle_of(env, view)
        if paused:
            await act(arbiter, "pause", scope("a1"))
        result = await act(arbiter, "stop", scope("a1"), "done", grace=5.0)
        [item] = result.results
        assert (item.previous_state, item.new_state) == ("paused" if paused else "active", "idle")
        assert item.time_to_halt_ms is not None
        assert handle.signals == [signal.SIGTERM]
        assert not handle.frozen
        await asyncio.wait_for(arbiter.settled(view.id), WAIT)  # step 6 follows the answer
        assert handle.network is False and handle.cleaned
        record = env.store.run(view.id)
        assert record is not None
        assert (record.state, record.exit_code) == ("exited", 128 + signal.SIGTERM)
        assert arbiter.agents["a1"].state == "idle"
        entry = last(env)
        assert (entry.verb, entry.new_state, entry.outcome) == ("stop", "idle", "ok")
        assert entry.detail["graceful"] is True
        await arbiter.launch(request("a1"), ALICE)  # stop is not a hold

    asyncio.run(body())


def test_stop_escalates_to_the_kill_path_after_the_grace(make_env: MakeEnv) -> None:
    env = make_env(runtime=FakeRuntime(exit_on_signal=False))

    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(request("a1"), ALICE)
        handle = handle_of(env, view)
        result = await act(arbiter, "stop", scope("a1"), grace=0.05)
        [item] = result.results
        assert (item.previous_state, item.new_state) == ("active", "idle")
        assert item.time_to_halt_ms is not None
        assert handle.signals == [signal.SIGTERM]
        await asyncio.wait_for(arbiter.settled(view.id), WAIT)  # step 6 follows the answer
        assert handle.processes == 0 and handle.network is False and handle.cleaned
        record = env.store.run(view.id)
        assert record is not None
        assert (record.state, record.exit_code) == ("killed", 128 + signal.SIGKILL)
        assert arbiter.agents["a1"].state == "idle", "a stop never holds the agent"
        entry = last(env, "stop")
        assert (entry.verb, entry.new_state, entry.outcome) == ("stop", "idle", "ok")
        assert "0.05s" in entry.reason
        assert entry.detail["confirmed_empty"] is True
        await arbiter.launch(request("a1"), ALICE)

    asyncio.run(body())


async def _active(arbiter: Arbiter, env: ArbiterEnv) -> None:
    await arbiter.launch(request("a1"), ALICE)


async def _paused(arbiter: Arbiter, env: ArbiterEnv) -> None:
    await arbiter.launch(request("a1"), ALICE)
    await act(arbiter, "pause", scope("a1"))


async def _idle(arbiter: Arbiter, env: ArbiterEnv) -> None:
    await launch_idle(arbiter, env, "a1")


async def _killed(arbiter: Arbiter, env: ArbiterEnv) -> None:
    await arbiter.launch(request("a1"), ALICE)
    await act(arbiter, "kill", scope("a1"))


SETUPS = {"active": _active, "paused": _paused, "idle": _idle, "killed": _killed}
ILLEGAL = [
    ("active", "resume"), ("active", "reactivate"),
    ("paused", "pause"), ("paused", "reactivate"),
    ("idle", "pause"), ("idle", "resume"), ("idle", "stop"), ("idle", "reactivate"),
    ("killed", "kill"), ("killed", "pause"), ("killed", "resume"), ("killed", "stop"),
]


@pytest.mark.parametrize(("state", "verb"), ILLEGAL)
def test_illegal_single_transition(env: ArbiterEnv, state: str, verb: str) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        await SETUPS[state](arbiter, env)
        before = env.store.agents()
        rows = env.audit.count()
        handles = {rid: (h.processes, h.frozen, h.network, list(h.signals))
                   for rid, h in env.runtime.handles.items()}
        with pytest.raises(IllegalTransition) as info:
            await act(arbiter, verb, scope("a1"), "try")
        assert info.value.detail["state"] == state
        assert info.value.http_status == 409
        assert arbiter.agents["a1"].state == state
        assert env.store.agents() == before
        assert {rid: (h.processes, h.frozen, h.network, list(h.signals))
                for rid, h in env.runtime.handles.items()} == handles
        assert env.audit.count() == rows + 1
        entry = last(env)
        assert (entry.verb, entry.target, entry.outcome, entry.reason) == (
            verb, "a1", "refused:illegal_transition", "try")
        assert entry.actor == ALICE.label()

    asyncio.run(body())


def test_unknown_agent(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        with pytest.raises(AgentNotFound):
            await act(arbiter, "kill", scope("ghost"))
        with pytest.raises(AgentNotFound):
            arbiter.agent_view("ghost")
        assert env.audit.count() == 0 and env.store.agents() == []

    asyncio.run(body())


# ----------------------------------------------------------------------------- scopes


def test_class_scope_touches_exactly_that_class(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        views = {name: await arbiter.launch(request(name, cls), ALICE)
                 for name, cls in [("a1", "red"), ("a2", "red"), ("b1", "blue")]}
        await launch_idle(arbiter, env, "c1")  # class "default"
        rows = env.audit.count()
        result = await act(arbiter, "kill", scope(agent_class="red"), "red alert")
        assert result.scope == "class:red"
        assert [(r.agent, r.new_state) for r in result.results] == [
            ("a1", "killed"), ("a2", "killed")]
        assert result.time_to_halt_ms == max(r.time_to_halt_ms or 0 for r in result.results)
        for name in ("a1", "a2"):
            assert arbiter.agents[name].state == "killed"
            assert handle_of(env, views[name]).network is False
        blue = handle_of(env, views["b1"])
        assert arbiter.agents["b1"].state == "active"
        assert (blue.processes, blue.network, blue.cleaned, blue.signals) == (1, True, False, [])
        assert arbiter.agents["c1"].state == "idle"
        new_rows = env.audit.list(after_seq=rows)
        assert sorted((e.target, e.scope) for e in new_rows) == [
            ("a1", "class:red"), ("a2", "class:red")]

    asyncio.run(body())


def test_class_scope_skips_agents_the_verb_does_not_apply_to(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        await arbiter.launch(request("a1", "red"), ALICE)
        await arbiter.launch(request("a2", "red"), ALICE)
        await act(arbiter, "pause", scope("a2"))
        rows = env.audit.count()
        result = await act(arbiter, "pause", scope(agent_class="red"))
        assert [(r.agent, r.new_state, r.skipped) for r in result.results] == [
            ("a1", "paused", None), ("a2", "paused", "paused")]
        assert env.audit.count() == rows + 1  # only a1 changed

    asyncio.run(body())


def test_global_kill_halts_and_reactivate_all_lifts_it(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        a1 = await arbiter.launch(request("a1", "red"), ALICE)
        b1 = await arbiter.launch(request("b1", "blue"), ALICE)
        result = await act(arbiter, "kill", scope(everything=True), "stop the world")
        assert result.global_halt and arbiter.global_halt
        assert result.scope == "global"
        assert {r.agent: r.new_state for r in result.results} == {"a1": "killed",
                                                                  "b1": "killed"}
        assert handle_of(env, a1).network is False and handle_of(env, b1).network is False
        assert env.store.get_meta(GLOBAL_HALT_KEY) is not None

        rows = env.audit.count()
        with pytest.raises(GlobalHalt) as refused:
            await arbiter.launch(request("newcomer"), ALICE)
        # The command it names is one the CLI takes: `reactivate --all` needs a reason.
        assert "'agentctl reactivate --all --reason ...'" in refused.value.message
        assert "newcomer" not in arbiter.agents
        assert env.audit.count() == rows + 1
        assert (last(env).verb, last(env).outcome) == ("launch", "refused:global_halt")

        # The halt is durable: a restarted daemon still refuses launches.
        restarted = env.arbiter()
        assert restarted.global_halt
        with pytest.raises(GlobalHalt):
            await restarted.launch(request("newcomer"), ALICE)

        result = await act(restarted, "reactivate", scope(everything=True), "all clear")
        assert (result.global_halt, restarted.global_halt) == (False, False)
        assert env.store.get_meta(GLOBAL_HALT_KEY) is None
        assert {r.agent: r.new_state for r in result.results} == {"a1": "idle", "b1": "idle"}
        assert any(e.verb == "lift_global_halt" for e in env.audit.list())
        view = await restarted.launch(request("newcomer"), ALICE)
        assert view.state == "running"

    asyncio.run(body())


def test_global_kill_is_audited_even_with_no_agent_in_scope(env: ArbiterEnv) -> None:
    """Setting the global halt is itself an action: it must be in the audit log, as lifting
    it is, even when no agent exists to carry a per-agent kill row."""

    async def body() -> None:
        arbiter = env.arbiter()
        result = await act(arbiter, "kill", scope(everything=True), "stop the world")
        assert result.global_halt and result.results == []
        rows = [e for e in env.audit.list() if e.scope == "global"]
        assert rows, "the global halt left no audit row"
        assert rows[0].actor == ALICE.label() and rows[0].reason == "stop the world"

    asyncio.run(body())


# ----------------------------------------------------------------------------- run ends


def test_command_exiting_by_itself(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(request("a1"), ALICE)
        handle = handle_of(env, view)
        handle.finish(3)
        await wait_done(arbiter, view.id)
        record = env.store.run(view.id)
        assert record is not None
        assert (record.state, record.exit_code, record.end_reason) == ("exited", 3, "exited")
        assert record.ended_at is not None and record.time_to_halt_ms is None
        agent = arbiter.agents["a1"]
        assert (agent.state, agent.current_run, agent.last_run) == ("idle", None, view.id)
        await asyncio.wait_for(arbiter.settled(view.id), WAIT)  # step 6 follows the answer
        assert handle.network is False and handle.cleaned
        entry = last(env)
        assert (entry.verb, entry.actor, entry.new_state) == ("exit", SYSTEM_LABEL, "idle")
        assert entry.detail["exit_code"] == 3
        assert arbiter.agent_view("a1").run.exit_code == 3  # type: ignore[union-attr]

    asyncio.run(body())


def test_execution_window_expiry_kills(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(request("a1", timeout=0.05), ALICE)
        assert view.timeout == pytest.approx(0.05)
        await wait_done(arbiter, view.id)
        agent = arbiter.agents["a1"]
        assert agent.state == "killed"
        assert agent.last_actor == SYSTEM_LABEL
        assert agent.last_reason is not None and "execution window" in agent.last_reason
        record = env.store.run(view.id)
        assert record is not None and record.state == "killed"
        assert record.time_to_halt_ms is not None
        assert "execution window" in (record.end_reason or "")
        entry = last(env, "kill")
        assert (entry.verb, entry.actor, entry.target) == ("kill", SYSTEM_LABEL, "a1")
        assert "execution window" in entry.reason and "0.05s" in entry.reason
        assert handle_of(env, view).network is False

    asyncio.run(body())


def test_exit_before_the_window_cancels_the_timeout(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(request("a1", timeout=60), ALICE)
        timer = arbiter.live[view.id].timeout_handle
        assert timer is not None and not timer.cancelled()
        handle_of(env, view).finish(0)
        await wait_done(arbiter, view.id)
        assert timer.cancelled()
        assert arbiter.agents["a1"].state == "idle"

    asyncio.run(body())


# ----------------------------------------------------------------------------- reconcile


def test_reconcile_reaps_leftovers_and_audits(env: ArbiterEnv) -> None:
    leftover = Leftover(container_id="as-deadbeef0000", netns="as-deadbeef0000",
                        cgroup="agent-supervisor/as-deadbeef0000", pids=[4242, 4243])
    env.runtime.leftover_list.append(leftover)

    async def body() -> None:
        reports = await env.arbiter().reconcile()
        assert len(reports) == 1
        assert reports[0]["container"] == "as-deadbeef0000"
        assert reports[0]["killed_pids"] == [4242, 4243]

    asyncio.run(body())
    assert env.runtime.reaped == [leftover]
    assert env.runtime.leftover_list == []
    entry = last(env)
    assert (entry.verb, entry.actor, entry.target) == ("reap", SYSTEM_LABEL, "as-deadbeef0000")
    assert entry.detail["killed_pids"] == [4242, 4243]


def test_reconcile_ends_runs_of_a_previous_instance(env: ArbiterEnv) -> None:
    async def before_crash() -> str:
        view = await env.arbiter().launch(request("a1"), ALICE)
        return view.id

    run_id = asyncio.run(before_crash())

    async def after_restart() -> None:
        arbiter = env.arbiter(runtime=FakeRuntime())
        assert arbiter.agents["a1"].state == "active"
        await arbiter.reconcile()
        agent = arbiter.agents["a1"]
        assert (agent.state, agent.current_run, agent.last_run) == ("idle", None, run_id)
        record = env.store.run(run_id)
        assert record is not None and record.state == "killed" and record.ended_at
        entry = last(env)
        assert (entry.verb, entry.target, entry.previous_state, entry.new_state) == (
            "reap", "a1", "active", "idle")
        assert env.store.unfinished_runs() == []

    asyncio.run(after_restart())


@pytest.mark.parametrize("left_in", ["starting", "running", "paused", "killing", "exited"])
def test_reconcile_ends_a_run_left_in_any_state_through_the_state_table(
        env: ArbiterEnv, left_in: str, caplog: pytest.LogCaptureFixture) -> None:
    # An unconfirmed kill ("killing") or a pause outlived their daemon; an ended state with no
    # end time is no state the table can end a run from, and is recorded killed all the same.
    async def before_crash() -> str:
        view = await env.arbiter().launch(request("a1"), ALICE)
        record = env.store.run(view.id)
        assert record is not None
        record.state = left_in
        env.store.put_run(record)
        return view.id

    run_id = asyncio.run(before_crash())

    async def after_restart() -> None:
        await env.arbiter(runtime=FakeRuntime()).reconcile()
        record = env.store.run(run_id)
        assert record is not None
        assert (record.state, record.end_cause) == ("killed", "reaped")
        assert env.store.unfinished_runs() == []

    asyncio.run(after_restart())
    assert any("was left in state" in r.getMessage() for r in caplog.records) is (
        left_in == "exited")


# ----------------------------------------------------------------------------- races


class SlowRuntime(FakeRuntime):
    """launch blocks until the test opens the gate, so a kill can arrive mid-launch."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def launch(self, params: RunParams) -> FakeRunHandle:
        self.entered.set()
        await self.gate.wait()
        return await super().launch(params)


def test_kill_racing_a_launch_wins_and_the_command_never_starts(make_env: MakeEnv) -> None:
    async def body() -> None:
        runtime = SlowRuntime()
        env = make_env(runtime=runtime)
        arbiter = env.arbiter()
        launching = asyncio.create_task(arbiter.launch(request("a1"), ALICE))
        await asyncio.wait_for(runtime.entered.wait(), WAIT)
        assert arbiter.agents["a1"].state == "active"
        killing = asyncio.create_task(act(arbiter, "kill", scope("a1"), "abort"))
        for _ in range(100):  # step 1 of the kill path marks the agent before any await
            if arbiter.agents["a1"].state == "killed":
                break
            await asyncio.sleep(0)
        assert arbiter.agents["a1"].state == "killed"
        runtime.gate.set()
        view, result = await asyncio.wait_for(asyncio.gather(launching, killing), WAIT)
        handle = runtime.handles[view.id]
        assert handle.started is False, "the agent's command was started after its kill"
        await asyncio.wait_for(arbiter.settled(view.id), WAIT)  # step 6 follows the answer
        assert handle.network is False and handle.cleaned and handle.processes == 0
        assert result.results[0].new_state == "killed"
        assert arbiter.agents["a1"].state == "killed"
        record = env.store.run(view.id)
        assert record is not None and record.state == "killed" and record.ended_at
        [kill_row] = [e for e in env.audit.list() if e.verb == "kill"]
        assert (kill_row.outcome, kill_row.detail["run"]) == ("ok", view.id)

    asyncio.run(body())


class BrokenObserver:
    """A sampler and tripwires whose every call fails."""

    def run_started(self, *_args: object) -> None:
        raise RuntimeError("observer bug")

    def run_ended(self, _run_id: str) -> None:
        raise RuntimeError("observer bug")


def test_a_failing_run_observer_never_breaks_a_launch_a_kill_or_the_others(
        env: ArbiterEnv, caplog: pytest.LogCaptureFixture) -> None:
    forgotten: list[str] = []

    class Listener:
        def forget(self, container_id: str) -> None:
            forgotten.append(container_id)

    async def body() -> None:
        arbiter = env.arbiter()
        arbiter.observers = RunObservers(sampler=BrokenObserver(), tripwires=BrokenObserver(),
                                         seccomp=Listener())
        view = await arbiter.launch(request("a1"), ALICE)
        assert arbiter.agents["a1"].state == "active"
        container_id = arbiter.live[view.id].record.container_id
        result = await act(arbiter, "kill", scope("a1"), "still works")
        assert result.results[0].new_state == "killed"
        assert view.id not in arbiter.live
        # A kill's runs are told after its answer (test_killpath.py holds that order).
        await asyncio.wait_for(arbiter.settled(view.id), WAIT)
        assert forgotten == [container_id]  # told after both failed

    asyncio.run(body())
    failures = [r for r in caplog.records if r.getMessage().startswith("run observer")]
    assert len(failures) == 4 and all(r.exc_info for r in failures)


def test_run_output_past_its_retention_is_deleted_and_audited(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        old = await arbiter.launch(request("old"), ALICE)
        new = await arbiter.launch(request("new"), ALICE)
        for view in (old, new):
            Path(arbiter.live[view.id].record.log_path).parent.mkdir(parents=True,
                                                                     exist_ok=True)
            Path(arbiter.live[view.id].record.log_path).write_text("output\n")
        await act(arbiter, "kill", scope("old"), "done")
        await act(arbiter, "kill", scope("new"), "done")
        old_record = env.store.run(old.id)
        assert old_record is not None
        old_record.ended_at = time.time() - 3600
        env.store.put_run(old_record)

        assert arbiter.prune_logs(retention=600) == 1
        assert not Path(old_record.log_path).exists()
        new_record = env.store.run(new.id)
        assert new_record is not None and Path(new_record.log_path).exists()
        assert last(env).verb == "logs_pruned" and last(env).detail == {"files": 1}
        assert arbiter.prune_logs(retention=600) == 0  # nothing left to do, nothing audited
        assert last(env).verb == "logs_pruned"

    asyncio.run(body())


def test_launch_under_the_free_space_watermark_is_refused_and_changes_nothing(
        env: ArbiterEnv) -> None:
    async def body() -> None:
        full = env.config.model_copy(update={"disk": DiskSection(min_free_percent=100)})
        env.config = full  # no filesystem is ever 100% free
        arbiter = env.arbiter()
        rows = env.audit.count()
        with pytest.raises(DiskSpaceLow) as refused:
            await arbiter.launch(request("cramped"), ALICE)
        assert refused.value.detail["min_free_percent"] == 100
        assert refused.value.detail["hint"]
        assert "cramped" not in arbiter.agents and env.store.agents() == []
        assert env.runtime.handles == {}
        assert env.audit.count() == rows + 1
        assert (last(env).verb, last(env).target, last(env).outcome) == (
            "launch", "cramped", "refused:disk_space_low")

    asyncio.run(body())
