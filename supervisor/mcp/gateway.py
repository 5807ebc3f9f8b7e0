"""The MCP side of the egress gateway: an agent's MCP client reaches `http://mcp.gateway/<server>`
through the gateway with its run's session token, and every JSON-RPC message it sends is read,
judged against the run's MCP policy (supervisor.mcp.policy) and only then sent to the server,
with the server's credential added here. Runs in the gateway's thread and loop (the gateway
worker process, unprivileged); every decision goes to the daemon through the gateway's sink.

The streamable HTTP transport: POST carries JSON-RPC messages and is answered with JSON or an
event stream; GET opens the server's stream; DELETE ends a session (`Mcp-Session-Id`). Replies
pass back through a filter that removes denied tools from `tools/list` results, in JSON and in
event streams alike. A body that cannot be judged (not JSON-RPC, too large, an unknown method,
a rule that fails) is refused and never reaches the server; a batch with one denied call is
refused whole. A request naming another Host than the gateway's MCP name, or an Origin other
than its own, is refused (DNS rebinding). Kill revokes the run's token: the gateway cuts every
connection of the run, which ends its MCP streams and, with them, the upstream requests.

A restart (supervisor/daemon/handover.py) moves a run's MCP state to the next daemon's worker:
`hand_over` answers every call still in flight to a stdio server with a JSON-RPC error
(`supervisor_restarting`, retryable; the call stays counted: it reached the server) and lets
go of the bridges; a call that gets to the server's bridge or to its relay only during the
handover is refused the same way before it is counted or audited as allowed (`_Charge`);
`carry` is what goes on (the call counters its budgets judge by, the remote sessions to end
when the run ends, each stdio bridge's next request id), and `open_stdio` takes it up in the
next worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from yarl import URL

from supervisor.egress.grant import McpCarried, mcp_carried_to_wire
from supervisor.httpclient import read_capped
from supervisor.mcp import messages
from supervisor.mcp.messages import Message, MessageRefused
from supervisor.mcp.policy import Counters, Verdict, judge_call, judge_method, visible_tools
from supervisor.mcp.stdio import RESTARTING, StdioBridge, StdioUnavailable
from supervisor.models.mcp import McpPolicy, McpServer

if TYPE_CHECKING:
    from supervisor.egress.gateway import Gateway, _Gate

MCP_HOST = "mcp.gateway"
ORIGINS = frozenset((f"http://{MCP_HOST}", f"https://{MCP_HOST}"))
_PASSED_HEADERS = ("Accept", "Content-Type", "Mcp-Session-Id", "Mcp-Protocol-Version",
                   "Last-Event-ID")
_RETURNED_HEADERS = ("Content-Type", "Mcp-Session-Id", "Cache-Control")
_MAX_REPLY = 16 * 1024 * 1024  # a JSON reply is read whole (to filter it), up to this
_MAX_EVENT = 4 * 1024 * 1024  # one server-sent event, while it is being assembled
_SUSPEND_POLL = 0.05
_MAX_SESSIONS = 64  # per run; past it the oldest is forgotten (its DELETE is not sent)
_MAX_CANCELLING = 64  # per run: cancellations being sent to servers at once; past it, none
_CANCEL_TIMEOUT = 2.0  # seconds for each one (best effort; the run's DELETEs follow on close)
_RESTARTING_NOW = "the supervisor is restarting; call again in a moment"


@dataclass
class McpRun:
    """One run's MCP state in the gateway: its call counters and the sessions it opened."""

    counters: Counters = field(default_factory=Counters)
    sessions: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (server, url)
    decisions: int = 0
    # The run's stdio servers (supervisor/mcp/stdio.py), by name; opened with the run.
    bridges: dict[str, StdioBridge] = field(default_factory=dict)
    # `notifications/cancelled` on their way to remote servers (see _cancel_upstream).
    cancelling: set[asyncio.Task[None]] = field(default_factory=set)
    # POSTs to stdio servers not yet answered (a handover waits for their answers to go out).
    relaying: int = 0
    relayed: asyncio.Event = field(default_factory=asyncio.Event)
    handing_over: bool = False
    sessions_kept: bool = False  # handed over: the next worker ends the remote sessions


def secret_key(server: str) -> str:
    """Where an MCP server's secret sits in a RunGrant's `secrets` (beside the routes')."""
    return f"mcp:{server}"


def is_mcp(request: web.BaseRequest) -> bool:
    return (request.url.host or "").lower().rstrip(".") == MCP_HOST


class _Refusal(Exception):
    """An HTTP-level refusal (before any message is judged)."""

    def __init__(self, status: int, reason: str, message: str,
                 code: int = messages.REFUSED, retryable: bool = False) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.code = status, reason, message, code
        self.retryable = retryable


async def handle(gateway: Gateway, gate: _Gate, request: web.BaseRequest) -> web.StreamResponse:
    """One agent request to `mcp.gateway`. The token was checked by the caller."""
    policy = gate.grant.policy.mcp
    if gate.mcp is None:
        gate.mcp = McpRun()
    server_name = ""
    try:
        server = _server(policy, request)
        server_name = server.name
        if gate.mcp.handing_over:
            raise _Refusal(503, RESTARTING, _RESTARTING_NOW, retryable=True)
        await _wait_while_suspended(gateway, gate)
        if gate.state != "active":
            raise _Refusal(403, f"token_{gate.state}", "the run's session token does not work "
                           "now (the agent is paused, stopped or killed)",
                           retryable=gate.state == "suspended")  # it may be resumed
        if request.method == "POST":
            return await _post(gateway, gate, policy, server, request)
        if request.method in ("GET", "DELETE") and server.stdio:
            # A stdio server has one session, the run's, and nothing the gateway passes on
            # outside a POST's answers: no stream to open, no session to end (the spec's 405).
            return web.Response(status=405, headers={"Allow": "POST"})
        if request.method in ("GET", "DELETE"):
            _count_request(gateway, gate)
            return await _relay(gateway, gate, server, request, b"", set(), [])
        raise _Refusal(405, "method_not_allowed", "the MCP endpoint takes POST, GET and DELETE")
    except _Refusal as refusal:
        audit_id = _decide(gateway, gate, server_name, "", {}, "denied", refusal.reason,
                           "mcp.transport", refusal.message)
        body = messages.error(None, refusal.code, refusal.message,
                              {"reason": refusal.reason, "rule": "mcp.transport",
                               "audit_id": audit_id, "retryable": refusal.retryable})
        response = web.json_response(body, status=refusal.status)
        response.force_close()
        return response


def _server(policy: McpPolicy, request: web.BaseRequest) -> McpServer:
    host = request.headers.get("Host", "").lower().rstrip(".")
    if host.removesuffix(":80").rstrip(".") != MCP_HOST:
        raise _Refusal(403, "host_refused", f"the Host header must be {MCP_HOST} (a request "
                       "for another name is refused: DNS rebinding)")
    origin = request.headers.get("Origin")
    if origin is not None and origin.lower().rstrip("/") not in ORIGINS:
        raise _Refusal(403, "origin_refused", f"the Origin {origin[:100]!r} is not the "
                       "gateway's")
    name = request.url.path.strip("/")
    server = policy.server(name)
    if server is None:
        raise _Refusal(404, "server_unknown", f"this agent has no MCP server {name[:64]!r}")
    return server


async def _post(gateway: Gateway, gate: _Gate, policy: McpPolicy, server: McpServer,
                request: web.BaseRequest) -> web.StreamResponse:
    content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise _Refusal(415, "content_type_refused", "MCP messages are POSTed as "
                       "application/json", code=messages.INVALID_REQUEST)
    limit = policy.max_message_bytes
    if (request.content_length or 0) > limit:
        raise _Refusal(413, "message_too_large", f"a message is limited to {limit} bytes",
                       code=messages.INVALID_REQUEST)
    body = await read_capped(request.content, limit)
    if len(body) > limit:
        raise _Refusal(413, "message_too_large", f"a message is limited to {limit} bytes",
                       code=messages.INVALID_REQUEST)
    try:
        batch, is_batch = messages.parse(body, policy.max_batch)
    except MessageRefused as refused:
        raise _Refusal(400, refused.reason, refused.message, code=refused.code) from None
    _count_request(gateway, gate)
    assert gate.mcp is not None
    verdicts = [_judge(policy, server, gate.mcp.counters, message) for message in batch]
    if any(v.outcome in ("deny", "unknown_tool") for v in verdicts):
        return _refuse_batch(gateway, gate, server, batch, verdicts, is_batch)
    for message, verdict in zip(batch, verdicts, strict=True):
        if verdict.outcome == "hold":
            approved = await _hold(gateway, gate, server, message, verdict)
            if approved is not None:
                return _refuse_batch(gateway, gate, server, batch,
                                     [approved if m is message else
                                      Verdict("deny", "batch_refused", approved.rule,
                                              "another call in this batch was refused")
                                      for m in batch], is_batch)
    await _wait_while_suspended(gateway, gate)
    if gate.state != "active":
        raise _Refusal(403, f"token_{gate.state}", "the run's session token stopped working "
                       "while the call was held", retryable=gate.state == "suspended")
    # Judged again, every call of the batch, after the last await (the body, a hold, a
    # pause): budgets may have been spent by calls that went meanwhile, and each call is
    # judged with the calls before it in the batch counted, so that together they stay
    # within the budgets too. The egress budgets likewise.
    gateway.check_budget(gate, counted=True)
    counters = gate.mcp.counters.copy()
    for message in batch:
        tool = message.tool
        if tool is None:
            continue
        again = judge_call(policy, server, tool, message.arguments, counters)
        if again.outcome not in ("allow", "hold"):
            return _refuse_batch(gateway, gate, server, batch,
                                 [again if m is message else Verdict(
                                     "deny", "batch_refused", again.rule,
                                     "another call in this batch was refused")
                                  for m in batch], is_batch)
        counters.count(server.name, tool, again.cost, tool in server.tools)
    # Nothing was awaited since the budgets were last judged: the calls are charged (counted,
    # audited as allowed) as they go to the server, and not at all if they never do.
    charge = _Charge(gateway, gate, server, batch, verdicts)
    if gate.mcp.handing_over:
        # Judged before a restart began (its body still arriving, or held for an approval):
        # refused as a call that comes now is, and not charged, so the agent's retry through
        # the next worker is the one that counts.
        charge.refused(_RESTARTING_NOW)
        return await _restarting(request, batch, is_batch, _RESTARTING_NOW)
    lists = {m.id for m in batch if m.method == "tools/list" and m.id is not None}
    if server.stdio:
        return await _relay_stdio(gate, server, request, batch, is_batch, lists, charge)
    charge()
    return await _relay(gateway, gate, server, request, body, lists,
                        [m.id for m in batch if m.is_request])


class _Charge:
    """The tool calls of one judged POST, counted in the run's MCP budgets and audited as
    allowed (or approved) once, when they go to the server. A POST refused before that
    (restarting, a busy or stopped stdio server) is neither: a client that retries it would
    pay twice, and a row would say allowed of a call no server got."""

    def __init__(self, gateway: Gateway, gate: _Gate, server: McpServer,
                 batch: list[Message], verdicts: list[Verdict]) -> None:
        self.gateway, self.gate, self.server = gateway, gate, server
        self.batch, self.verdicts = batch, verdicts
        self.done = False

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        run = self.gate.mcp
        assert run is not None
        for message, verdict in zip(self.batch, self.verdicts, strict=True):
            tool = message.tool
            if tool is None:
                continue
            run.counters.count(self.server.name, tool, verdict.cost, tool in self.server.tools)
            self.gate.usage.spend += verdict.cost
            _decide(self.gateway, self.gate, self.server.name, tool, message.arguments,
                    "approved" if verdict.outcome == "hold" else "allowed", "", verdict.rule,
                    "")

    def refused(self, message: str) -> None:
        """Each tool call audited as refused by the restart (`supervisor_restarting`),
        nothing counted: none reached the server."""
        for call in self.batch:
            if call.tool is not None:
                _decide(self.gateway, self.gate, self.server.name, call.tool, call.arguments,
                        "denied", RESTARTING, "mcp.restart", message)


async def _relay_stdio(gate: _Gate, server: McpServer, request: web.BaseRequest,
                       batch: list[Message], is_batch: bool, lists: set[Any], charge: _Charge
                       ) -> web.StreamResponse:
    """The judged messages to the run's stdio server; its answers as one JSON reply (202
    when the POST held no request), denied tools taken out of tools/list results. `charge`
    is called by the bridge as it writes them, not if it refuses them."""
    run = gate.mcp
    assert run is not None
    bridge = run.bridges.get(server.name)
    if bridge is None:
        raise _Refusal(502, "upstream_unreachable", f"MCP server {server.name} was not "
                       "started for this run")
    run.relaying += 1
    run.relayed.clear()
    try:
        try:
            answers = await bridge.exchange([m.raw for m in batch], charge)
        except StdioUnavailable as exc:
            if exc.reason == RESTARTING:
                if not charge.done:  # refused before it was written: never charged
                    charge.refused(exc.message)
                return await _restarting(request, batch, is_batch, exc.message)
            raise _Refusal(503 if exc.retryable else 502, exc.reason, exc.message,
                           retryable=exc.retryable) from None
    finally:
        run.relaying -= 1
        if not run.relaying:
            run.relayed.set()
    gate.usage.bytes += sum(len(json.dumps(a)) for a in answers)
    if not answers:
        return web.Response(status=202)
    for answer in answers:
        _filter_message(server, answer, lists)
    return web.json_response(answers if is_batch else answers[0],
                             dumps=lambda data: json.dumps(data, separators=(",", ":")))


async def _restarting(request: web.BaseRequest, batch: list[Message], is_batch: bool,
                      message: str) -> web.StreamResponse:
    """Each request of a POST cut by a restart answered with a JSON-RPC error (HTTP 200, so
    a client reads it as the call's error, not as its transport failing), written before the
    handler returns: the handover closes the connection right after."""
    replies = [messages.error(m.id, messages.REFUSED, message,
                              {"reason": RESTARTING, "rule": "mcp.restart", "retryable": True})
               for m in batch if m.is_request]
    response = web.json_response(replies if is_batch else replies[0]) if replies \
        else web.Response(status=202)
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    return response


def _judge(policy: McpPolicy, server: McpServer, counters: Counters,
           message: Message) -> Verdict:
    verdict = judge_method(policy, message)
    if verdict.outcome != "allow" or message.tool is None:
        return verdict
    return judge_call(policy, server, message.tool, message.arguments, counters)


def _refuse_batch(gateway: Gateway, gate: _Gate, server: McpServer, batch: list[Message],
                  verdicts: list[Verdict], is_batch: bool) -> web.StreamResponse:
    """Every request of the batch answered with a refusal; nothing is sent to the server."""
    replies = []
    first = next(v for v in verdicts if v.outcome in ("deny", "unknown_tool"))
    for message, verdict in zip(batch, verdicts, strict=True):
        if verdict.outcome not in ("deny", "unknown_tool"):
            verdict = Verdict("deny", "batch_refused", first.rule,
                              "another message in this batch was refused",
                              as_tool_error=verdict.as_tool_error)
        gate.usage.denied += 1
        audit_id = _decide(gateway, gate, server.name, message.tool or "",
                           message.arguments, "denied", verdict.reason, verdict.rule,
                           verdict.message, method=message.method)
        if not message.is_request:
            continue
        if verdict.outcome == "unknown_tool":
            replies.append(messages.unknown_tool(message.id, message.tool or ""))
        elif verdict.as_tool_error and message.tool is not None:
            replies.append(messages.tool_error(
                message.id, f"Refused by the supervisor's policy ({verdict.rule}): "
                f"{verdict.message}. audit_id={audit_id}"))
        else:
            replies.append(messages.error(message.id, messages.REFUSED,
                                          f"refused: {verdict.message}",
                                          {"reason": verdict.reason, "rule": verdict.rule,
                                           "audit_id": audit_id,
                                           "retryable": verdict.retryable}))
    if not replies:
        return web.Response(status=202)
    return web.json_response(replies if is_batch else replies[0])


async def _hold(gateway: Gateway, gate: _Gate, server: McpServer, message: Message,
                verdict: Verdict) -> Verdict | None:
    """Wait for an operator; None when approved, else the refusal."""
    grant_policy = gate.grant.policy
    tool = message.tool or ""
    if gate.held >= grant_policy.max_pending_approvals:
        return Verdict("deny", "approvals_pending", verdict.rule, "this run has as many calls "
                       "waiting for an operator as it may", retryable=True,
                       as_tool_error=verdict.as_tool_error)
    if gate.asked >= grant_policy.max_approval_requests:
        return Verdict("deny", "approval_limit", verdict.rule, "this run has asked for as many "
                       "approvals as it may", as_tool_error=verdict.as_tool_error)
    _decide(gateway, gate, server.name, tool, message.arguments, "held", verdict.reason,
            verdict.rule, verdict.message)
    shown = json.dumps(message.arguments, sort_keys=True, ensure_ascii=False)
    gate.held += 1
    gate.asked += 1
    try:
        future = gateway.sink.request_approval(
            gate.grant.run_id, "MCP", f"{MCP_HOST}/{server.name}",
            f"tools/call {tool[:128]} {shown[:700]}", verdict.rule)
        try:
            decision = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # the agent hung up, or the run was cut: the approval is withdrawn
            raise
    finally:
        gate.held -= 1
    if not decision.approved:
        return Verdict("deny", "approval_denied", verdict.rule,
                       f"an operator's approval was required and was not given: "
                       f"{decision.reason or 'denied'}", as_tool_error=verdict.as_tool_error)
    return None


async def _wait_while_suspended(gateway: Gateway, gate: _Gate) -> None:
    """Pause holds new calls: a call that arrives while the agent is paused waits for resume
    (or the end of the run), bounded by the approval timeout."""
    deadline = time.monotonic() + gate.grant.policy.approval_timeout
    while gate.state == "suspended" and time.monotonic() < deadline:
        await asyncio.sleep(_SUSPEND_POLL)


def _count_request(gateway: Gateway, gate: _Gate) -> None:
    """The request takes its place in the egress `requests` budget, judged by it at once
    (no await between): it was judged on arrival, but it may have waited out a pause since,
    while other requests went."""
    gateway.check_budget(gate)
    gate.usage.requests += 1


def _decide(gateway: Gateway, gate: _Gate, server: str, tool: str, arguments: dict[str, Any],
            outcome: str, reason: str, rule: str, message: str,
            method: str | None = "tools/call") -> str:
    """Report one decision to the daemon (an audit row, an event, metrics); its audit id."""
    audit_id = f"mcp-{secrets.token_hex(8)}"
    assert gate.mcp is not None
    gate.mcp.decisions += 1
    gateway.sink.mcp_decision(gate.grant.run_id, {
        "audit_id": audit_id, "agent": gate.grant.agent, "server": server,
        "method": (method or "")[:64], "tool": tool[:128], "outcome": outcome,
        "reason": reason, "rule": rule[:200], "message": message[:300],
        "args_sha256": messages.canonical_digest(arguments) if tool else None,
        "calls": gate.mcp.counters.calls, "cost": round(gate.mcp.counters.cost, 9)})
    return audit_id


async def _relay(gateway: Gateway, gate: _Gate, server: McpServer, request: web.BaseRequest,
                 body: bytes, lists: set[Any], requests: list[Any]) -> web.StreamResponse:
    """The judged body to the remote server, its answer back. When the exchange ends before
    the server has answered (the agent hung up, or a kill or pause cut its connection), the
    server is told the body's requests are cancelled, as the stdio bridge tells its server:
    cutting the agent's stream alone would leave the call running there."""
    answered = False
    try:
        response, answered = await _exchange(gateway, gate, server, request, body, lists)
        return response
    finally:
        if not answered and requests:
            _cancel_upstream(gateway, gate, server, request, requests)


async def _exchange(gateway: Gateway, gate: _Gate, server: McpServer,
                    request: web.BaseRequest, body: bytes, lists: set[Any]
                    ) -> tuple[web.StreamResponse, bool]:
    """_relay's work; the response and whether the server's answer reached its end."""
    assert server.url is not None  # a remote server (stdio ones go to _relay_stdio)
    headers = {name: request.headers[name] for name in _PASSED_HEADERS
               if name in request.headers}
    if server.secret is not None:
        headers[server.header] = server.header_value(gate.grant.secrets[secret_key(server.name)])
    session = gateway.client_session()
    try:
        upstream = await session.request(request.method, URL(server.url),
                                         headers=headers, data=body or None,
                                         allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=None,
                                                                       sock_connect=10))
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise _Refusal(502, "upstream_unreachable", f"MCP server {server.name}: "
                       f"{type(exc).__name__}: {str(exc)[:200]}") from None
    async with upstream:
        session_id = upstream.headers.get("Mcp-Session-Id")
        assert gate.mcp is not None
        if session_id and request.method != "DELETE":
            _remember(gate.mcp, session_id[:256], server)
        elif request.method == "DELETE" and "Mcp-Session-Id" in request.headers:
            gate.mcp.sessions.pop(request.headers["Mcp-Session-Id"], None)
        out_headers = {name: upstream.headers[name] for name in _RETURNED_HEADERS
                       if name in upstream.headers}
        kind = upstream.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind == "text/event-stream":
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            await response.prepare(request)
            events = _EventFilter(server, lists)
            try:
                async for chunk in upstream.content.iter_any():
                    gate.usage.bytes += len(chunk)
                    if gate.state == "revoked" or gate.state == "expired":
                        raise ConnectionResetError("the run's token stopped working")
                    await response.write(events.feed(chunk))
                await response.write_eof()
            except (ConnectionError, aiohttp.ClientError, TimeoutError, ValueError):
                if request.transport is not None:
                    request.transport.abort()
                return response, False
            return response, True
        payload = await read_capped(upstream.content, _MAX_REPLY)
        gate.usage.bytes += len(payload)
        if len(payload) > _MAX_REPLY:
            raise _Refusal(502, "upstream_reply_too_large", f"MCP server {server.name} "
                           f"answered with more than {_MAX_REPLY} bytes")
        if lists and kind == "application/json":
            payload = _filter_json(server, payload, lists)
        return web.Response(status=upstream.status, body=payload, headers=out_headers), True


def _cancel_upstream(gateway: Gateway, gate: _Gate, server: McpServer,
                     request: web.BaseRequest, requests: list[Any]) -> None:
    """`notifications/cancelled` for each of `requests` to the server, in the agent's MCP
    session, in a task of its own (the handler that calls this may be being cancelled).
    Bounded per run; best effort (a server that ignores it is left to the run's DELETE)."""
    run = gate.mcp
    if run is None or server.url is None or len(run.cancelling) >= _MAX_CANCELLING:
        return
    headers = {"Content-Type": "application/json", "Accept": "application/json, "
               "text/event-stream"}
    for name in ("Mcp-Session-Id", "Mcp-Protocol-Version"):
        if name in request.headers:
            headers[name] = request.headers[name]
    if server.secret is not None:
        headers[server.header] = server.header_value(gate.grant.secrets[secret_key(server.name)])
    session, url = gateway.client_session(), URL(server.url)

    async def send() -> None:
        for ident in requests:
            body = json.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled",
                               "params": {"requestId": ident,
                                          "reason": "the agent's request ended"}})
            with contextlib.suppress(Exception):
                async with session.post(url, data=body, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=_CANCEL_TIMEOUT)):
                    pass

    task = asyncio.get_running_loop().create_task(send())
    run.cancelling.add(task)
    task.add_done_callback(run.cancelling.discard)


def _remember(run: McpRun, session_id: str, server: McpServer) -> None:
    assert server.url is not None
    if session_id not in run.sessions and len(run.sessions) >= _MAX_SESSIONS:
        run.sessions.pop(next(iter(run.sessions)))
    run.sessions[session_id] = (server.name, server.url)


def _filter_json(server: McpServer, payload: bytes, lists: set[Any]) -> bytes:
    """A JSON reply with the denied tools taken out of its tools/list results. A reply the
    gateway cannot read while it must filter it is withheld (it could list a denied tool)."""
    try:
        data = json.loads(payload)
    except ValueError:
        raise _Refusal(502, "upstream_reply_invalid", f"MCP server {server.name} answered "
                       "tools/list with something that is not JSON") from None
    items = data if isinstance(data, list) else [data]
    for item in items:
        _filter_message(server, item, lists)
    return json.dumps(data, separators=(",", ":")).encode()


def _filter_message(server: McpServer, item: Any, lists: set[Any]) -> None:
    if not isinstance(item, dict) or item.get("id") not in lists:
        return
    result = item.get("result")
    if isinstance(result, dict):
        result["tools"] = visible_tools(server, result.get("tools") or [])


class _EventFilter:
    """Server-sent events passed on as they come, each whole event read first so that a
    tools/list result in it can be filtered; everything else is passed on unchanged."""

    def __init__(self, server: McpServer, lists: set[Any]) -> None:
        self.server, self.lists = server, lists
        self.buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        self.buffer += chunk.replace(b"\r\n", b"\n")
        out = []
        while b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            out.append(self._event(event) + b"\n\n")
        if len(self.buffer) > _MAX_EVENT:
            raise ValueError("a server-sent event larger than the gateway passes on")
        return b"".join(out)

    def _event(self, event: bytes) -> bytes:
        if not self.lists:
            return event
        lines = event.split(b"\n")
        data = b"\n".join(line[5:].removeprefix(b" ") for line in lines
                          if line.startswith(b"data:"))
        if not data:
            return event
        with contextlib.suppress(ValueError):
            message = json.loads(data)
            if isinstance(message, dict) and message.get("id") in self.lists:
                _filter_message(self.server, message, self.lists)
                kept = [line for line in lines if not line.startswith(b"data:")]
                return b"\n".join([*kept, b"data: " + json.dumps(
                    message, separators=(",", ":")).encode()])
            return event
        # A tools/list reply that is not JSON could list anything: withheld.
        raise ValueError("an unreadable event on a stream that carries tools/list")


async def open_stdio(gate: _Gate, servers: dict[str, socket.socket],
                     carried: McpCarried | None = None) -> None:
    """The run's MCP state: its stdio servers, each a socket to its stdin and stdout (from
    the daemon), and for an adopted run what the previous worker's `carry` gave."""
    gate.mcp = McpRun()
    if carried is not None:
        gate.mcp.counters = Counters(calls=carried.calls, cost=carried.cost,
                                     per_server=dict(carried.per_server),
                                     per_tool=dict(carried.per_tool))
        urls = {s.name: s.url for s in gate.grant.policy.mcp.servers if s.url is not None}
        gate.mcp.sessions = {sid: (name, urls[name]) for sid, name in carried.sessions
                             if name in urls}
    limit = gate.grant.policy.mcp.max_message_bytes
    for name, sock in servers.items():
        start = carried.next_ids.get(name, 1) if carried is not None else 1
        gate.mcp.bridges[name] = await StdioBridge.open(name, sock, max(limit, _MAX_EVENT),
                                                        start)


_HANDOVER_ANSWERS = 5.0  # seconds a handover waits for the calls it failed to be answered


async def hand_over(gate: _Gate) -> None:
    """A restart takes the run to another worker: new calls are refused (retryable), those
    in flight to stdio servers answered with `supervisor_restarting` and cancelled at the
    server, and the bridges let go of their sockets (the servers keep running). Remote
    sessions are left open: the next worker ends them when the run ends."""
    run = gate.mcp
    if run is None:
        return
    run.handing_over = True
    for bridge in run.bridges.values():
        await bridge.hand_over()
    if run.relaying:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(run.relayed.wait(), _HANDOVER_ANSWERS)
    run.sessions_kept = True


def carry(gate: _Gate) -> dict[str, Any] | None:
    """What the next worker goes on with (`McpCarried` on the wire), after `hand_over`."""
    run = gate.mcp
    if run is None:
        return None
    return mcp_carried_to_wire(McpCarried(
        calls=run.counters.calls, cost=run.counters.cost,
        per_server=dict(run.counters.per_server), per_tool=dict(run.counters.per_tool),
        sessions=[(sid, name) for sid, (name, _url) in run.sessions.items()],
        next_ids={name: bridge.next_id for name, bridge in run.bridges.items()}))


async def end_sessions(gateway: Gateway, gate: _Gate) -> None:
    """When the run ends: its stdio bridges closed (the daemon kills the servers), and a
    DELETE for each remote session it left open, so the servers let go of them (best effort,
    bounded; the agent's side was cut already)."""
    run = gate.mcp
    if run is not None:
        for bridge in run.bridges.values():
            await bridge.close()
    if run is None or not run.sessions or run.sessions_kept:
        return
    session = gateway.client_session()
    servers = {s.name: s for s in gate.grant.policy.mcp.servers}

    async def delete(session_id: str, name: str, url: str) -> None:
        server = servers.get(name)
        headers = {"Mcp-Session-Id": session_id}
        if server is not None and server.secret is not None:
            headers[server.header] = server.header_value(
                gate.grant.secrets[secret_key(server.name)])
        with contextlib.suppress(Exception):
            async with session.delete(url, headers=headers,
                                      timeout=aiohttp.ClientTimeout(total=2)):
                pass

    await asyncio.gather(*(delete(sid, name, url) for sid, (name, url) in run.sessions.items()))
    run.sessions.clear()
