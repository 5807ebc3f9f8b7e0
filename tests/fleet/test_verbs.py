"""The fleet verbs other than kill, on the five real daemons: `agentctl fleet pause`, `resume`
and `reactivate`, each through a different selector (class, label, host, agent), applied by
exactly the hosts the selector reaches; none of them writes a hold, and a reactivate does not
lift the hold a fleet kill left (launches stay refused until it is lifted)."""

from __future__ import annotations

import secrets

import pytest

from tests.fleet.support import Fleet
from tests.fleet.test_halt import _launch, _lift_all, _refusal, _registered, _state

pytestmark = [pytest.mark.privileged, pytest.mark.e2e]


def _confirmed(fleet: Fleet, *args: str) -> dict[str, dict[str, object]]:
    code, result = fleet.agentctl_json(*args, "--deadline", "60", timeout=120)
    assert code == 0 and not result["unconfirmed"], result
    assert all(r["status"] == "confirmed" for r in result["hosts"]), result
    return {r["host"]: r for r in result["hosts"]}


def test_pause_resume_and_reactivate_reach_the_hosts_their_selector_names(
        fleet: Fleet) -> None:
    tag = secrets.token_hex(2)
    name, agent_class = f"v-{tag}", f"verb{tag}"
    for host in fleet.hosts:
        _launch(host, name, agent_class)
    _registered(fleet, name)
    by_id = {h.host_id: h for h in fleet.hosts}

    paused = _confirmed(fleet, "pause", "--class", agent_class, "--reason", "pause them")
    assert sorted(paused) == ["h1", "h2", "h3", "h4", "h5"]
    assert all(r["agents_affected"] == 1 for r in paused.values()), paused
    assert {h: _state(host, name) for h, host in by_id.items()} == dict.fromkeys(by_id, "paused")
    with fleet.operator_client() as operator:
        holds, _ = operator.get_prefix(fleet.keys.holds)
    assert not [kv for kv in holds if agent_class in kv.value]

    # A label reaches its hosts only (h1 and h2 are zone a), a host only itself.
    resumed = _confirmed(fleet, "resume", "--label", "zone=a", "--reason", "zone a back")
    assert sorted(resumed) == ["h1", "h2"]
    resumed = _confirmed(fleet, "resume", "--host", "h3", "--reason", "h3 back")
    assert sorted(resumed) == ["h3"]
    assert {h: _state(host, name) for h, host in by_id.items()} == {
        "h1": "active", "h2": "active", "h3": "active", "h4": "paused", "h5": "paused"}
    _confirmed(fleet, "resume", "--class", agent_class, "--reason", "the rest back")
    assert {_state(host, name) for host in fleet.hosts} == {"active"}

    # A kill of the agent by name holds it; a reactivate on one host (agent and host
    # together) reactivates it there only, and the hold still refuses its launch.
    killed = _confirmed(fleet, "kill", "--agent", name, "--reason", "kill by name")
    assert sorted(killed) == ["h1", "h2", "h3", "h4", "h5"]
    try:
        again = _confirmed(fleet, "reactivate", "--host", "h4", "--agent", name, "--reason",
                           "h4 only")
        assert sorted(again) == ["h4"] and again["h4"]["agents_affected"] == 1, again
        assert {h: _state(host, name) for h, host in by_id.items()} == {
            "h1": "killed", "h2": "killed", "h3": "killed", "h4": "idle", "h5": "killed"}
        assert _refusal(by_id["h4"], name, agent_class) == "fleet_hold"
    finally:
        _lift_all(fleet)
    assert _refusal(by_id["h4"], name, agent_class) is None
    assert _state(by_id["h4"], name) == "active"
