"""The daemon's side of the gateway channel (supervisor/daemon/egress.py) against reports a
subverted worker could send: what reaches the audit log and the approval list stays bounded,
and a hold that crosses a revocation is refused. The worker process is not started (its sends
go nowhere; e2e proves the real one). No privilege."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import Any

from supervisor.daemon.containment import Containment
from supervisor.daemon.egress import (
    _DENIAL_ROWS_PER_RUN,
    _MAX_PENDING_APPROVALS,
    SUMMARY_DENIALS_BYTES,
    EgressControl,
    RunNetwork,
    _RunEgress,
    fit_denials,
)
from supervisor.egress.grant import RunGrant
from supervisor.egress.link import LinkAddresses
from supervisor.models.egress import GatewayPolicy
from tests.unit.conftest import ArbiterEnv


def control(env: ArbiterEnv, loop: asyncio.AbstractEventLoop, *runs: str) -> EgressControl:
    arbiter = env.arbiter()
    egress = EgressControl(env.config, arbiter, Containment(arbiter), env.audit, env.db, loop)
    for run_id in runs:
        grant = RunGrant(run_id=run_id, agent=f"agent-{run_id}", token="t", expires_at=2e9,
                         policy=GatewayPolicy(), host_ip="10.213.0.1", port=3128, secrets={})
        addresses = LinkAddresses.of(ipaddress.IPv4Network("10.213.0.0/30"))
        network = RunNetwork(run_id, "asgx", "table", addresses, 3128)
        egress.runs[run_id] = _RunEgress(network, grant, generation=1)
    return egress


def rows(env: ArbiterEnv, verb: str) -> list[Any]:
    return [e for e in env.audit.list(limit=100_000) if e.verb == verb]


def test_refusal_reports_are_clipped_and_capped_per_run(env: ArbiterEnv) -> None:
    async def scenario() -> None:
        egress = control(env, asyncio.get_running_loop(), "r1")
        for i in range(_DENIAL_ROWS_PER_RUN + 30):
            egress._on_event({"op": "denied", "run": "r1", "code": "egress_denied" * 20,
                              "detail": {"host": f"h{i}", "blob": "x" * (i * 1000)}})
        egress._on_event({"op": "denied", "run": "gone", "code": "c", "detail": {}})

    asyncio.run(scenario())
    denied = rows(env, "egress_denied")
    assert len(denied) == _DENIAL_ROWS_PER_RUN
    assert all(len(e.outcome) <= len("refused:") + 64 for e in denied)
    assert denied[0].detail["host"] == "h0"
    assert any(e.detail.get("detail_withheld") for e in denied)
    assert all(len(str(e.detail)) < 10_000 for e in denied)


def test_holds_are_capped_and_a_hold_after_revocation_is_refused(env: ArbiterEnv) -> None:
    async def scenario() -> EgressControl:
        egress = control(env, asyncio.get_running_loop(), "r1", "r2")
        await egress.revoke("r2")
        egress._on_event({"op": "approval", "id": "late", "run": "r2", "method": "POST",
                          "host": "h", "path": "/", "rule": "POST *"})
        assert egress.list_approvals() == []
        for i in range(_MAX_PENDING_APPROVALS + 10):
            egress._on_event({"op": "approval", "id": f"{i:08x}", "run": "r1",
                              "method": "DELETE" * 100, "host": "h" * 10_000,
                              "path": "/" * 10_000, "rule": "DELETE *"})
        return egress

    egress = asyncio.run(scenario())
    held = egress.list_approvals()
    assert len(held) == _MAX_PENDING_APPROVALS
    assert len(held[0]["host"]) == 300 and len(held[0]["method"]) == 16
    assert len(rows(env, "approval_requested")) == _MAX_PENDING_APPROVALS


def test_the_summary_tally_fits_the_audit_row_and_keeps_its_total() -> None:
    # 64 refusals with 200-character targets (the gateway's own bounds): whole, the tally
    # would pass the audit's detail cap and the row would be cut.
    tally = {f"host_not_allowed {'x' * 190}{i:03d}": i + 1 for i in range(64)}
    fitted = fit_denials(tally)
    assert len(json.dumps(fitted)) <= SUMMARY_DENIALS_BYTES
    assert sum(fitted.values()) == sum(tally.values())
    assert fitted[f"host_not_allowed {'x' * 190}063"] == 64  # the most frequent stay named
    assert any(key.startswith("other (") for key in fitted)
    small = {"host_not_allowed a.example": 3}
    assert fit_denials(small) == small


def test_a_drills_token_check_keeps_the_listener_and_step_2_is_the_only_revocation(
        env: ArbiterEnv) -> None:
    # The drill's credentials_revoked check (daemon/egress.py TokenCheck) must see what kill
    # step 2 did: the run's end sends no second revoke that would hide a step 2 that sent
    # nothing, and the gateway's close (which revokes too) waits until the check is done.
    async def scenario() -> list[str]:
        egress = control(env, asyncio.get_running_loop(), "r1", "r2")
        egress.worker.generation = 1  # the worker that holds the runs' listeners
        sent: list[str] = []

        def send(message: dict[str, Any]) -> bool:
            sent.append(f"{message['op']} {message['run']}")
            return True

        async def request(message: dict[str, Any], timeout: float = 0) -> dict[str, Any]:
            sent.append(f"{message['op']} {message['run']}")
            return {"usage": None}

        egress.worker.send = send  # type: ignore[method-assign]
        egress.worker.request = request  # type: ignore[method-assign]
        check = egress.revocation_check("r1")
        assert check is not None and egress.revocation_check("gone") is None
        await egress.revoke("r1")
        egress.run_ended("r1")
        egress.run_ended("r2")  # ended on its own: its end revokes it
        for _ in range(20):
            await asyncio.sleep(0)
        assert sent == ["revoke r1", "revoke r2", "close r2"]  # r1's close waits
        check.release()
        await asyncio.wait(egress._finishing, timeout=5)
        return sent

    assert asyncio.run(scenario()) == ["revoke r1", "revoke r2", "close r2", "close r1"]


def test_reconcile_lists_no_nft_tables_where_none_can_be_left(
        env: ArbiterEnv, monkeypatch: Any) -> None:
    """`leftover_tables_possible` False (an embedded CI slot whose last runs made no table):
    reconcile's sweep runs no `nft` at all; True (the daemon's default): it lists the prefix's
    tables and removes each, audited."""
    from supervisor.egress import nft

    listed: list[str] = []
    removed: list[str] = []

    def tables_with_prefix(prefix: str) -> list[str]:
        listed.append(prefix)
        return [f"{prefix}.r1"]

    monkeypatch.setattr(nft, "tables_with_prefix", tables_with_prefix)
    monkeypatch.setattr(nft, "remove", lambda table: removed.append(table) or True)

    async def scenario() -> tuple[list[str], list[str]]:
        egress = control(env, asyncio.get_running_loop())
        egress.leftover_tables_possible = False
        skipped = egress.reap_leftovers()
        egress.leftover_tables_possible = True
        return skipped, egress.reap_leftovers()

    skipped, reaped = asyncio.run(scenario())
    prefix = env.config.sandbox.name_prefix
    assert skipped == [] and listed == [prefix]
    assert reaped == removed == [f"{prefix}.r1"]
    assert [e.detail for e in rows(env, "reap")] == [{"nft_tables": [f"{prefix}.r1"]}]
