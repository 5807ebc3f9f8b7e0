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
    code, lifted = fleet.agentctl_json("kill", "--class", f"gone{tag}", "--reason", "lifted",
                                       "--deadline", "60", timeout=120)
    assert code == 0, lifted
    _lift_all(fleet)
    code, held = fleet.agentctl_json("kill", "--class", f"late{tag}", "--reason",
                                     "before h6 existed", "--deadline", "60", timeout=120)
    assert code == 0, held
    assert "h6" not in [r["host"] for r in held["hosts"]]
    hold_id = held["actions"][0]

    newcomer = fleet.add_host(6, {"zone": "c"})
    request.addfinalizer(newcomer.daemon.stop)
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
    newcomer.daemon.stop()
