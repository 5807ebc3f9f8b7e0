"""Partitions: a host's link to the bridge taken down for longer than its lease. h3 halts,
h4 pauses, h5 holds launches except for class `risky`, which it halts; all refuse launches
while cut off, audit what they did, and report it in the store once back."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import pytest

from supervisor.errors import SupervisorError
from tests.fleet.support import Fleet, Host
from tests.fleet.test_halt import _launch, _state, audit_window
from tests.support.daemon import wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.e2e]


def _launch_refused(host: Host, name: str) -> str | None:
    try:
        _launch(host, name, "web")
    except SupervisorError as exc:
        return exc.code
    return None


def _head(host: Host) -> int:
    entries = host.daemon.client.audit(limit=1)["entries"]
    return int(entries[-1]["seq"]) if entries else 0


def _rows_after(host: Host, verb: str, seq: int) -> list[dict[str, Any]]:
    return [row for row in audit_window(host, seq) if row["verb"] == verb]


def test_lease_loss_applies_each_policy_and_is_reported_after(fleet: Fleet) -> None:
    tag = secrets.token_hex(2)
    h1, h3, h4, h5 = fleet.hosts[0], fleet.hosts[2], fleet.hosts[3], fleet.hosts[4]
    for host in (h1, h3, h4, h5):
        _launch(host, f"web-{tag}", "web")
    _launch(h5, f"risky-{tag}", "risky")
    cut = (h3, h4, h5)
    # Rows from before this cut (an earlier test's, or a lease lost under load) do not count:
    # the wait is for the policy this cut applies.
    before = {h.host_id: _head(h) for h in cut}
    for host in cut:
        fleet.link(host.member, up=False)
    try:
        for host in cut:
            wait_for(lambda h=host: _rows_after(h, "fleet_partition", before[h.host_id]),
                     timeout=40, interval=0.2, what=f"the partition policy on {host.host_id}")
        assert _state(h3, f"web-{tag}") == "killed", [
            r["detail"] for r in _rows_after(h3, "fleet_partition", before["h3"])]
        assert _state(h4, f"web-{tag}") == "paused"
        assert _state(h5, f"web-{tag}") == "active"
        assert _state(h5, f"risky-{tag}") == "killed"
        assert _state(h1, f"web-{tag}") == "active"  # still connected: untouched
        for host in cut:
            assert _launch_refused(host, f"new-{tag}") == "fleet_hold"
        applied = _rows_after(h5, "fleet_partition", before["h5"])[-1]["detail"]["applied"]
        assert applied["risky"]["policy"] == "halt" and applied["web"]["policy"] == \
            "hold-launches"
    finally:
        for host in cut:
            fleet.link(host.member, up=True)
    for host in cut:
        wait_for(lambda h=host: _rows_after(h, "fleet_reconnect", before[h.host_id]),
                 timeout=40, interval=0.2, what=f"{host.host_id} back")
    with fleet.operator_client() as operator:
        for host in cut:
            report = wait_for(lambda h=host: operator.get(fleet.keys.partition(h.host_id)),
                              timeout=20, what=f"{host.host_id}'s partition report")
            body = json.loads(report.value)
            assert body["host"] == host.host_id and body["applied"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _launch_refused(h5, f"after-{tag}") is not None:
        time.sleep(0.2)
    assert _state(h5, f"after-{tag}") == "active"
    code, listed = fleet.agentctl_json("ls")
    assert code == 0
    assert {r["host"] for r in listed["hosts"] if r["alive"]} >= {"h3", "h4", "h5"}
