"""A run's MCP state across a restart, without root (issue 13): what the old gateway worker
gives the next one (McpCarried on the wire, bounded and checked), and the gateway's side of
the handover with a stdio server on a real socketpair: the call in flight is answered with a
JSON-RPC error the agent can retry on and cancelled at the server, whose stdin stays open
through the daemon's copy of the gateway's end; the next gateway, given that copy, reaches the
same server, numbers its requests past the old ones (a late answer to the cancelled call is
dropped) and counts the budgets on. e2e (tests/e2e/test_handover_mcp.py) proves it with the
SDK's server in its sandbox and real daemons."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import subprocess
import sys
import threading
from typing import Any

import httpx
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError

from supervisor.config import EgressSection
from supervisor.egress.gateway import Gateway
from supervisor.egress.grant import (
    MCP_CARRIED_SESSIONS,
    Carried,
    Decision,
    McpCarried,
    RunGrant,
    carried_from_wire,
    carried_to_wire,
    mcp_carried_from_wire,
    mcp_carried_to_wire,
)
from supervisor.mcp import gateway as mcp_gateway
from supervisor.mcp.stdio import RESTARTING, StdioBridge, StdioUnavailable
from supervisor.models.egress import GatewayPolicy
from tests.unit import test_egress_gateway as gw
from tests.unit.test_mcp_gateway import McpSink
from tests.unit.test_mcp_stdio import SERVER as SDK_SERVER

CARRIED = McpCarried(calls=3, cost=0.25, per_server={"files": 3}, per_tool={"files/echo": 1},
                     sessions=[("sid-1", "remote")], next_ids={"files": 4})


def test_the_mcp_state_goes_over_the_wire_whole() -> None:
    wire = json.loads(json.dumps(mcp_carried_to_wire(CARRIED)))
    assert mcp_carried_from_wire(wire) == CARRIED
    carried = Carried(suspended=True, mcp=CARRIED)
    assert carried_from_wire(json.loads(json.dumps(carried_to_wire(carried)))) == carried
    assert carried_from_wire(carried_to_wire(Carried())).mcp is None  # a run without MCP


@pytest.mark.parametrize("change", [
    {"calls": -1}, {"calls": True}, {"calls": 1.5}, {"calls": 1 << 63},
    {"cost": -0.1}, {"cost": "1"}, {"cost": float("inf")}, {"cost": False},
    {"per_server": []}, {"per_server": {"files": -1}}, {"per_server": {"": 1}},
    {"per_tool": {"x" * 301: 1}}, {"per_tool": {f"s/t{n}": 1 for n in range(513)}},
    {"sessions": [["sid"]]}, {"sessions": [["sid", 1]]}, {"sessions": {"sid": "remote"}},
    {"sessions": [["s", "remote"]] * (MCP_CARRIED_SESSIONS + 1)},
    {"next_ids": {"files": 0}}, {"next_ids": {f"s{n}": 1 for n in range(9)}},
    {"next_ids": None},
])
def test_a_malformed_or_unbounded_mcp_state_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        mcp_carried_from_wire({**mcp_carried_to_wire(CARRIED), **change})
    with pytest.raises(ValueError):
        mcp_carried_from_wire("not an object")


POLICY = {"breaker": {"enabled": False}, "mcp": {"servers": [
    {"name": "files", "command": ["python", "server.py"], "allow": ["echo", "slow"],
     "tools": {"echo": {"max_calls": 2}}}]}}


def _call(name: str, ident: int | str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": ident, "method": "tools/call",
            "params": {"name": name, "arguments": {}}}


class _Side:
    """One gateway (a worker) serving the run, and the agent's POSTs to it."""

    def __init__(self, server_end: socket.socket, carried: McpCarried | None,
                 port: int, policy: dict[str, Any] = POLICY) -> None:
        self.sink = McpSink()
        self.gateway = Gateway(EgressSection.model_validate({}), self.sink, clock=gw.Clock())
        self.gateway.start()
        self.port = port
        grant = RunGrant(run_id=gw.RUN, agent="agent-a", token=gw.TOKEN,
                         expires_at=gw.T0 + 3600, policy=GatewayPolicy.model_validate(policy),
                         host_ip="127.0.0.1", port=port, secrets={})
        asyncio.run(self.gateway.open(grant, {"files": server_end},
                                      Carried(mcp=carried) if carried else None))

    def post(self, message: Any) -> Any:
        return gw.exchange(self.port, gw.request_bytes(
            "POST", "http://mcp.gateway/files", "mcp.gateway", auth=gw.basic(gw.TOKEN),
            body=json.dumps(message).encode(),
            headers=(("Content-Type", "application/json"),
                     ("Accept", "application/json, text/event-stream"))))

    def posting(self, message: Any, into: list[Any]) -> threading.Thread:
        thread = threading.Thread(target=lambda: into.append(self.post(message)))
        thread.start()
        return thread


def test_a_call_in_flight_at_a_restart_is_answered_and_the_next_worker_goes_on() -> None:
    server, gateway_end = socket.socketpair()
    kept = socket.socket(fileno=os.dup(gateway_end.fileno()))  # the daemon's copy
    reader = server.makefile("rb")
    old = _Side(gateway_end, None, gw.free_port())
    new: _Side | None = None
    try:
        answered: list[Any] = []
        thread = old.posting(_call("echo", "a1"), answered)
        first = json.loads(reader.readline())
        server.sendall(json.dumps({"jsonrpc": "2.0", "id": first["id"],
                                   "result": {"content": []}}).encode() + b"\n")
        thread.join(gw.WAIT)
        in_flight: list[Any] = []
        thread = old.posting(_call("slow", "a2"), in_flight)
        slow = json.loads(reader.readline())
        assert slow["id"] == first["id"] + 1  # the bridge's own ids

        usage, carried_wire = asyncio.run(old.gateway.hand_over(gw.RUN))
        thread.join(gw.WAIT)
        # The agent's call in flight: a JSON-RPC error (HTTP 200) saying why, retryable.
        [reply] = in_flight
        assert reply.status == 200, reply
        body = reply.json()
        assert body["id"] == "a2" and body["error"]["data"]["reason"] == \
            "supervisor_restarting" and body["error"]["data"]["retryable"] is True
        # ... and cancelled at the server, whose stdin is still open (the daemon's copy).
        cancel = json.loads(reader.readline())
        assert cancel["method"] == "notifications/cancelled"
        assert cancel["params"]["requestId"] == slow["id"]
        assert carried_wire is not None and usage is not None
        carried = mcp_carried_from_wire(carried_wire)
        assert carried.next_ids == {"files": slow["id"] + 1}
        assert (carried.calls, carried.per_tool) == (2, {"files/echo": 1})

        # The next worker: the same server through the daemon's copy of the end.
        new = _Side(kept, carried, old.port)
        late: list[Any] = []
        thread = new.posting(_call("echo", "b1"), late)
        again = json.loads(reader.readline())
        assert again["id"] == slow["id"] + 1  # past every id the old worker gave
        server.sendall(b"".join(json.dumps(m).encode() + b"\n" for m in (
            {"jsonrpc": "2.0", "id": slow["id"], "result": {"content": ["late"]}},
            {"jsonrpc": "2.0", "id": again["id"], "result": {"content": ["b1"]}})))
        thread.join(gw.WAIT)
        assert late[0].json() == {"jsonrpc": "2.0", "id": "b1", "result": {"content": ["b1"]}}
        # The budget went on: echo was called once before the restart, once after.
        assert new.post(_call("echo", "b2")).json()["error"]["data"]["reason"] == \
            "budget_exhausted"
    finally:
        old.gateway.stop()
        if new is not None:
            new.gateway.stop()
        else:
            kept.close()
        reader.close()
        server.close()


def test_the_servers_answer_to_the_handovers_cancellation_never_reaches_the_agent() -> None:
    """The SDK's server answers a cancelled request at once (the error "Request cancelled",
    no data). Read while the handover's cancellations drain, that answer took the place of
    `supervisor_restarting`: the agent got an error it could not tell was a restart's."""
    server, gateway_end = socket.socketpair()
    reader = server.makefile("rb")

    async def scenario() -> StdioUnavailable:
        bridge = await StdioBridge.open("files", gateway_end, 1 << 16)
        call = asyncio.get_running_loop().create_task(bridge.exchange([_call("slow", "a1")]))
        request = json.loads(await asyncio.to_thread(reader.readline))
        drain = bridge.writer.drain

        async def answered_while_draining() -> None:
            # The server reads the cancellation and answers it before the drain is over;
            # the bridge has read that answer by the time the drain returns.
            cancel = json.loads(await asyncio.to_thread(reader.readline))
            assert cancel["params"]["requestId"] == request["id"]
            dropped = bridge.dropped
            server.sendall(json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": {
                "code": 0, "message": "Request cancelled"}}).encode() + b"\n")
            for _ in range(200):
                if bridge.dropped > dropped or call.done():
                    break
                await asyncio.sleep(0.01)
            await drain()

        bridge.writer.drain = answered_while_draining  # type: ignore[method-assign]
        await bridge.hand_over()
        with pytest.raises(StdioUnavailable) as raised:
            await call
        return raised.value

    try:
        failed = asyncio.run(scenario())
        assert (failed.reason, failed.retryable) == (RESTARTING, True), failed.message
    finally:
        reader.close()
        server.close()


def test_a_call_that_reaches_the_bridge_during_the_handover_is_answered_restarting() -> None:
    """A POST that passed the gateway's `handing_over` check before the restart began (its
    body still arriving, or held for an approval) reaches the bridge while the handover's
    cancellations drain. Failed only from the list taken before the drain, its call was
    written to the server and then waited for an answer that never came (the bridge let go of
    the socket): the agent's POST hung until the worker cut it. It is refused retryable with
    `supervisor_restarting`, and the server never gets it (nobody would take its answer)."""
    server, gateway_end = socket.socketpair()
    reader = server.makefile("rb")

    async def scenario() -> tuple[StdioUnavailable, BaseException | None, StdioUnavailable]:
        bridge = await StdioBridge.open("files", gateway_end, 1 << 16)
        first = asyncio.get_running_loop().create_task(bridge.exchange([_call("slow", "a1")]))
        json.loads(await asyncio.to_thread(reader.readline))
        drain = bridge.writer.drain
        late: list[asyncio.Task[Any]] = []

        async def a_call_arrives_while_draining() -> None:
            if late:  # the late call's own drain
                return await drain()
            late.append(asyncio.get_running_loop().create_task(
                bridge.exchange([_call("late", "a2")])))
            for _ in range(3):  # the late call's turns: written, drained, waiting
                await asyncio.sleep(0)
            await drain()

        bridge.writer.drain = a_call_arrives_while_draining  # type: ignore[method-assign]
        await bridge.hand_over()
        with pytest.raises(StdioUnavailable) as raised:
            await first
        # Once the handover is over, the late call has its answer: nothing of this bridge
        # could give it one any more.
        for _ in range(3):
            await asyncio.sleep(0)
        # (asyncio.run cancels a task still waiting once this returns: looked at here)
        assert late[0].done(), "the call that came during the handover was never answered"
        after = late[0].exception()
        # And a call that comes after the handover is a restart's too, not a stopped server's.
        with pytest.raises(StdioUnavailable) as later:
            await bridge.exchange([_call("later", "a3")])
        return raised.value, after, later.value

    try:
        first, late, later = asyncio.run(scenario())
        assert (first.reason, first.retryable) == (RESTARTING, True), first.message
        failure = late
        assert isinstance(failure, StdioUnavailable)
        assert (failure.reason, failure.retryable) == (RESTARTING, True), failure.message
        assert (later.reason, later.retryable) == (RESTARTING, True), later.message
        # What the server read: the first call and its cancellation, nothing of the late one.
        server.shutdown(socket.SHUT_WR)
        gateway_end.close()
        lines = [json.loads(line) for line in reader.read().splitlines()]
        assert [line.get("method") for line in lines] == ["notifications/cancelled"]
    finally:
        reader.close()
        server.close()


# Each echo needs an operator's approval; one echo per run.
HELD = {"breaker": {"enabled": False}, "mcp": {"servers": [
    {"name": "files", "command": ["python", "server.py"], "allow": ["echo"],
     "tools": {"echo": {"approval": True, "max_calls": 1}}}]}}


def test_a_call_refused_at_the_handover_is_not_charged_and_its_retry_counts_once() -> None:
    """A POST judged before the restart began reaches the gateway's relay while the worker
    hands the run over (here: held for an approval the operator gives then; its body still
    arriving is the other way). It was counted in the run's MCP budgets and audited as
    approved, then refused with supervisor_restarting before it reached the server: carried
    to the next worker, the count made the agent's retry, the one call the server ever got,
    pay twice (over this budget of one: refused budget_exhausted). It is refused unpaid and
    audited as refused. The official SDK's client and FastMCP stdio server, the real gateway;
    the handover's first step (mcp/gateway.py hand_over) is run on its own so that the
    approval lands between it and the cut that follows it in Gateway.hand_over."""
    inner, gateway_end = socket.socketpair()
    with inner:
        server = subprocess.Popen([sys.executable, "-P", "-u", str(SDK_SERVER)],
                                  stdin=inner.fileno(), stdout=inner.fileno(),
                                  stderr=subprocess.DEVNULL)
    kept = socket.socket(fileno=os.dup(gateway_end.fileno()))  # the daemon's copy
    old = _Side(gateway_end, None, gw.free_port(), HELD)
    sides = [old]
    refused_seen, next_open = threading.Event(), threading.Event()
    carried: list[McpCarried] = []

    def operator_and_restart() -> None:
        old.sink.wait_for(lambda: bool(old.sink.approvals))
        # The restart begins: the worker's MCP handover, not yet its cut.
        old.gateway._submit(mcp_gateway.hand_over(old.gateway.gates[gw.RUN])).result(gw.WAIT)
        old.sink.approvals[0].future.set_result(Decision(True, "a1", by="alice"))
        assert refused_seen.wait(gw.WAIT), "the held call was never answered"
        _usage, wire = asyncio.run(old.gateway.hand_over(gw.RUN))
        assert wire is not None
        carried.append(mcp_carried_from_wire(wire))
        new = _Side(kept, carried[0], old.port, HELD)
        new.sink.decide = lambda approval: Decision(True, "a2", by="alice")
        sides.append(new)
        next_open.set()

    async def agent() -> tuple[Any, Any]:
        proxy = f"http://agent:{gw.TOKEN}@127.0.0.1:{old.port}"
        async with httpx.AsyncClient(proxy=proxy, timeout=httpx.Timeout(gw.WAIT),
                                     trust_env=False) as http, \
                streamable_http_client("http://mcp.gateway/files",
                                       http_client=http) as (read, write, _), \
                ClientSession(read, write) as session:
            await session.initialize()
            with pytest.raises(McpError) as refused:
                await session.call_tool("echo", {"text": "held"})
            refused_seen.set()
            assert await asyncio.to_thread(next_open.wait, gw.WAIT)
            return refused.value.error, await session.call_tool("echo", {"text": "again"})

    operator = threading.Thread(target=operator_and_restart)
    operator.start()
    try:
        error, retried = asyncio.run(asyncio.wait_for(agent(), gw.WAIT * 3))
        operator.join(gw.WAIT)
    finally:
        refused_seen.set()
        for side in sides:
            side.gateway.stop()
        if len(sides) == 1:
            kept.close()
        try:
            server.wait(gw.WAIT)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        gc.collect()
    assert error.data["reason"] == RESTARTING and error.data["retryable"] is True, error
    assert [(d["tool"], d["outcome"], d["reason"]) for d in old.sink.of("mcp")] == [
        ("echo", "held", "approval_required"), ("echo", "denied", RESTARTING)]
    [state] = carried
    assert (state.calls, state.per_server, state.per_tool) == (0, {}, {})
    # The retry went through the next worker: the run's one echo, counted once.
    assert not retried.isError and retried.content[0].text == "echo: again", retried
    assert [(d["outcome"], d["calls"]) for d in sides[1].sink.of("mcp")] == [
        ("held", 0), ("approved", 1)]
