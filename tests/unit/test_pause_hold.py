"""A pause is a hold that outlives its run (issue 11, item 11): across an orderly shutdown and
a crash, a paused agent comes back paused, cannot be launched by anyone, and only resume or
reactivate lifts the hold. The arbiter over the FakeRuntime and a real SQLite file; no root."""

from __future__ import annotations

import asyncio

import pytest

from supervisor.errors import IllegalTransition
from supervisor.runtime.fake import FakeRuntime
from tests.unit.conftest import ALICE, ArbiterEnv
from tests.unit.test_arbiter import act, last, request, scope


async def _paused_then(env: ArbiterEnv, how: str) -> None:
    arbiter = env.arbiter()
    await arbiter.launch(request("a1"), ALICE)
    await act(arbiter, "pause", scope("a1"), "suspicious")
    if how == "shutdown":
        await arbiter.shutdown("supervisor shutdown")
        assert arbiter.agents["a1"].state == "paused"
        assert arbiter.agents["a1"].current_run is None
    # "crash": the arbiter is dropped with the run recorded as live, as after a SIGKILL.


@pytest.mark.parametrize("how", ["shutdown", "crash"])
def test_a_paused_agent_comes_back_paused(env: ArbiterEnv, how: str) -> None:
    asyncio.run(_paused_then(env, how))

    async def after_restart() -> None:
        arbiter = env.arbiter(runtime=FakeRuntime())
        await arbiter.reconcile()
        agent = arbiter.agents["a1"]
        assert (agent.state, agent.current_run) == ("paused", None)
        assert env.store.agents()[0].state == "paused"
        rows = env.audit.count()
        with pytest.raises(IllegalTransition) as info:
            await arbiter.launch(request("a1"), ALICE)
        assert info.value.detail["state"] == "paused"
        refusal = last(env)
        assert env.audit.count() == rows + 1
        assert (refusal.verb, refusal.outcome) == ("launch", "refused:illegal_transition")
        assert env.runtime.handles == {}  # nothing was started
        assert arbiter.agents["a1"].state == "paused"

    asyncio.run(after_restart())


@pytest.mark.parametrize("verb", ["resume", "reactivate"])
def test_resume_or_reactivate_lifts_the_held_pause(env: ArbiterEnv, verb: str) -> None:
    asyncio.run(_paused_then(env, "shutdown"))

    async def after_restart() -> None:
        arbiter = env.arbiter(runtime=FakeRuntime())
        await arbiter.reconcile()
        result = await act(arbiter, verb, scope("a1"), "checked")
        assert (result.results[0].previous_state, result.results[0].new_state) == (
            "paused", "idle")
        entry = last(env)
        assert (entry.verb, entry.previous_state, entry.new_state) == (verb, "paused", "idle")
        assert env.store.agents()[0].state == "idle"
        view = await arbiter.launch(request("a1"), ALICE)
        assert view.state == "running"
        await act(arbiter, "kill", scope("a1"))

    asyncio.run(after_restart())


def test_a_class_resume_lifts_held_pauses_and_skips_the_rest(env: ArbiterEnv) -> None:
    asyncio.run(_paused_then(env, "shutdown"))

    async def after_restart() -> None:
        arbiter = env.arbiter(runtime=FakeRuntime())
        await arbiter.reconcile()
        await arbiter.launch(request("a2"), ALICE)
        result = await act(arbiter, "resume", scope(everything=True), "all clear")
        by_agent = {r.agent: r for r in result.results}
        assert by_agent["a1"].new_state == "idle"
        assert by_agent["a2"].skipped == "active"
        await act(arbiter, "kill", scope("a2"))

    asyncio.run(after_restart())


def test_a_live_pause_still_cannot_be_reactivated(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        await arbiter.launch(request("a1"), ALICE)
        await act(arbiter, "pause", scope("a1"))
        with pytest.raises(IllegalTransition):
            await act(arbiter, "reactivate", scope("a1"))
        assert arbiter.agents["a1"].state == "paused"
        await act(arbiter, "kill", scope("a1"))

    asyncio.run(body())
