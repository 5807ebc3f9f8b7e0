"""The holds a host enforces are the newest it has learnt of: a read of control/ that reaches
the control loop after a watch event newer than it (the keeper's re-read once the store is
back, racing the watcher) does not put back a lifted hold nor drop one added since, and a
read newer than the events replaces them. FleetMember with the link at its seam."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from supervisor.daemon.fleet import FleetMember
from supervisor.fleet.link import Snapshot
from supervisor.fleet.model import FleetAction, Selector, new_action_id
from supervisor.fleet.progress import Progress


def _member() -> Any:
    member: Any = object.__new__(FleetMember)
    member.config = SimpleNamespace(host_id="h1", labels={})
    member.progress = Progress()
    member.holds = {}
    member._holds_revision = 0
    member.synced = True
    member.partitioned = None
    member._queue = asyncio.Queue(16)
    member.store = SimpleNamespace(set_meta=lambda *_a: None)
    return member


def _hold(agent_class: str) -> FleetAction:
    return FleetAction(id=new_action_id(), verb="kill", operator="ops", reason="incident",
                       issued_at=1.0, selector=Selector(agent_class=agent_class))


def _refused(member: Any, agent_class: str) -> bool:
    return member.gate("a", agent_class) is not None


def test_a_read_older_than_a_hold_event_does_not_undo_it() -> None:
    member = _member()
    old, new = _hold("batch"), _hold("web")
    member._on_snapshot(Snapshot(revision=10, holds={old.id: old}))
    assert _refused(member, "batch") and not _refused(member, "web")

    # The watcher: `new` written at 12, `old` lifted at 13. Then the keeper's read from
    # revision 11 (before both) reaches the loop.
    member._on_hold_added(new, 12)
    member._on_hold_lifted(old.id, 13)
    member._on_snapshot(Snapshot(revision=11, holds={old.id: old}))
    assert _refused(member, "web"), "a hold added after the read was dropped"
    assert not _refused(member, "batch"), "a hold lifted after the read was put back"

    # A read as of 14 or later is the truth: it replaces what the events said.
    member._on_snapshot(Snapshot(revision=14, holds={}))
    assert not member.holds and not _refused(member, "web")
