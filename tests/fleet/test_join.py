"""A host that joins the fleet after a hold was issued (it never saw the action: it did not
exist) applies the hold before it accepts any launch, and acknowledges it; history that is no
longer in force (a lifted hold, a plain action) is not replayed on it."""

from __future__ import annotations

import secrets

import pytest

from supervisor.fleet.model import Ack
from tests.fleet.support import Fleet
from tests.fleet.test_halt import _audit_rows, _lift_all, _refusal
from tests.support.daemon import wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.e2e]


def test_a_host_joining_later_applies_the_holds_in_force_before_any_launch(
        fleet: Fleet, request: pytest.FixtureRequest) -> None:
    tag = secrets.token_hex(2)
    # Classes no live host runs: holds for later (--allow-empty), not a typo.
    code, lifted = fleet.agentctl_json("kill", "--class", f"gone{tag}", "--reason", "lifted",
                                       "--allow-empty", "--deadline", "60", timeout=120)
    assert code == 0, lifted
    _lift_all(fleet)
    code, held = fleet.agentctl_json("kill", "--class", f"late{tag}", "--reason",
                                     "before h6 existed", "--allow-empty", "--deadline", "60",
                                     timeout=120)
    assert code == 0, held
    assert "h6" not in [r["host"] for r in held["hosts"]]
    hold_id = held["actions"][0]

    newcomer = fleet.add_host(6, {"zone": "c"})
    # Whatever happens here, h6 is not among the hosts of the tests after this one.
    request.addfinalizer(lambda: fleet.remove_host(newcomer))
    fleet.enrol(newcomer)
    newcomer.start()
    # The socket answers only once the holds were read and applied: the first launch of the
    # held class is refused, and one of another class (and of the lifted one) is not.
    assert _refusal(newcomer, f"first-{tag}", f"late{tag}") == "fleet_hold"
    assert _refusal(newcomer, f"other-{tag}", "web") is None
    assert _refusal(newcomer, f"again-{tag}", f"gone{tag}") is None
    joins = _audit_rows(newcomer, "fleet_join")
    assert joins and joins[-1]["detail"]["synced"] and hold_id in joins[-1]["detail"]["holds"]
    applied = [r["detail"]["action"] for r in _audit_rows(newcomer, "fleet_action")]
    assert applied == [hold_id], applied  # the hold only: neither the lifted kill nor its lift
    with fleet.operator_client() as operator:
        ack = wait_for(lambda: operator.get(fleet.keys.ack("h6", hold_id)), timeout=20,
                       what="h6's ack of the hold")
    assert Ack.model_validate(ack.json()).outcome == "ok"
    _lift_all(fleet)
    wait_for(lambda: _refusal(newcomer, f"after-{tag}", f"late{tag}") is None, timeout=20,
             what="launches of the class on h6 after the lift")
    # A daemon that stops revokes its lease: it leaves the live members at once, not a
    # lease_ttl later (a fleet kill issued meanwhile would wait for its ack in vain).
    newcomer.daemon.stop()
    with fleet.operator_client() as operator:
        assert operator.get(fleet.keys.registration("h6")) is None
    code, listed = fleet.agentctl_json("ls")
    assert code == 0 and [r["alive"] for r in listed["hosts"] if r["host"] == "h6"] == [False]
