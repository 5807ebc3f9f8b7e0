"""A host anchors its audit head in the fleet store after every state change (launch, pause,
resume, kill, reactivate: a row whose new state differs from the previous one), not only at
the audit writer's next checkpoint; the rows of one commit make one anchor, a burst while a put
is in flight makes two puts in all, and nothing goes while a fleet action's ack is on its way.
FleetMember and FleetLink with the store replaced at their seams; a real event loop, a real
audit key."""

from __future__ import annotations

import asyncio
import collections
import json
import threading
from types import SimpleNamespace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from supervisor.audit.anchor import Signer
from supervisor.audit.chain import CHECKPOINT_VERB
from supervisor.daemon.fleet import FleetMember
from supervisor.fleet.anchors import check_anchors
from supervisor.fleet.etcd import KeyValue
from supervisor.fleet.link import FleetLink
from supervisor.fleet.model import Keys
from supervisor.models import AuditEntry


class _Link:
    def __init__(self) -> None:
        self.anchors: list[tuple[str, str, str]] = []

    def write_latest(self, slot: str, key: str, value: str) -> None:
        self.anchors.append((slot, key, value))


def _member(loop: asyncio.AbstractEventLoop, signer: Signer) -> Any:
    member: Any = object.__new__(FleetMember)
    member.config = SimpleNamespace(host_id="h1", labels={})
    member.keys = Keys("/fleet/")
    member.audit = SimpleNamespace(anchoring=SimpleNamespace(signer=signer),
                                   last_checkpoint=None)
    member.loop = loop
    member.link = _Link()
    member._quiet = 0
    member._deferred = set()
    member._anchored_seq = -1
    member._head = None
    member._head_due = None
    return member


def _row(seq: int, verb: str, previous: str | None, new: str | None) -> AuditEntry:
    return AuditEntry(seq=seq, ts=0.0, actor="operator", verb=verb, scope="agent:a",
                      target="a", reason="", previous_state=previous, new_state=new,
                      time_to_halt_ms=None, outcome="ok", detail={}, prev_hash="p",
                      hash=f"hash{seq}")


def _anchored(member: Any) -> list[dict[str, Any]]:
    return [json.loads(value) for _slot, _key, value in member.link.anchors]


def test_a_state_change_is_anchored_at_once_and_a_commit_of_many_makes_one_anchor() -> None:
    signer = Signer(Ed25519PrivateKey.generate(), path=None)  # type: ignore[arg-type]

    async def scenario() -> None:
        member = _member(asyncio.get_running_loop(), signer)
        member._on_audit(None, _row(7, "launch", "idle", "active"))
        await asyncio.sleep(0)
        [anchor] = _anchored(member)
        assert (anchor["seq"], anchor["hash"], anchor["host"]) == (7, "hash7", "h1")
        slot, key, value = member.link.anchors[0]
        assert slot == "anchor" and key == member.keys.anchor("h1", 7)
        # What `agentctl fleet audit verify` checks: signed by the host's audit key.
        check = check_anchors("h1", [KeyValue(key=key, value=value, mod_revision=1,
                                              create_revision=1, lease=0)])
        assert not check.problems and [a.seq for a in check.anchors] == [7]

        # Rows that change no agent's state are left to the checkpoints.
        member._on_audit(None, _row(8, "audit_verify", None, None))
        member._on_audit(None, _row(9, "launch", "active", "active"))  # refused: no change
        await asyncio.sleep(0)
        assert len(member.link.anchors) == 1

        # One commit's rows (a global pause: one row per agent) reach the loop together.
        for seq, verb in ((10, "pause"), (11, "pause"), (12, "kill")):
            member._on_audit(None, _row(seq, verb, "active", "paused"))
        await asyncio.sleep(0)
        assert [a["seq"] for a in _anchored(member)] == [7, 12]

        # A checkpoint behind what is anchored already is not published again ...
        member.audit.last_checkpoint = signer.sign(11, "hash11", 1.0)
        member._on_audit(None, _row(13, CHECKPOINT_VERB, None, None))
        assert [a["seq"] for a in _anchored(member)] == [7, 12]
        # ... one past it is, and a state change behind that checkpoint is not.
        member.audit.last_checkpoint = signer.sign(14, "hash14", 2.0)
        member._on_audit(None, _row(15, CHECKPOINT_VERB, None, None))
        member._on_audit(None, _row(13, "resume", "paused", "active"))
        await asyncio.sleep(0)
        assert [a["seq"] for a in _anchored(member)] == [7, 12, 14]

    asyncio.run(scenario())


def test_no_anchor_goes_while_a_fleet_actions_ack_is_on_its_way() -> None:
    signer = Signer(Ed25519PrivateKey.generate(), path=None)  # type: ignore[arg-type]

    async def scenario() -> None:
        member = _member(asyncio.get_running_loop(), signer)
        overdue: list[str] = []
        member._defer = lambda what: (member._deferred.add(what), overdue.append(what))
        member._quiet = 1  # FleetMember._apply: a fleet kill is applied, its ack not stored
        member._on_audit(None, _row(20, "kill", "active", "killed"))
        member._on_audit(None, _row(21, "kill", "active", "killed"))
        await asyncio.sleep(0)
        assert member.link.anchors == [] and member._deferred == {"anchor"}
        member._quiet = 0  # what _settled does once the ack is in the store ...
        member._deferred.clear()
        member._publish_anchor()  # ... and then it publishes what waited
        assert [a["seq"] for a in _anchored(member)] == [21]

    asyncio.run(scenario())


class _Store:
    """The writer's etcd client: the first create blocks until released."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self.first = threading.Event()
        self.release = threading.Event()

    def create(self, key: str, value: str) -> None:
        self.created.append(key)
        if len(self.created) == 1:
            self.first.set()
            assert self.release.wait(10)


def test_a_burst_of_anchors_makes_two_puts_one_in_flight_and_the_newest() -> None:
    link: Any = object.__new__(FleetLink)
    link._stop = threading.Event()
    link._cond = threading.Condition()
    link._writes = collections.deque()
    link._latest = {}
    link.writer_client = store = _Store()
    link.loop = None
    thread = threading.Thread(target=link._writer, daemon=True)
    thread.start()
    try:
        link.write_latest("anchor", "/a/1", "1")
        assert store.first.wait(10)
        for seq in range(2, 50):  # while the first is in flight
            link.write_latest("anchor", f"/a/{seq}", str(seq))
        store.release.set()
        with link._cond:
            assert link._cond.wait_for(lambda: not link._latest, 10)
    finally:
        link._stop.set()
        with link._cond:
            link._cond.notify_all()
        thread.join(10)
    assert store.created == ["/a/1", "/a/49"]
