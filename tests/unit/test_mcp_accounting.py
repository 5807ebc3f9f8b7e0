"""What the daemon keeps of a run's MCP decisions (supervisor/daemon/egress.py): one audit row per
decision up to the per-run cap, the excess counted by outcome in the run's egress_summary row,
and the calls and cost the gateway reported as telemetry's `mcp_calls` and `mcp_cost`, which
tripwire rules watch like any other metric. The worker is not started (its reports are fed
in as it sends them; tests/e2e/test_mcp.py has the real one). No privilege."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from supervisor.daemon.containment import Containment
from supervisor.daemon.egress import (
    _MCP_EXCESS_KEYS,
    _MCP_ROWS_PER_RUN,
    EgressControl,
    RunNetwork,
    _RunEgress,
)
from supervisor.egress.grant import RunGrant
from supervisor.egress.link import LinkAddresses
from supervisor.metrics import PREFIX, Metrics
from supervisor.models.egress import GatewayPolicy
from supervisor.models.mcp import McpPolicy, McpServer
from supervisor.models.tripwire import TripwirePolicy, TripwireRule
from supervisor.telemetry import Sample
from supervisor.tripwires import RunTripwires
from tests.unit.conftest import ArbiterEnv
from tests.unit.test_metrics import FakeArbiter, scrape, value
from tests.unit.test_telemetry import FakeHost

POLICY = GatewayPolicy(mcp=McpPolicy(servers=[McpServer(
    name="code", url="https://code.mcp.test/mcp", allow=["search"])]))


def control(env: ArbiterEnv, loop: asyncio.AbstractEventLoop) -> EgressControl:
    arbiter = env.arbiter()
    egress = EgressControl(env.config, arbiter, Containment(arbiter), env.audit, env.db, loop)
    grant = RunGrant(run_id="r1", agent="coder", token="t", expires_at=2e9, policy=POLICY,
                     host_ip="10.213.0.1", port=3128, secrets={})
    network = RunNetwork("r1", "asgx", "table",
                         LinkAddresses.of(ipaddress.IPv4Network("10.213.0.0/30")), 3128)
    egress.runs["r1"] = _RunEgress(network, grant, generation=1)
    return egress


def decision(i: int, outcome: str = "allowed", reason: str = "") -> dict[str, Any]:
    return {"op": "mcp", "run": "r1", "detail": {
        "audit_id": f"mcp-{i:016x}", "agent": "coder", "server": "code", "method": "tools/call",
        "tool": "search", "outcome": outcome, "reason": reason, "rule": "code.tools.search",
        "message": "", "args_sha256": "0" * 64, "calls": i + 1, "cost": (i + 1) * 0.01}}


def audit_rows(env: ArbiterEnv, verb: str) -> list[Any]:
    return [e for e in env.audit.list(limit=100_000) if e.verb == verb]


def test_audit_rows_stop_at_the_cap_and_the_excess_is_counted_in_the_summary(
        env: ArbiterEnv) -> None:
    excess = 37
    metrics = Metrics(FakeArbiter(), env.audit, "1")

    async def scenario() -> EgressControl:
        egress = control(env, asyncio.get_running_loop())
        for i in range(_MCP_ROWS_PER_RUN + excess):
            denied = i >= _MCP_ROWS_PER_RUN + 30
            egress._on_event(decision(i, "denied" if denied else "allowed",
                                      "budget_exhausted" if denied else ""))
        egress.run_ended("r1")  # no worker to ask: the summary row is written from what it has
        await asyncio.gather(*egress._finishing)
        return egress

    asyncio.run(scenario())
    rows = audit_rows(env, "mcp_call")
    assert len(rows) == _MCP_ROWS_PER_RUN
    assert rows[-1].detail["audit_id"] == f"mcp-{_MCP_ROWS_PER_RUN - 1:016x}"
    [summary] = audit_rows(env, "egress_summary")
    mcp = summary.detail["mcp"]
    assert mcp["rows"] == _MCP_ROWS_PER_RUN
    assert mcp["unrecorded"] == excess
    assert mcp["unrecorded_by_outcome"] == {"allowed": 30, "denied:budget_exhausted": 7}
    assert mcp["calls"] == _MCP_ROWS_PER_RUN + excess  # the gateway's count, not the rows'
    assert env.audit.verify().ok
    # Prometheus: every decision counted, the audited ones by server, the excess from the
    # summary row; the run's cost once it ended.
    samples = scrape(metrics)
    assert value(samples, f"{PREFIX}_mcp_calls_total", server="code",
                 outcome="allowed") == _MCP_ROWS_PER_RUN
    assert value(samples, f"{PREFIX}_mcp_calls_total", server="", outcome="allowed") == 30
    assert value(samples, f"{PREFIX}_mcp_calls_total", server="", outcome="denied") == 7
    assert value(samples, f"{PREFIX}_mcp_cost_total") == pytest.approx(
        (_MCP_ROWS_PER_RUN + excess) * 0.01)


def test_the_excess_tally_names_a_bounded_number_of_outcomes(env: ArbiterEnv) -> None:
    async def scenario() -> _RunEgress:
        egress = control(env, asyncio.get_running_loop())
        state = egress.runs["r1"]
        state.mcp_rows = _MCP_ROWS_PER_RUN  # the cap reached: every report is counted only
        for i in range(3 * _MCP_EXCESS_KEYS):
            egress._on_event(decision(i, "denied", f"reason_{i}" * 40))
        return state

    state = asyncio.run(scenario())
    assert len(state.mcp_excess) == _MCP_EXCESS_KEYS + 1
    assert state.mcp_excess["other"] == 2 * _MCP_EXCESS_KEYS
    assert sum(state.mcp_excess.values()) == state.mcp_unrecorded == 3 * _MCP_EXCESS_KEYS
    assert all(len(key) <= 16 + 1 + 64 for key in state.mcp_excess)
    assert audit_rows(env, "mcp_call") == []


def test_calls_and_cost_reach_telemetry_and_never_go_back(env: ArbiterEnv) -> None:
    async def scenario() -> EgressControl:
        egress = control(env, asyncio.get_running_loop())
        for i in range(5):
            egress._on_event(decision(i))
        # Late, or not numbers at all (a subverted worker): the totals do not move.
        egress._on_event(decision(1))
        for calls, cost in ((True, float("nan")), ("9", "inf"), (-1, -1.0), (None, None)):
            egress._on_event({"op": "mcp", "run": "r1",
                              "detail": {**decision(0)["detail"], "calls": calls,
                                         "cost": cost}})
        return egress

    egress = asyncio.run(scenario())
    counter = egress.mcp_counter("r1")
    assert counter is not None
    calls, cost = counter()
    assert calls == 5 and cost == pytest.approx(0.05)
    assert egress.mcp_counter("no-such-run") is None


def test_a_gateway_run_without_mcp_servers_has_no_mcp_metrics(env: ArbiterEnv) -> None:
    async def scenario() -> EgressControl:
        egress = control(env, asyncio.get_running_loop())
        state = egress.runs["r1"]
        egress.runs["r1"] = _RunEgress(state.network, RunGrant(
            run_id="r1", agent="coder", token="t", expires_at=2e9, policy=GatewayPolicy(),
            host_ip="10.213.0.1", port=3128, secrets={}), generation=1)
        return egress

    assert asyncio.run(scenario()).mcp_counter("r1") is None


def test_tripwire_rules_watch_mcp_calls_and_cost() -> None:
    policy = TripwirePolicy(rules=[
        TripwireRule(name="chatty", metric="mcp_calls", above=100, action="pause"),
        TripwireRule(name="pricey", metric="mcp_cost", above="2.5", action="kill")])
    wires = RunTripwires(policy)
    quiet = Sample(ts=1.0, wall_seconds=1.0, processes=1, mcp_calls=100, mcp_cost=2.5)
    assert wires.evaluate(quiet) == []
    assert wires.evaluate(Sample(ts=2.0, wall_seconds=2.0, processes=1)) == []  # no gateway
    fired = wires.evaluate(Sample(ts=3.0, wall_seconds=3.0, processes=1, mcp_calls=101,
                                  mcp_cost=2.51))
    assert [(f.rule, f.metric, f.action) for f in fired] == [
        ("chatty", "mcp_calls", "pause"), ("pricey", "mcp_cost", "kill")]
    assert fired[0].value == 101 and fired[1].threshold == 2.5
    with pytest.raises(ValidationError, match="unknown metric"):
        TripwireRule(name="typo", metric="mcp_call", above=1)


def test_samples_carry_the_mcp_counter(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    loop = asyncio.new_event_loop()
    try:
        counts = [(3, 0.03)]
        hub = host.hub(loop)
        hub.register("r1", host.cgroup, started_at=host.now, mcp_counter=lambda: counts[-1])
        hub.register("r2", host.cgroup, started_at=host.now)
        samples = dict(host.tick(hub))
        counts.append((4, 0.04))
        later = dict(host.tick(hub))
    finally:
        loop.close()
    assert (samples["r1"].mcp_calls, samples["r1"].mcp_cost) == (3, 0.03)
    assert (later["r1"].mcp_calls, later["r1"].mcp_cost) == (4, 0.04)
    assert (samples["r2"].mcp_calls, samples["r2"].mcp_cost) == (None, None)
