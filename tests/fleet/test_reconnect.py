"""A host cut off from the store (its link taken down for longer than its lease) while a fleet
kill of its agents' class is issued applies the kill once it is back, acknowledges it, and
accepts no launch of the class meanwhile or after (the hold stays in force until lifted)."""

from __future__ import annotations

import secrets
import threading

import pytest

from supervisor.fleet.model import Ack
from tests.fleet.support import Fleet
from tests.fleet.test_halt import _audit_rows, _launch, _lift_all, _refusal, _state
from tests.fleet.test_partition import _head, _rows_after
from tests.support.daemon import wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.e2e]


def test_a_host_cut_off_during_a_fleet_kill_applies_it_once_back_before_any_launch(
        fleet: Fleet, request: pytest.FixtureRequest) -> None:
    tag = secrets.token_hex(2)
    h1, h2 = fleet.hosts[0], fleet.hosts[1]  # h2: the default policy (hold-launches)
    cls = f"cut{tag}"
    _launch(h2, f"a-{tag}", cls)
    _launch(h1, f"b-{tag}", cls)
    before = _head(h2)
    fleet.link(h2.member, up=False)
    request.addfinalizer(lambda: (fleet.link(h2.member, up=True), _lift_all(fleet)))
    wait_for(lambda: _rows_after(h2, "fleet_partition", before), timeout=40, interval=0.2,
             what="h2's partition policy")
    # hold-launches: the agent runs on while the host cannot know the holds.
    assert _state(h2, f"a-{tag}") == "active"
    code, result = fleet.agentctl_json("kill", "--class", cls, "--reason", "while h2 is cut",
                                       "--allow-empty", "--deadline", "60", timeout=120)
    assert code == 0, result
    hold_id = result["actions"][0]
    assert "h2" not in [r["host"] for r in result["hosts"]]  # its lease expired: not a member
    assert _state(h1, f"b-{tag}") == "killed"
    assert _state(h2, f"a-{tag}") == "active"  # it cannot know yet
    assert _refusal(h2, f"c-{tag}", cls) == "fleet_hold"

    # From the moment the cable is back until the ack is in the store, launches of the class
    # keep being tried on h2: every one is refused (first as cut off, then by the hold).
    stop = threading.Event()
    refusals: list[str | None] = []

    def hammer() -> None:
        n = 0
        while not stop.is_set():
            refusals.append(_refusal(h2, f"r{n}-{tag}", cls))
            n += 1
            stop.wait(0.002)  # each try is an audit row: thousands in a slow reconnect

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        fleet.link(h2.member, up=True)
        with fleet.operator_client() as operator:
            ack = wait_for(lambda: operator.get(fleet.keys.ack("h2", hold_id)), timeout=40,
                           interval=0.2, what="h2's ack once back")
    finally:
        stop.set()
        thread.join(30)
    assert refusals and set(refusals) == {"fleet_hold"}, refusals
    body = Ack.model_validate(ack.json())
    assert body.outcome == "ok", body
    assert [a.agent for a in body.agents] == [f"a-{tag}"] and not body.survivors
    assert _state(h2, f"a-{tag}") == "killed"
    applied = [r for r in _rows_after(h2, "fleet_action", before)
               if r["detail"]["action"] == hold_id]
    assert len(applied) == 1 and applied[0]["actor"].endswith(f":{hold_id}")
    assert _rows_after(h2, "fleet_reconnect", before)
    # Not a launch of the class slipped in between the cut and the ack.
    launched = [r["target"] for r in _audit_rows(h2, "launch")
                if r["outcome"] == "ok" and str(r["target"]).endswith(f"-{tag}")]
    assert launched == [f"a-{tag}"], launched
    # After it: the hold stays in force for the class, and only for it.
    assert _refusal(h2, f"d-{tag}", cls) == "fleet_hold"
    wait_for(lambda: _refusal(h2, f"web-{tag}", "web") is None, timeout=20,
             what="a launch of another class on h2 once back")
    _lift_all(fleet)
    wait_for(lambda: _refusal(h2, f"e-{tag}", cls) is None, timeout=20,
             what="launches of the class on h2 after the lift")
