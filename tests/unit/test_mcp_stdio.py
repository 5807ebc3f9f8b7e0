"""The gateway's bridge to stdio MCP servers (supervisor/mcp/stdio.py) on a real egress Gateway:
the official SDK's FastMCP run with transport="stdio" as a local process whose stdin and
stdout are one end of a socketpair (as the supervisor starts it in its sandbox; the sandbox
itself is tests/e2e/test_mcp_stdio.py), and the official SDK client as the agent, through
the gateway as its proxy. Where the SDK server would never misbehave, the test plays the
server on the raw socket. Nothing sleeps for effect and no timing is asserted. No privilege.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError

from supervisor.config import EgressSection
from supervisor.egress.gateway import Gateway
from supervisor.egress.grant import RunGrant
from supervisor.mcp import stdio
from supervisor.models.egress import GatewayPolicy
from tests.unit.test_egress_gateway import (
    RUN,
    T0,
    TOKEN,
    WAIT,
    Clock,
    basic,
    exchange,
    free_port,
    request_bytes,
)
from tests.unit.test_mcp_gateway import McpSink

T = TypeVar("T")
SERVER = Path(__file__).resolve().parents[1] / "support" / "mcp_stdio_server.py"
FILES = {"name": "files", "command": ["python", "mcp_stdio_server.py"],
         "allow": ["echo", "whoami", "slow"],
         "tools": {"echo": {"require": "args.text.size() < 20", "as_tool_error": True}}}


class Env:
    def __init__(self, gateway: Gateway, sink: McpSink) -> None:
        self.gateway, self.sink = gateway, sink
        self.port = 0
        self.procs: list[subprocess.Popen[bytes]] = []

    def open(self, server: socket.socket, **mcp: Any) -> None:
        policy = GatewayPolicy.model_validate({"breaker": {"enabled": False},
                                               "mcp": {"servers": [FILES], **mcp}})
        grant = RunGrant(run_id=RUN, agent="agent-a", token=TOKEN, expires_at=T0 + 3600,
                         policy=policy, host_ip="127.0.0.1", port=free_port(), secrets={})
        asyncio.run(self.gateway.open(grant, {"files": server}))
        self.port = grant.port

    def sdk_server(self) -> socket.socket:
        """The real FastMCP stdio server on one end of a socketpair; the gateway's end."""
        inner, outer = socket.socketpair()
        with inner:
            self.procs.append(subprocess.Popen(
                [sys.executable, "-P", "-u", str(SERVER)], stdin=inner.fileno(),
                stdout=inner.fileno(), stderr=subprocess.DEVNULL))
        return outer

    def client(self, work: Callable[[ClientSession], Awaitable[T]]) -> T:
        async def run() -> T:
            proxy = f"http://agent:{TOKEN}@127.0.0.1:{self.port}"
            async with httpx.AsyncClient(proxy=proxy, timeout=httpx.Timeout(WAIT),
                                         trust_env=False) as http, \
                    streamable_http_client("http://mcp.gateway/files",
                                           http_client=http) as (read, write, _), \
                    ClientSession(read, write) as session:
                await session.initialize()
                return await work(session)

        return asyncio.run(asyncio.wait_for(run(), WAIT * 3))

    def post(self, message: Any, method: str = "POST") -> Any:
        body = json.dumps(message).encode() if message is not None else b""
        return exchange(self.port, request_bytes(
            method, "http://mcp.gateway/files", "mcp.gateway", auth=basic(TOKEN), body=body,
            headers=(("Content-Type", "application/json"),
                     ("Accept", "application/json, text/event-stream"))))


@pytest.fixture()
def env() -> Iterator[Env]:
    gateway = Gateway(EgressSection.model_validate({}), McpSink(), clock=Clock())
    gateway.start()
    state = Env(gateway, gateway.sink)  # type: ignore[arg-type]
    try:
        yield state
    finally:
        gateway.stop()  # closes the bridges: each server reads EOF on stdin and exits
        for proc in state.procs:
            try:
                proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        gc.collect()


def text(result: Any) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


def call(name: str, arguments: dict[str, Any], ident: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": ident, "method": "tools/call",
            "params": {"name": name, "arguments": arguments}}


def test_the_sdk_client_reaches_a_stdio_server_judged_as_any_other(env: Env) -> None:
    env.open(env.sdk_server())

    async def work(session: ClientSession) -> dict[str, Any]:
        out: dict[str, Any] = {"tools": sorted(t.name for t in
                                               (await session.list_tools()).tools)}
        # Concurrent calls on one session: each answer goes back to its own request.
        out["echoes"] = [text(r) for r in await asyncio.gather(
            *(session.call_tool("echo", {"text": f"n{i}"}) for i in range(8)))]
        long = await session.call_tool("echo", {"text": "x" * 50})
        out["long"] = (long.isError, text(long))
        try:
            await session.call_tool("exec_shell", {"command": "id"})
        except McpError as exc:
            out["exec_shell"] = (exc.error.code, exc.error.message)
        return out

    out = env.client(work)
    assert out["tools"] == ["echo", "slow", "whoami"]  # exec_shell exists, hidden
    assert out["echoes"] == [f"echo: n{i}" for i in range(8)]
    assert out["long"][0] and "files.tools.echo.require" in out["long"][1]
    assert out["exec_shell"] == (-32602, "Unknown tool: exec_shell")
    outcomes = [(d["tool"], d["outcome"]) for d in env.sink.of("mcp")]
    assert outcomes.count(("echo", "allowed")) == 8
    assert ("echo", "denied") in outcomes and ("exec_shell", "denied") in outcomes


def test_a_call_cut_by_the_kill_is_cancelled_on_the_server(env: Env) -> None:
    inner, outer = socket.socketpair()
    env.open(outer)
    inner.settimeout(WAIT)
    reader = inner.makefile("rb")
    replies: list[Any] = []

    def agent() -> None:
        try:
            replies.append(env.post(call("slow", {"seconds": 600}, ident=7)))
        except OSError as exc:  # the gateway cut the connection
            replies.append(exc)

    thread = threading.Thread(target=agent)
    thread.start()
    try:
        sent = json.loads(reader.readline())  # the call reached the "server"
        assert sent["method"] == "tools/call" and sent["id"] != 7  # the bridge's own id
        env.gateway.revoke(RUN)  # kill step 2
        cancelled = json.loads(reader.readline())
        thread.join(WAIT)
    finally:
        reader.close()
        inner.close()
    assert cancelled == {"jsonrpc": "2.0", "method": "notifications/cancelled",
                         "params": {"requestId": sent["id"],
                                    "reason": "the agent's request ended"}}
    assert not thread.is_alive()
    assert replies and (isinstance(replies[0], OSError) or replies[0].status != 200)


def test_ids_are_the_bridges_own_and_what_the_server_sends_unasked_is_not_passed_on(
        env: Env) -> None:
    inner, outer = socket.socketpair()
    env.open(outer)
    reader = inner.makefile("rb")
    replies: list[Any] = []
    thread = threading.Thread(target=lambda: replies.append(env.post(
        [call("echo", {"text": "a"}, ident="same"), {"jsonrpc": "2.0", "id": 5,
                                                      "method": "tools/list"}])))
    thread.start()
    try:
        first, second = json.loads(reader.readline()), json.loads(reader.readline())
        assert {first["id"], second["id"]}.isdisjoint({"same", 5})
        # The server: a request of its own (answered by the bridge, never the agent), a
        # notification, an answer nobody asked for, a stray line, then the real answers.
        inner.sendall(b"".join(json.dumps(m).encode() + b"\n" for m in (
            {"jsonrpc": "2.0", "id": 99, "method": "sampling/createMessage", "params": {}},
            {"jsonrpc": "2.0", "method": "notifications/message", "params": {}},
            {"jsonrpc": "2.0", "id": 12345, "result": {}})) + b"not json\n")
        refused = json.loads(reader.readline())
        inner.sendall(b"".join(json.dumps(m).encode() + b"\n" for m in (
            {"jsonrpc": "2.0", "id": second["id"], "result": {"tools": [
                {"name": "echo", "inputSchema": {}}, {"name": "exec_shell",
                                                     "inputSchema": {}}]}},
            {"jsonrpc": "2.0", "id": first["id"], "result": {"content": []}})))
        thread.join(WAIT)
    finally:
        reader.close()
        inner.close()
    assert refused["id"] == 99 and refused["error"]["code"] == -32601
    [reply] = replies
    assert reply.status == 200
    assert reply.json() == [{"jsonrpc": "2.0", "id": "same", "result": {"content": []}},
                            {"jsonrpc": "2.0", "id": 5, "result": {"tools": [
                                {"name": "echo", "inputSchema": {}}]}}]


def test_a_server_that_breaks_its_framing_or_exits_is_refused_closed(env: Env) -> None:
    inner, outer = socket.socketpair()
    env.open(outer, max_message_bytes=1024 * 1024)
    reader = inner.makefile("rb")
    replies: list[Any] = []
    thread = threading.Thread(target=lambda: replies.append(env.post(call("echo", {"text": "a"}))))
    thread.start()
    try:
        reader.readline()
        # One line longer than the bridge reads (4 MiB for this policy): the server is cut.
        with pytest.raises(OSError):
            inner.sendall(b"[" + b" " * (8 * 1024 * 1024))
        thread.join(WAIT)
    finally:
        reader.close()
        inner.close()
    [reply] = replies
    assert reply.status == 502
    assert reply.json()["error"]["data"]["reason"] == "upstream_unreachable"
    after = env.post(call("echo", {"text": "b"}))
    assert after.status == 502 and "is not running" in after.json()["error"]["message"]
    assert env.post(None, method="GET").status == 405  # no stream to open on stdio


def test_calls_waiting_on_one_server_are_bounded(env: Env) -> None:
    inner, outer = socket.socketpair()
    env.open(outer, max_batch=stdio.MAX_PENDING + 1)
    batch = [call("echo", {"text": "a"}, ident=i) for i in range(stdio.MAX_PENDING + 1)]
    try:
        reply = env.post(batch)
        with pytest.raises(BlockingIOError):  # nothing of the batch reached the server
            inner.recv(1, socket.MSG_DONTWAIT)
    finally:
        inner.close()
    assert reply.status == 503
    data = reply.json()["error"]["data"]
    assert (data["reason"], data["retryable"]) == ("server_busy", True)
    # Refused before it was written: none of it charged to the run's budgets (a retry pays
    # once) or audited as allowed; one row says why it was refused.
    rows = [(d["tool"], d["outcome"], d["reason"], d["calls"]) for d in env.sink.of("mcp")]
    assert rows == [("", "denied", "server_busy", 0)], rows


@pytest.mark.parametrize(("mcp", "tools", "rule"), [
    ({"servers": [{**FILES, "tools": {**FILES["tools"], "whoami": {"max_calls": 2}}}]},
     ["whoami", "whoami", "whoami"], "files.tools.whoami.max_calls"),
    ({"max_calls": 2}, ["whoami", "slow", "whoami"], "mcp.max_calls"),
])
def test_a_batch_cannot_pass_a_budget_its_calls_would_pass_one_by_one(
        env: Env, mcp: dict[str, Any], tools: list[str], rule: str) -> None:
    """The attack: with two calls left, one POST of three. Each call was judged against the
    run's counters alone, so all three were allowed, written to the server (the bridge
    sends a batch's messages one a line) and counted past the budget. Now the calls of a
    batch are judged together, and the batch is refused whole: nothing reaches the server,
    nothing is charged."""
    inner, outer = socket.socketpair()
    env.open(outer, **mcp)
    replies: list[Any] = []
    thread = threading.Thread(target=lambda: replies.append(env.post(
        [call(tool, {}, ident=i) for i, tool in enumerate(tools)])))
    thread.start()
    try:
        thread.join(WAIT)  # answered by the gateway, or waiting for the server's answers
        inner.settimeout(0)
        with pytest.raises(BlockingIOError):  # nothing of the batch reached the server
            sent = inner.recv(65536)
            raise AssertionError(f"the batch reached the server: {sent!r}")
    finally:
        inner.close()
        thread.join(WAIT)
    [reply] = replies
    assert reply.status == 200
    reasons = [(a["id"], a["error"]["data"]["reason"], a["error"]["data"]["rule"])
               for a in reply.json()]
    assert reasons == [(0, "batch_refused", rule), (1, "batch_refused", rule),
                       (2, "budget_exhausted", rule)], reasons
    rows = [(d["tool"], d["outcome"]) for d in env.sink.of("mcp")]
    assert rows == [(tool, "denied") for tool in tools], rows
    assert env.gateway.gates[RUN].mcp.counters.calls == 0


def test_the_worker_takes_each_servers_descriptor_by_its_key_and_bounds_the_rest() -> None:
    from supervisor.egress import worker

    daemon_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    subject = worker.Worker.__new__(worker.Worker)  # only its descriptor channel is used
    subject.fds, subject.received = worker_end, {}
    worker_end.setblocking(False)
    pairs = [socket.socketpair() for _ in range(worker._MAX_FDS + 3)]
    try:
        for i, (_, theirs) in enumerate(pairs):
            socket.send_fds(daemon_end, [f"k{i}".encode()], [theirs.fileno()])
        socket.send_fds(daemon_end, [b"two"], [pairs[0][1].fileno(), pairs[1][1].fileno()])
        taken = subject.take_fds({"files": "k1"})
        # Held until claimed, at most _MAX_FDS of them; the rest (and odd messages) closed.
        assert len(subject.received) == worker._MAX_FDS - 1
        with pytest.raises(LookupError, match="'late'"):
            subject.take_fds({"ok": "k2", "late": f"k{worker._MAX_FDS + 1}"})
        assert subject.take_fds({}) == {}
        taken["files"].sendall(b"ping")
        assert pairs[1][0].recv(4) == b"ping"  # the very socket the daemon sent
    finally:
        for sock in taken.values() if "taken" in locals() else ():
            sock.close()
        for fd in subject.received.values():
            os.close(fd)
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
        daemon_end.close()
        worker_end.close()


@pytest.mark.parametrize(("server", "error"), [
    ({"name": "s", "allow": ["*"]}, "either `url`"),
    ({"name": "s", "url": "https://a.example/mcp", "command": ["x"]}, "either `url`"),
    ({"name": "s", "command": ["x"], "secret": "file:k"}, "not `secret`"),
    ({"name": "s", "command": ["x"], "secret_env": {"K": "k"}}, "file:NAME"),
    ({"name": "s", "command": ["x"], "secret_files": {"../k": "file:k"}}, "pattern"),
    ({"name": "s", "command": ["x"], "secret_env": {"1K": "file:k"}}, "pattern"),
    ({"name": "s", "command": ["x"], "binds": ["/opt/../etc"]}, "without . or .."),
    ({"name": "s", "command": ["x"], "binds": ["relative"]}, "pattern"),
    ({"name": "s", "command": []}, "at least 1"),
    ({"name": "s", "command": ["x"], "limits": {"pids": 100_000}}, "less than or equal"),
    ({"name": "s", "url": "https://a.example/mcp", "env": {"A": "b"}}, "for stdio servers"),
])
def test_a_stdio_server_is_declared_whole_or_refused(server: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        GatewayPolicy.model_validate({"mcp": {"servers": [server]}})


def test_a_profile_starts_a_bounded_number_of_stdio_servers() -> None:
    from supervisor.models.mcp import MAX_STDIO_SERVERS

    servers = [{"name": f"s{i}", "command": ["x"]} for i in range(MAX_STDIO_SERVERS)]
    policy = GatewayPolicy.model_validate({"mcp": {"servers": servers}})
    assert [s.name for s in policy.mcp.stdio_servers] == [s["name"] for s in servers]
    assert policy.mcp.stdio_servers[0].limits.memory == 256 * 1024**2
    with pytest.raises(ValueError, match=f"at most {MAX_STDIO_SERVERS} stdio servers"):
        GatewayPolicy.model_validate({"mcp": {"servers": [
            *servers, {"name": "one-more", "command": ["x"]}]}})


def test_each_stdio_server_has_a_host_uid_range_no_run_or_other_server_shares() -> None:
    from supervisor.mcp.sandbox import StdioLauncher
    from supervisor.models.mcp import MAX_STDIO_SERVERS
    from supervisor.sandbox.bundle import SANDBOX_UID_COUNT

    max_runs, base, agent_uid = 4096, 1_000_000, 1000  # the config's largest max_runs
    launcher = StdioLauncher.__new__(StdioLauncher)
    launcher.uid_base, launcher.agent_uid, launcher.max_runs = base, agent_uid, max_runs
    uids = {launcher.host_uid(slot, index) for slot in range(max_runs)
            for index in range(MAX_STDIO_SERVERS)}
    assert len(uids) == max_runs * MAX_STDIO_SERVERS
    runs_end = base + max_runs * SANDBOX_UID_COUNT  # every run's range lies below this
    assert min(uids) >= runs_end and max(uids) < 2**32 - 1
    ranges = sorted(uid - agent_uid for uid in uids)
    assert all(b - a >= SANDBOX_UID_COUNT for a, b in itertools.pairwise(ranges))
