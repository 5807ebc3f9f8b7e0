"""What a host holds back while a fleet action is applied and its ack is on its way: the
runtime cleanup of the runs it ended (Arbiter.answers_pending), the registration and the audit
anchor go only `settle_delay` after the store has the ack, not at once (the first hosts to
confirm a fleet halt took the CPU of the last ones with their runc deletes and puts). The
daemon's FleetMember with its collaborators replaced at the seams; a real event loop."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from supervisor.daemon.fleet import FleetMember, _Answer


class _Link:
    def __init__(self) -> None:
        self.registrations: list[str] = []

    def publish_registration(self, value: str) -> None:
        self.registrations.append(value)


def _member(loop: asyncio.AbstractEventLoop, settle_delay: float) -> Any:
    member: Any = object.__new__(FleetMember)
    member.config = SimpleNamespace(settle_delay=settle_delay, host_id="h1", labels={})
    member.arbiter = SimpleNamespace(answers_pending=set(), agents={}, global_halt=False)
    member.loop = loop
    member.link = _Link()
    member.holds = {}
    member.started_at = 0.0
    member._quiet = 0
    member._deferred = set()
    member._answers = set()
    member._registration_due = None
    member._began = 0.0
    return member


@pytest.mark.parametrize("settle_delay", [0.05, 0.0])
def test_what_waits_for_an_ack_goes_settle_delay_after_the_store_has_it(
        settle_delay: float) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        member = _member(loop, settle_delay)
        member._quiet += 1  # FleetMember._apply: an action begins
        stored = _Answer(loop.create_future(), loop.create_future())
        member.arbiter.answers_pending.add(stored.runtime)
        member._answers.add(stored)
        member.agents_changed()  # a run ended meanwhile: deferred, not published
        assert member._deferred == {"registration"}

        member._quiet_ends(stored, "a1")  # the writer thread: the store has the ack
        assert stored.acked.done()
        if settle_delay:
            assert not stored.runtime.done() and member._quiet == 1
            assert stored.runtime in member.arbiter.answers_pending
        await asyncio.wait_for(stored.runtime, 5)
        assert member._quiet == 0 and not member.arbiter.answers_pending
        await asyncio.sleep(0.1)  # agents_changed's own coalescing (50 ms)
        assert len(member.link.registrations) == 1
        member._quiet_ends(stored, "a1")  # QUIET_MAX's call after the store's: no effect
        assert member._quiet == 0

    asyncio.run(scenario())


def test_a_stopping_daemon_waits_for_no_settle_delay() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        member = _member(loop, 30.0)
        member._quiet += 1
        stored = _Answer(loop.create_future(), loop.create_future())
        member.arbiter.answers_pending.add(stored.runtime)
        member._answers.add(stored)
        member._quiet_ends(stored, "a1")
        assert not stored.runtime.done()
        member.settle_now()  # main.py, before Arbiter.shutdown kills and cleans up
        assert stored.runtime.done() and not member.arbiter.answers_pending
        assert member._quiet == 0
        member._settled(stored)  # the settle_delay timer, later: nothing more
        assert member._quiet == 0

    asyncio.run(scenario())


def test_back_to_back_actions_hold_the_registration_back_at_most_defer_max(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Actions a second apart overlap their settle_delays, so one is always being settled:
    the registration goes DEFER_MAX after it was first held back, not only once they stop
    (a host's new agent stayed out of its registration through five fleet commands, and the
    sixth was refused as scope_empty)."""
    import supervisor.daemon.fleet as fleet_module
    monkeypatch.setattr(fleet_module, "DEFER_MAX", 0.1)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        member = _member(loop, 30.0)
        member._quiet += 1  # an action being settled, and the next ones after it
        member.agents_changed()
        member.agents_changed()
        assert member._deferred == {"registration"} and not member.link.registrations
        await asyncio.sleep(0.3)
        assert len(member.link.registrations) == 1 and not member._deferred
        assert member._quiet == 1  # the actions are still settling: nothing else changed

    asyncio.run(scenario())
