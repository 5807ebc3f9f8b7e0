"""The gateway worker's side of the channel (supervisor/egress/worker.py), without starting the
process: a grant survives the wire; reports are cut to size; held requests are bounded,
resolved by the daemon's decision, withdrawn when the agent hangs up, and released when the
run is revoked or the worker stops. The process itself (cgroup, uid, death, restart) is proved
by tests/e2e/test_egress_worker.py. No privilege."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest

from supervisor.config import EgressSection
from supervisor.egress import ipc, worker
from supervisor.egress.accounting import Usage
from supervisor.egress.grant import RunGrant
from supervisor.models.egress import GatewayPolicy


@pytest.fixture
def subject() -> Iterator[tuple[worker.Worker, list[dict[str, Any]]]]:
    ours, theirs = socket.socketpair()
    w = worker.Worker(ours, EgressSection(), ssl.create_default_context())
    posted: list[dict[str, Any]] = []
    w._post = posted.append  # type: ignore[method-assign]  # the seam: no loop, no channel
    yield w, posted
    ours.close()
    theirs.close()


def test_a_grant_round_trips_over_the_wire_secrets_and_policy_included() -> None:
    policy = GatewayPolicy.model_validate({
        "allow": ["pypi.org:443"], "approvals": ["DELETE *"],
        "routes": [{"name": "llm", "host": "llm.gateway", "secret": "file:k",
                    "upstream": "https://api.example.com"}],
        "budget": {"action": "kill", "run": {"spend": 2.5}}})
    grant = RunGrant(run_id="r1", agent="a", token="t" * 43, expires_at=1e9 + 0.5,
                     policy=policy, host_ip="10.213.0.1", port=3128,
                     secrets={"llm": "sk-secret"}, agent_usage=Usage(requests=3, spend=0.25))
    frame = ipc.encode({"op": "open", "grant": worker.grant_to_wire(grant)}, ipc.TO_WORKER_LIMIT)
    (message,) = ipc.FrameBuffer(ipc.TO_WORKER_LIMIT).feed(frame)
    assert worker.grant_from_wire(message["grant"]) == grant


def test_a_hold_the_agent_gave_up_on_is_withdrawn_at_the_daemon(
        subject: tuple[worker.Worker, list[dict[str, Any]]]) -> None:
    """The gateway cancels a held request's future when the agent hangs up; the daemon must
    hear of it, or the approval would wait for an operator with nobody behind it."""
    w, posted = subject
    future = w.request_approval("r1", "POST", "h", "/", "POST *")
    approval_id = posted[0]["id"]
    assert future.cancel()
    assert posted[1:] == [{"op": "withdrawn", "id": approval_id}] and w.held == {}
    decided = w.request_approval("r1", "POST", "h", "/", "POST *")
    w.on_message({"op": "decide", "approval": posted[2]["id"], "approved": False,
                  "reason": "no"})
    assert decided.done() and [m["op"] for m in posted] == ["approval", "withdrawn", "approval"]


def test_oversized_details_are_cut_before_they_are_sent(
        subject: tuple[worker.Worker, list[dict[str, Any]]]) -> None:
    w, posted = subject
    w.denied("r1", "bad_request", {"target": "t", "path": "/" + "a" * 100_000})
    (report,) = posted
    assert len(ipc.encode(report, ipc.TO_DAEMON_LIMIT)) < 8192
    assert report["detail"]["path"] == "(truncated)" and report["detail"]["target"] == "t"


def test_held_requests_wait_for_the_daemons_decision(
        subject: tuple[worker.Worker, list[dict[str, Any]]]) -> None:
    w, posted = subject
    future = w.request_approval("r1", "DELETE", "llm.gateway", "/v1/x", "DELETE *")
    (held,) = posted
    assert held["op"] == "approval" and held["run"] == "r1" and not future.done()
    w.on_message({"op": "decide", "approval": "not-this-one", "approved": True})
    assert not future.done()
    w.on_message({"op": "decide", "approval": held["id"], "approved": True,
                  "by": "user:alice", "reason": "ticket 4"})
    decision = future.result(timeout=0)
    assert decision.approved and decision.by == "user:alice" and decision.approval_id == held["id"]
    assert w.held == {}


def test_held_requests_are_bounded_and_released_by_revocation(
        subject: tuple[worker.Worker, list[dict[str, Any]]]) -> None:
    w, _posted = subject
    waiting = [w.request_approval("r1" if i % 2 else "r2", "POST", "h", "/", "POST *")
               for i in range(worker.MAX_HELD)]
    over = w.request_approval("r1", "POST", "h", "/", "POST *")
    assert over.done() and not over.result().approved
    assert "too many" in over.result().reason
    w.on_message({"op": "revoke", "run": "r1"})
    released = [f for f in waiting if f.done()]
    assert len(released) == worker.MAX_HELD // 2
    assert all(not f.result().approved for f in released)
    assert len(w.held) == worker.MAX_HELD // 2  # r2's still wait
    w._release_held("the gateway stopped")
    assert all(f.done() and not f.result().approved for f in waiting) and w.held == {}
