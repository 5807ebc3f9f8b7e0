"""The gateway worker's side of the channel (supervisor/egress/worker.py), without starting the
process: a grant survives the wire; reports are cut to size; held requests are bounded,
resolved by the daemon's decision, withdrawn when the agent hangs up, and released when the
run is revoked or the worker stops. The process itself (cgroup, uid, death, restart) is proved
by tests/e2e/test_egress_worker.py. No privilege."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest

from supervisor.config import EgressSection
from supervisor.egress import ipc, worker
from supervisor.egress.accounting import Usage
from supervisor.egress.grant import RunGrant, grant_from_wire, grant_to_wire
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
    frame = ipc.encode({"op": "open", "grant": grant_to_wire(grant)}, ipc.TO_WORKER_LIMIT)
    (message,) = ipc.FrameBuffer(ipc.TO_WORKER_LIMIT).feed(frame)
    assert grant_from_wire(message["grant"]) == grant


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


# ---------------------------------------------------------------- MCP decisions, in batches
# The real thing on both sides of a real channel: the worker's loop (here, the test's) with
# the gateway running in its own thread and loop, and the daemon's end of the socketpair.


async def _decisions_scenario(body: Any) -> None:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    w = worker.Worker(ours, EgressSection(), ssl.create_default_context())
    loop = w.loop = asyncio.get_running_loop()
    _, w.channel = await loop.create_unix_connection(
        lambda: ipc.FrameProtocol(ipc.TO_WORKER_LIMIT, ipc.WRITE_BUFFER_LIMIT, w.on_message,
                                  lambda _reason: None), sock=ours)
    frames = ipc.FrameBuffer(ipc.TO_DAEMON_LIMIT)
    received: list[dict[str, Any]] = []

    async def read(count: int) -> list[dict[str, Any]]:
        """The next `count` messages at the daemon's end (a guard against a hang, no timing)."""
        while len(received) < count:
            received.extend(frames.feed(await asyncio.wait_for(loop.sock_recv(theirs, 65536),
                                                               30)))
        out = received[:count]
        del received[:count]
        return out

    def in_gateway(fn: Any) -> None:
        """Run `fn` in the gateway's thread and loop, as its request handlers run."""
        async def call() -> None:
            fn()
        w.gateway._submit(call()).result(timeout=30)

    w.gateway.start()
    try:
        await body(w, read, in_gateway)
    finally:
        w.gateway.stop()
        if w.channel.transport is not None:
            w.channel.transport.close()
        ours.close()
        theirs.close()


def _detail(n: int) -> dict[str, Any]:
    return {"audit_id": f"mcp-{n}", "tool": "search", "outcome": "allowed"}


def test_mcp_decisions_all_reach_the_daemon_in_order_with_one_hand_over_per_batch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A wake-up of the worker's loop per decision cost the gateway's thread more than judging
    the call: decisions made together cross together, every one of them, in order."""
    handed: list[int] = []

    async def body(w: worker.Worker, read: Any, in_gateway: Any) -> None:
        real = w._hand_over_decisions
        monkeypatch.setattr(w, "_hand_over_decisions", lambda: (handed.append(1), real()))
        in_gateway(lambda: [w.mcp_decision("r1", _detail(n)) for n in range(100)])
        got = await read(100)
        assert [(m["op"], m["run"], m["detail"]["audit_id"]) for m in got] == \
            [("mcp", "r1", f"mcp-{n}") for n in range(100)]
        assert handed == [1]
        # From outside any loop (no timer to arm) a decision is handed over at once.
        w.mcp_decision("r2", _detail(100))
        assert [m["run"] for m in await read(1)] == ["r2"] and handed == [1, 1]

    asyncio.run(_decisions_scenario(body))


def test_a_full_batch_of_mcp_decisions_is_handed_over_without_waiting_for_the_timer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "_DECISIONS_EVERY", 3600.0)  # the timer never fires here

    async def body(w: worker.Worker, read: Any, in_gateway: Any) -> None:
        batch = worker._DECISIONS_BATCH
        in_gateway(lambda: [w.mcp_decision("r1", _detail(n)) for n in range(batch)])
        got = await read(batch)
        assert [m["detail"]["audit_id"] for m in got] == [f"mcp-{n}" for n in range(batch)]
        in_gateway(lambda: [w.mcp_decision("r1", _detail(n))
                            for n in range(batch, batch + 3)])
        with w._decisions_lock:  # the rest wait for their timer (or whatever posts next)
            assert [m["detail"]["audit_id"] for m in w._decisions] == \
                [f"mcp-{n}" for n in range(batch, batch + 3)]

    asyncio.run(_decisions_scenario(body))


def test_waiting_mcp_decisions_go_before_an_approval_request_and_a_runs_close_reply(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit keeps the order things happened in: a hold's decision before its approval
    request; and every decision of a run before the reply to its close (on which the daemon
    forgets the run, and would drop a decision that came later)."""
    monkeypatch.setattr(worker, "_DECISIONS_EVERY", 3600.0)

    async def body(w: worker.Worker, read: Any, in_gateway: Any) -> None:
        held: list[Any] = []
        in_gateway(lambda: (w.mcp_decision("r1", {**_detail(1), "outcome": "held"}),
                            held.append(w.request_approval("r1", "MCP", "mcp.gateway/code",
                                                           "tools/call drop_table", "rule"))))
        assert [m["op"] for m in await read(2)] == ["mcp", "approval"]
        in_gateway(lambda: w.mcp_decision("r1", {**_detail(2), "outcome": "approved"}))
        w.on_message({"op": "close", "run": "r1", "id": 7})
        last = await read(2)
        assert [m["op"] for m in last] == ["mcp", "reply"]
        assert last[0]["detail"]["audit_id"] == "mcp-2" and last[1]["re"] == 7
        assert held[0].done() and not held[0].result().approved  # the close released it

    asyncio.run(_decisions_scenario(body))
