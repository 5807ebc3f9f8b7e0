"""The MCP gateway end to end on loopback: a real egress Gateway (its own thread and loop) in
front of a real MCP server (the official SDK's FastMCP over streamable HTTP and TLS,
tests/support/mcp.py), and the official SDK client as the agent, through the gateway as its
HTTP proxy with the run's session token. Raw HTTP plays the agent where the SDK would never
send what is tested. Nothing sleeps for effect and no timing is asserted. No privilege.

The in-sandbox client, the daemon's audit rows and the kill verb are in
tests/e2e/test_mcp.py; these cover every decision of the policy on the real protocol."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
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
from supervisor.egress.grant import Decision, RunGrant
from supervisor.mcp import gateway as mcp_gateway
from supervisor.models.egress import GatewayPolicy
from tests.support import upstream as support
from tests.support.mcp import MCP_NAME, McpUpstream
from tests.support.mcp import TOKEN as SERVER_TOKEN
from tests.support.upstream import make_ca
from tests.unit.test_egress_gateway import (
    RUN,
    T0,
    TOKEN,
    WAIT,
    Clock,
    FakeSink,
    basic,
    connect_socket,
    exchange,
    free_port,
    request_bytes,
)

T = TypeVar("T")
# The SDK's streamable HTTP server leaves anyio memory streams for the garbage collector
# (the same warning other projects see with it); only that warning is ignored, and collected
# inside each test (`env`) so that it cannot surface in another.
pytestmark = pytest.mark.filterwarnings("ignore:Unclosed <MemoryObject:ResourceWarning")


class McpSink(FakeSink):
    def mcp_decision(self, run_id: str, detail: dict[str, Any]) -> None:
        self._record("mcp", run_id, detail)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> support.TestCA:
    return make_ca(Path(tmp_path_factory.mktemp("mcp-ca")), (MCP_NAME,))


@pytest.fixture(scope="module")
def server(ca: support.TestCA) -> Iterator[McpUpstream]:
    upstream = McpUpstream(ca).start()
    try:
        yield upstream
    finally:
        upstream.stop()


class Env:
    def __init__(self, gateway: Gateway, sink: McpSink, server: McpUpstream) -> None:
        self.gateway, self.sink, self.server = gateway, sink, server
        self.port = 0

    def open(self, **mcp: Any) -> int:
        code: dict[str, Any] = {
            "name": "code", "url": self.server.url, "secret": "file:code-mcp-token",
            "allow": ["read_file", "search", "run_sql", "drop_table", "slow"],
            "tools": {
                "run_sql": {"require": r'args.query.matches(r"(?is)^\s*select\b[^;]*;?\s*$")',
                            "as_tool_error": True, "cost": 0.5},
                "read_file": {"require": 'args.path.startsWith("/workspace/")'},
                "drop_table": {"approval": True},
                "search": {"max_calls": 2},
            }}
        servers = mcp.pop("servers", [code])
        budget = mcp.pop("budget", {})
        policy = GatewayPolicy.model_validate({"breaker": {"enabled": False}, "budget": budget,
                                               "mcp": {"servers": servers, **mcp}})
        grant = RunGrant(run_id=RUN, agent="agent-a", token=TOKEN, expires_at=T0 + 3600,
                         policy=policy, host_ip="127.0.0.1", port=free_port(),
                         secrets={"mcp:code": SERVER_TOKEN})
        asyncio.run(self.gateway.open(grant))
        self.port = grant.port
        return grant.port

    def client(self, work: Callable[[ClientSession], Awaitable[T]], server: str = "code") -> T:
        """The official SDK client, through the gateway as its proxy."""

        async def run() -> T:
            proxy = f"http://agent:{TOKEN}@127.0.0.1:{self.port}"
            async with httpx.AsyncClient(proxy=proxy, timeout=httpx.Timeout(WAIT),
                                         follow_redirects=True, trust_env=False) as http, \
                    streamable_http_client(f"http://mcp.gateway/{server}",
                                           http_client=http) as (read, write, _), \
                    ClientSession(read, write) as session:
                await session.initialize()
                return await work(session)

        return asyncio.run(asyncio.wait_for(run(), WAIT * 2))

    def post(self, body: bytes, *, host: str = "mcp.gateway", path: str = "/code",
             headers: tuple[tuple[str, str], ...] = (), auth: str | None = None) -> Any:
        named = {name.lower() for name, _ in headers}
        defaults = [(k, v) for k, v in (("Content-Type", "application/json"),
                                        ("Accept", "application/json, text/event-stream"))
                    if k.lower() not in named]
        reply = exchange(self.port, request_bytes(
            "POST", f"http://mcp.gateway{path}", host, auth=basic(TOKEN) if auth is None
            else auth, body=body, headers=(*defaults, *headers)))
        return reply

    def decisions(self) -> list[dict[str, Any]]:
        return [d for d in self.sink.of("mcp")]


@pytest.fixture()
def env(ca: support.TestCA, server: McpUpstream) -> Iterator[Env]:
    server.log.calls.clear()
    server.log.authorizations.clear()
    server.log.release.clear()
    server.log.slow_started.clear()
    server.log.slow_cancelled.clear()
    sink = McpSink()
    section = EgressSection.model_validate({"hosts": {MCP_NAME: "127.0.0.1"},
                                            "ca_file": ca.ca_pem})
    gateway = Gateway(section, sink, clock=Clock())
    gateway.start()
    try:
        yield Env(gateway, sink, server)
    finally:
        server.log.release.set()
        gateway.stop()
        gc.collect()


def text(result: Any) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


def test_allowed_call_reaches_the_server_with_its_credential(env: Env) -> None:
    env.open()

    async def work(session: ClientSession) -> tuple[list[str], Any]:
        tools = await session.list_tools()
        result = await session.call_tool("read_file", {"path": "/workspace/README"})
        return sorted(t.name for t in tools.tools), result

    names, result = env.client(work)
    # exec_shell exists on the server but the policy does not allow it: it is not listed.
    assert names == ["drop_table", "read_file", "run_sql", "search", "slow"]
    assert not result.isError and text(result) == "contents of /workspace/README"
    assert env.server.log.calls == [("read_file", {"path": "/workspace/README"})]
    # The server's credential was added by the gateway on every request the agent made.
    assert env.server.log.authorizations
    assert set(env.server.log.authorizations) == {f"Bearer {SERVER_TOKEN}"}
    allowed = [d for d in env.decisions() if d["outcome"] == "allowed"]
    assert [(d["server"], d["tool"], d["rule"]) for d in allowed] == [
        ("code", "read_file", "code.tools.read_file")]
    digest = allowed[0]["args_sha256"]
    assert len(digest) == 64 and "/workspace/README" not in json.dumps(allowed[0])


def test_denied_tool_is_an_unknown_tool_and_never_sent(env: Env) -> None:
    env.open()

    async def work(session: ClientSession) -> Any:
        with pytest.raises(McpError) as refused:
            await session.call_tool("exec_shell", {"command": "id"})
        return refused.value.error

    error = env.client(work)
    assert error.code == -32602 and error.message == "Unknown tool: exec_shell"
    assert env.server.log.calls == []
    denied = [d for d in env.decisions() if d["outcome"] == "denied"]
    assert [(d["tool"], d["reason"]) for d in denied] == [("exec_shell", "tool_denied")]


def test_argument_denied_as_tool_error_and_as_jsonrpc_error(env: Env) -> None:
    env.open()

    async def work(session: ClientSession) -> tuple[Any, Any, Any]:
        as_result = await session.call_tool("run_sql", {"query": "DELETE FROM users"})
        with pytest.raises(McpError) as refused:
            await session.call_tool("read_file", {"path": "/etc/shadow"})
        good = await session.call_tool("run_sql", {"query": "SELECT 1"})
        return as_result, refused.value.error, good

    as_result, error, good = env.client(work)
    assert as_result.isError and "code.tools.run_sql.require" in text(as_result)
    assert error.code == -32001
    assert error.data["reason"] == "argument_denied"
    assert error.data["rule"] == "code.tools.read_file.require"
    assert error.data["retryable"] is False
    audit_ids = {d["audit_id"] for d in env.decisions()}
    assert error.data["audit_id"] in audit_ids
    assert not good.isError
    assert env.server.log.calls == [("run_sql", {"query": "SELECT 1"})]


def test_held_call_waits_for_the_operator(env: Env) -> None:
    env.open()
    answers = iter([Decision(True, "a1", by="alice"), Decision(False, "a2", by="system:gateway",
                                                              reason="no answer within 300s")])
    results: list[Any] = []

    async def work(session: ClientSession) -> None:
        results.append(await session.call_tool("drop_table", {"table": "t1"}))
        with pytest.raises(McpError) as refused:
            await session.call_tool("drop_table", {"table": "t2"})
        results.append(refused.value.error)

    def operator() -> None:
        for expected in ("t1", "t2"):
            env.sink.wait_for(lambda: any(not a.future.done() for a in env.sink.approvals))
            held = next(a for a in env.sink.approvals if not a.future.done())
            assert held.method == "MCP" and held.host == "mcp.gateway/code"
            assert f'"table": "{expected}"' in held.path
            # Nothing reached the server while the call was held.
            assert ("drop_table", {"table": expected}) not in env.server.log.calls
            held.future.set_result(next(answers))

    thread = threading.Thread(target=operator)
    thread.start()
    env.client(work)
    thread.join(WAIT)
    assert text(results[0]) == "dropped t1"
    assert results[1].data["reason"] == "approval_denied"  # a timeout is a denial
    assert env.server.log.calls == [("drop_table", {"table": "t1"})]
    outcomes = [(d["tool"], d["outcome"]) for d in env.decisions()]
    assert outcomes == [("drop_table", "held"), ("drop_table", "approved"),
                        ("drop_table", "held"), ("drop_table", "denied")]


def test_budget_exhausted(env: Env) -> None:
    env.open(max_cost=0.75)

    async def work(session: ClientSession) -> tuple[Any, Any]:
        await session.call_tool("search", {"query": "a"})
        await session.call_tool("search", {"query": "b"})
        with pytest.raises(McpError) as per_tool:
            await session.call_tool("search", {"query": "c"})
        await session.call_tool("run_sql", {"query": "SELECT 1"})  # cost 0.5
        over = await session.call_tool("run_sql", {"query": "SELECT 2"})  # as tool error
        return per_tool.value.error, over

    error, over = env.client(work)
    assert (error.data["reason"], error.data["rule"]) == ("budget_exhausted",
                                                          "code.tools.search.max_calls")
    assert over.isError and "mcp.max_cost" in text(over)
    assert [c[0] for c in env.server.log.calls] == ["search", "search", "run_sql"]
    usage = env.gateway.usage(RUN)
    assert usage is not None and usage.spend == 0.5


def test_kill_mid_call_cuts_the_stream(env: Env) -> None:
    env.open()
    outcome: list[BaseException | Any] = []

    async def work(session: ClientSession) -> None:
        try:
            outcome.append(await session.call_tool("slow", {"seconds": WAIT * 3}))
        except BaseException as exc:  # whatever the SDK raises when its stream is cut
            outcome.append(exc)

    def kill() -> None:
        assert env.server.log.slow_started.wait(WAIT)
        env.gateway.revoke(RUN)  # kill step 2

    thread = threading.Thread(target=kill)
    thread.start()
    with pytest.raises(BaseException):  # noqa: B017 - the session itself is cut
        env.client(work)
    thread.join(WAIT)
    assert not env.server.log.release.is_set()  # the call was cut, not finished
    assert not any(getattr(o, "content", None) for o in outcome)
    # ... and cut on the server too: the gateway told it the request was cancelled (cutting
    # the agent's stream alone left the tool running there).
    assert env.server.log.slow_cancelled.wait(WAIT)
    # Nothing more gets through: the token is revoked.
    reply = env.post(b'{"jsonrpc":"2.0","id":1,"method":"ping"}')
    assert (reply.status, reply.code) == (403, "token_revoked")


def test_an_agent_that_hangs_up_mid_call_cancels_the_call_on_the_server(env: Env) -> None:
    env.open()
    start = env.post(json.dumps({
        "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"}}}).encode())
    session = (("Mcp-Session-Id", start.headers["mcp-session-id"]),
               ("Mcp-Protocol-Version", "2025-06-18"))
    assert env.post(b'{"jsonrpc":"2.0","method":"notifications/initialized"}',
                    headers=session).status == 202
    call = request_bytes("POST", "http://mcp.gateway/code", "mcp.gateway", auth=basic(TOKEN),
                         headers=(("Content-Type", "application/json"),
                                  ("Accept", "application/json, text/event-stream"), *session),
                         body=json.dumps({"jsonrpc": "2.0", "id": "call-7",
                                          "method": "tools/call", "params": {
                                              "name": "slow",
                                              "arguments": {"seconds": WAIT * 3}}}).encode())
    with connect_socket(env.port) as sock:
        sock.sendall(call)
        assert env.server.log.slow_started.wait(WAIT)
    assert env.server.log.slow_cancelled.wait(WAIT)
    assert not env.server.log.release.is_set()
    assert [(d["tool"], d["outcome"]) for d in env.decisions()] == [("slow", "allowed")]


def test_pause_holds_new_calls_until_resume(env: Env) -> None:
    env.open()
    env.gateway.suspend(RUN)
    replies: list[Any] = []
    thread = threading.Thread(target=lambda: replies.append(env.post(
        b'{"jsonrpc":"2.0","id":1,"method":"ping"}')))
    thread.start()
    thread.join(0.3)
    assert thread.is_alive() and not replies  # held, not refused
    env.gateway.resume(RUN)
    thread.join(WAIT)
    # It reached the server (which wants a session first): passed on, not refused.
    assert replies and b"Missing session ID" in replies[0].body


def test_a_call_held_by_a_pause_past_the_approval_timeout_is_refused_retryable(
        env: Env) -> None:
    """Held at most approval_timeout; then refused, and the refusal says a retry can work
    (the agent may be resumed). Revoked is final: not retryable."""
    env.open()
    grant = env.gateway.gates[RUN].grant
    env.gateway.gates[RUN].grant = dataclasses.replace(
        grant, policy=grant.policy.model_copy(update={"approval_timeout": 0.2}))
    env.gateway.suspend(RUN)
    reply = env.post(b'{"jsonrpc":"2.0","id":1,"method":"ping"}')
    error = reply.json()["error"]
    assert (reply.status, error["data"]["reason"], error["data"]["retryable"]) == (
        403, "token_suspended", True)
    env.gateway.revoke(RUN)
    reply = env.post(b'{"jsonrpc":"2.0","id":2,"method":"ping"}')
    assert (reply.status, reply.code) == (403, "token_revoked")


def call(ident: int, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": ident, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments}}


def test_calls_that_wait_out_a_pause_are_judged_by_the_budget_again(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget of one request, two calls that come while the agent is paused: both were
    judged within it when they came (nothing was spent), both wait; when the agent resumes
    each is judged again as it is charged, and exactly one goes through. The other is
    refused as any request over budget is (429 budget_exceeded, the tripwire once)."""
    env.open(budget={"run": {"requests": 1}})
    waiting = threading.Semaphore(0)
    wait = mcp_gateway._wait_while_suspended

    async def counted(gateway: Gateway, gate: Any) -> None:
        waiting.release()
        await wait(gateway, gate)

    monkeypatch.setattr(mcp_gateway, "_wait_while_suspended", counted)
    env.gateway.suspend(RUN)
    replies: list[Any] = []
    threads = [threading.Thread(target=lambda i=i: replies.append(env.post(json.dumps(
        call(i, "read_file", {"path": "/workspace/a"})).encode()))) for i in range(2)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert waiting.acquire(timeout=WAIT)  # both judged on arrival, both waiting
    env.gateway.resume(RUN)
    for thread in threads:
        thread.join(WAIT)
    refused = [r for r in replies if r.status == 429]
    assert len(replies) == 2 and len(refused) == 1
    assert refused[0].code == "budget_exceeded"
    assert [(d["tool"], d["outcome"]) for d in env.decisions()] == [("read_file", "allowed")]
    [fired] = env.sink.of("budget_exceeded")
    assert (fired["budget"], fired["metric"]) == ("run", "requests")
    assert "budget_exceeded" in env.sink.denials()
    usage = env.gateway.usage(RUN)
    assert usage is not None and usage.requests == 1


def test_calls_that_waited_in_a_batch_are_judged_by_the_budget_again(env: Env) -> None:
    """A batch of a held call and an allowed one: while the held one waits for an operator,
    another call spends the run's last call; when it is approved the whole batch is judged
    again, each call with the batch's calls before it counted, and refused whole. A batch
    can no more go past a budget by itself: two calls where one is left are refused."""
    env.open(max_calls=2)
    batch = json.dumps([call(1, "drop_table", {"table": "t1"}),
                        call(2, "read_file", {"path": "/workspace/a"})]).encode()
    replies: list[Any] = []
    thread = threading.Thread(target=lambda: replies.append(env.post(batch)))
    thread.start()
    env.sink.wait_for(lambda: len(env.sink.approvals) == 1)
    env.post(json.dumps(call(3, "read_file", {"path": "/workspace/b"})).encode())
    env.sink.approvals[0].future.set_result(Decision(True, "a1", by="alice"))
    thread.join(WAIT)
    [first, second] = replies[0].json()
    assert first["error"]["data"]["reason"] == "batch_refused"
    assert (second["error"]["data"]["reason"], second["error"]["data"]["rule"]) == (
        "budget_exhausted", "mcp.max_calls")
    # One call is left: a batch of two is refused whole, the next single call goes.
    reply = env.post(json.dumps([call(4, "read_file", {"path": "/workspace/c"}),
                                 call(5, "read_file", {"path": "/workspace/d"})]).encode())
    assert {m["error"]["data"]["reason"] for m in reply.json()} == {"budget_exhausted",
                                                                    "batch_refused"}
    env.post(json.dumps(call(6, "read_file", {"path": "/workspace/e"})).encode())
    allowed = [d["tool"] for d in env.decisions() if d["outcome"] in ("allowed", "approved")]
    assert allowed == ["read_file", "read_file"]
    run = env.gateway.gates[RUN].mcp
    assert run is not None and run.counters.calls == 2


def test_fail_closed_on_what_cannot_be_judged(env: Env) -> None:
    env.open(max_message_bytes=2048)
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "read_file", "arguments": {"path": "/workspace/a"}}}
    cases: list[tuple[bytes, dict[str, Any], int, str]] = [
        (b"{not json", {}, 400, "unparseable"),
        (json.dumps({**call, "params": {"name": "read_file",
                                        "arguments": {"p": "x" * 4000}}}).encode(), {},
         413, "message_too_large"),
        (json.dumps({"jsonrpc": "2.0", "id": 2, "method": "resources/read"}).encode(), {},
         200, "method_not_allowed"),
        (json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/cal"}).encode(), {},
         200, "method_not_allowed"),
        (json.dumps(call).encode(), {"host": "evil.example"}, 403, "host_refused"),
        (json.dumps(call).encode(), {"headers": (("Origin", "http://evil.example"),)},
         403, "origin_refused"),
        (json.dumps(call).encode(), {"path": "/other"}, 404, "server_unknown"),
        (json.dumps(call).encode(), {"headers": (("Content-Type", "text/plain"),)},
         415, "content_type_refused"),
    ]
    for body, how, status, reason in cases:
        reply = env.post(body, **how)
        assert reply.status == status, (reason, reply.body)
        error = reply.json()["error"]
        assert error["data"]["reason"] == reason
        assert error["code"] < 0 and error["data"]["audit_id"].startswith("mcp-")
    assert env.server.log.calls == []
    # Without the run's token nothing is judged at all.
    reply = env.post(json.dumps(call).encode(), auth="Basic eDp5")
    assert reply.status == 407


def test_a_batch_with_one_denied_call_is_refused_whole(env: Env) -> None:
    env.open()
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
         "params": {"name": "read_file", "arguments": {"path": "/workspace/a"}}},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
         "params": {"name": "run_sql", "arguments": {"query": "DROP TABLE t"}}},
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}},
    ]
    reply = env.post(json.dumps(batch).encode())
    assert reply.status == 200
    answers = {a["id"]: a for a in reply.json()}
    assert set(answers) == {1, 2}
    assert answers[1]["error"]["data"]["reason"] == "batch_refused"
    assert answers[2]["result"]["isError"] is True
    assert env.server.log.calls == []


def test_json_replies_are_filtered_too(ca: support.TestCA) -> None:
    upstream = McpUpstream(ca, token=None, json_response=True).start()
    sink = McpSink()
    gateway = Gateway(EgressSection.model_validate({"hosts": {MCP_NAME: "127.0.0.1"},
                                                     "ca_file": ca.ca_pem}), sink, clock=Clock())
    gateway.start()
    try:
        env = Env(gateway, sink, upstream)
        env.open(servers=[{"name": "plain", "url": upstream.url, "allow": ["*"],
                           "deny": ["exec_*", "drop_*"]}])

        async def work(session: ClientSession) -> list[str]:
            return sorted(t.name for t in (await session.list_tools()).tools)

        assert env.client(work, server="plain") == ["read_file", "run_sql", "search", "slow"]
        assert set(upstream.log.authorizations) == {""}  # no secret: none added
    finally:
        gateway.stop()
        upstream.stop()
        gc.collect()
