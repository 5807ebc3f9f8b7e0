"""The egress gateway: an HTTP proxy (aiohttp's low-level server and client) in a thread of its
own, with one listener per run on the host end of that run's veth. Needs root only for what the
daemon set up around it (the veth and the nftables rules); the proxy itself binds an address.

Every request must carry the run's session token (Proxy-Authorization). `CONNECT host:port`
tunnels only to allow-listed names, which the gateway resolves itself; plain-HTTP requests go
only to credential routes, which are forwarded over TLS with the real secret added here, so
the secret never enters the sandbox, and replies that reflect it never reach the agent
(`reflection`). Route paths are judged in one normalised form (`target`). Budgets, the
circuit breaker and approval holds are judged on every request; a revoked or suspended token,
and a token at its expiry (a timer), cut open tunnels and connections at that moment.

Everything the agent can grow here is bounded: connections per run, held approvals, the
refusal tally (refusals also count toward the breaker), request bodies (streamed, never
buffered whole), and the size of everything handed to the sink. A malformed request gets a
400 and, at most every few seconds, one log line.

Its own event loop keeps a flood from one agent off the daemon's loop (the control socket,
the kill path); per-run listeners with a connection cap keep it off other agents' traffic.
Decisions that belong to the daemon (audit, tripwires, approvals) go through `GatewaySink`,
called in the gateway's thread; the sink posts them to the daemon's loop."""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import dataclasses
import hmac
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Literal, Protocol, TypeVar

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from aiohttp.web_protocol import RequestHandler
from yarl import URL

from supervisor.config import EgressSection
from supervisor.egress.accounting import (
    BreakerState,
    Ceiling,
    RefusalTally,
    Usage,
    clip,
    tokens_in,
)
from supervisor.egress.calls import CallLog, CallMeter, StreamUsage
from supervisor.egress.grant import Carried, Decision, RunGrant
from supervisor.egress.reflection import Reflection, SecretReflected
from supervisor.egress.target import (
    MethodOverride,
    TargetRefused,
    form_scanner,
    normalise,
    override_in,
)
from supervisor.httpclient import read_capped, tcp_connector
from supervisor.mcp import gateway as mcp_gateway
from supervisor.models.egress import Route, is_ip_literal

log = logging.getLogger(__name__)

DENIED_HEADER = "X-Agent-Supervisor-Denied"
_HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authorization", "Proxy-Authenticate", "Proxy-Connection",
    "TE", "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length"))
_TUNNEL_HIGH_WATER = 1024 * 1024
_MAX_BODY = 64 * 1024 * 1024  # per request; bodies stream, this only bounds one request
_MAX_REFUSAL_KEYS = 64  # distinct (code, target) refusals counted apart per run
_LOG_EVERY = 10.0  # seconds between log lines about malformed requests
# Refusals that count toward the breaker as errors: all but those of a token that no longer
# works (the run is over or paused) and of the open breaker itself.
_NOT_JUDGED = frozenset(("token_revoked", "token_suspended", "token_expired", "breaker_open"))
_HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_\-]{0,61}[a-z0-9_])?$")
_BUFFERED_BODY = 1024 * 1024  # replies up to this size with a known length go in one write
_PRICED_BODY = 8 * 1024 * 1024  # a priced (JSON, token-counted) reply is read whole, up to this
_IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # linux/in.h; Python 3.12 names it
T = TypeVar("T")

GateState = Literal["active", "suspended", "revoked", "expired"]


def present_token(sock: socket.socket, user: str, token: str, timeout: float = 2.0
                  ) -> tuple[str, str] | None:
    """Present `user:token` on a connection to a run's listener as its agent would (a CONNECT
    with Proxy-Authorization) and read the answer's head: (status line, the gateway's refusal
    code or ""), or None if the connection closed without an answer. Blocking; `sock` is the
    caller's to close. The target is a name no policy allows, so a token that works is
    answered egress_denied and nothing leaves the host."""
    auth = base64.b64encode(f"{user}:{token}".encode()).decode()
    sock.settimeout(timeout)
    sock.sendall(f"CONNECT drill.invalid:443 HTTP/1.1\r\nHost: drill.invalid:443\r\n"
                 f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 8192:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    if not head:
        return None
    lines = head.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:])}
    return lines[0], headers.get(DENIED_HEADER.lower(), "")


class GatewaySink(Protocol):
    """The daemon's side. Called in the gateway's thread; must not block."""

    def budget_exceeded(self, run_id: str, detail: dict[str, Any]) -> None: ...
    def breaker_tripped(self, run_id: str, detail: dict[str, Any]) -> None: ...
    def denied(self, run_id: str, code: str, detail: dict[str, Any]) -> None: ...
    def mcp_decision(self, run_id: str, detail: dict[str, Any]) -> None: ...
    def request_approval(self, run_id: str, method: str, host: str, path: str, rule: str
                         ) -> concurrent.futures.Future[Decision]: ...


class EgressRefusal(Exception):
    """Raised inside a handler; rendered as the structured refusal the agent sees."""

    def __init__(self, status: int, code: str, message: str, *, retry: bool = False,
                 headers: dict[str, str] | None = None, **detail: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry = retry
        self.headers = headers or {}
        self.detail = detail


class _Gate:
    """One run inside the gateway: its token state, counters, breaker and open connections."""

    def __init__(self, grant: RunGrant, now: float) -> None:
        self.grant = grant
        self.state: GateState = "active"
        self.usage = Usage()
        self.breaker = BreakerState(grant.policy.breaker, now)
        self.budget_fired = False
        self.server: web.Server | None = None
        self.listener: asyncio.Server | None = None
        # What the listener makes of each connection it accepts (the connection limit, then
        # the server's handler); `Gateway.accept` serves a handed-in socket through it too.
        self.factory: Callable[[], asyncio.Protocol] | None = None
        self.tunnels: set[asyncio.Transport] = set()
        self.refusals = RefusalTally(_MAX_REFUSAL_KEYS)
        self.calls = CallLog()  # each call through a route, for the run's CI report
        self.expiry: asyncio.TimerHandle | None = None
        self.held = 0  # requests waiting for an operator now
        self.asked = 0  # approvals asked for in all
        self._reflections: dict[str, Reflection] = {}
        self.mcp: mcp_gateway.McpRun | None = None  # its MCP calls (supervisor/mcp/gateway.py)

    def reflection(self, route: Route) -> Reflection:
        if route.name not in self._reflections:
            self._reflections[route.name] = Reflection([self.grant.secrets[route.name]])
        return self._reflections[route.name]

    def agent_total(self) -> Usage:
        return self.grant.agent_usage.add(self.usage)

    def reflections_reset(self) -> None:
        """New secrets: the reflection guards are rebuilt from them at the next use."""
        self._reflections = {}


class _Resolver(AbstractResolver):
    """Pinned names first ([egress] hosts); otherwise the system's resolver, refusing any name
    that resolves to a loopback, private or link-local address (no way back into the host)."""

    def __init__(self, pinned: dict[str, str]) -> None:
        self.pinned = {k.lower(): v for k, v in pinned.items()}
        self.system = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        name = host.lower().rstrip(".")
        if name in self.pinned:
            address = self.pinned[name]
            fam = socket.AF_INET6 if ":" in address else socket.AF_INET
            return [{"hostname": host, "host": address, "port": port, "family": fam,
                     "proto": 0, "flags": socket.AI_NUMERICHOST}]
        results = await self.system.resolve(host, port, family)
        public = [r for r in results if ipaddress.ip_address(r["host"]).is_global]
        if not public:
            raise OSError(f"{host} resolves only to non-public addresses; pin it in "
                          f"[egress] hosts if that is intended")
        return public

    async def close(self) -> None:
        await self.system.close()


class _TunnelFeed:
    """aiohttp's hook for an upgraded connection (`RequestHandler.set_parser`): every byte the
    agent sends after `200 Connection Established` arrives here and goes upstream."""

    def __init__(self, gateway: Gateway, gate: _Gate, upstream: asyncio.Transport,
                 client: asyncio.Transport) -> None:
        self.gateway, self.gate = gateway, gate
        self.upstream, self.client = upstream, client

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if not self.gateway.count_tunnel_bytes(self.gate, len(data)):
            self.upstream.abort()
            self.client.abort()
            return True, b""
        self.upstream.write(data)
        if self.upstream.get_write_buffer_size() > _TUNNEL_HIGH_WATER:
            self.client.pause_reading()
        return False, b""

    def feed_eof(self) -> None:
        # The agent hung up: nothing more can reach it, so the tunnel ends.
        self.upstream.close()


class _Upstream(asyncio.Protocol):
    """The gateway's TCP connection to a tunnel's destination."""

    def __init__(self, gateway: Gateway, gate: _Gate) -> None:
        self.gateway, self.gate = gateway, gate
        self.client: asyncio.Transport | None = None
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.client is None:
            self.pending += data
            return
        if not self.gateway.count_tunnel_bytes(self.gate, len(data)):
            self.client.abort()
            if self.transport is not None:
                self.transport.abort()
            return
        self.client.write(data)
        if self.client.get_write_buffer_size() > _TUNNEL_HIGH_WATER and self.transport:
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(0.01, self._resume_when_drained)

    def _resume_when_drained(self) -> None:
        if self.client is None or self.transport is None or self.transport.is_closing():
            return
        if self.client.get_write_buffer_size() > _TUNNEL_HIGH_WATER // 2:
            asyncio.get_running_loop().call_later(0.01, self._resume_when_drained)
        else:
            self.transport.resume_reading()

    def resume_writing(self) -> None:
        if self.client is not None and not self.client.is_closing():
            self.client.resume_reading()

    def eof_received(self) -> bool:
        if self.client is not None and self.client.can_write_eof():
            with contextlib.suppress(OSError):
                self.client.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client is not None:
            self.client.close()
        if not self.closed.done():
            self.closed.set_result(None)


class _Refuse(asyncio.Protocol):
    """Past the per-run connection cap: a 503 and close, without parsing anything."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        body = (b'{"error": {"code": "too_many_connections", "message": "this run has too many '
                b'open connections to the egress gateway", "detail": {"retry": true}}}')
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\n" + DENIED_HEADER.encode() +
                        b": too_many_connections\r\nContent-Length: " + str(len(body)).encode() +
                        b"\r\n\r\n" + body)
        transport.close()


class _LogLimiter:
    """One log line per `every` seconds about malformed requests, with the count since the
    last line: an agent that sends garbage in a loop cannot fill the host's journal."""

    def __init__(self, every: float = _LOG_EVERY) -> None:
        self.every = every
        self.last = -every
        self.suppressed = 0
        self.lines = 0

    def note(self, run_id: str, what: str) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            self.suppressed += 1
            return
        self.last = now
        self.lines += 1
        log.warning("egress gateway: refused a malformed request from run %s (%s); %d more "
                    "since the last such line", run_id, clip(what, 300), self.suppressed)
        self.suppressed = 0


class _Connection(RequestHandler):
    """aiohttp's connection handler, with its error page replaced: a request aiohttp cannot
    parse gets the gateway's structured 400 (431 for a head too large), is counted as a
    refusal, and logs no traceback."""

    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.on_bad_request = manager.on_bad_request

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        what = f"{type(exc).__name__}: {exc}" if exc is not None else (message or "")
        self.on_bad_request(what.replace("\n", " "))
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; the connection is closed")
        status = status if status in (400, 413, 431) else 400
        response = _refusal_response(EgressRefusal(
            status, "bad_request", "the gateway could not parse this request"), {})
        response.force_close()
        return response


class _Malformed(web.BaseRequest):
    """A request built on a placeholder target because its own could not be read."""

    def __init__(self, reason: str, *args: Any) -> None:
        super().__init__(*args)
        self.reason = reason


class _Server(web.Server):
    def __init__(self, handler: Any, on_bad_request: Callable[[str], None],
                 **kwargs: Any) -> None:
        super().__init__(handler, request_factory=self._make_safe_request, **kwargs)
        self.on_bad_request = on_bad_request

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)

    def _make_safe_request(self, message: Any, payload: Any, protocol: RequestHandler,
                           writer: Any, task: asyncio.Task[None]) -> web.BaseRequest:
        """A request line aiohttp parsed but yarl cannot read (a malformed IDNA name, for
        one) raised inside aiohttp's connection task: no answer, a traceback per request.
        Such a request is built on a placeholder target and marked, and the handler refuses
        it."""
        try:
            return web.BaseRequest(message, payload, protocol, writer, task, self._loop)
        except Exception as exc:  # whatever the parser let through that yarl cannot read
            placeholder = message._replace(method="GET", path="/", url=URL("/"))
            return _Malformed(f"{type(exc).__name__}: {exc}", placeholder, payload, protocol,
                              writer, task, self._loop)


class Gateway:
    def __init__(self, config: EgressSection, sink: GatewaySink,
                 ssl_context: ssl.SSLContext | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.sink = sink
        self.clock = clock
        self.gates: dict[str, _Gate] = {}
        self._lock = threading.Lock()
        self._ssl = ssl_context or upstream_ssl_context(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._resolver: _Resolver | None = None
        self.malformed_log = _LogLimiter()

    # ------------------------------------------------------------------ lifecycle (any thread)

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._open_session())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._close_all())
            # Handlers cut by the close finish (and release their upstream connections)
            # before the loop goes, or their sockets would be left to the garbage collector.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            # Aborted transports close their sockets in a callback of the next iteration;
            # closing the loop first would drop it and leave the socket to the collector.
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=run, name="egress-gateway", daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop = None

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        assert self._loop is not None, "the gateway is not running"
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def open(self, grant: RunGrant,
                   stdio: dict[str, socket.socket] | None = None,
                   carried: Carried | None = None) -> None:
        """Listen for `grant`'s run on its host address (called from the daemon's loop);
        `stdio`: the run's stdio MCP servers, a socket to each one's stdin and stdout;
        `carried`: what the run's gate had before a restart (an adopted run)."""
        await asyncio.wrap_future(self._submit(self._open(grant, stdio or {}, carried)))

    async def close(self, run_id: str) -> Usage | None:
        """Revoke, cut every connection, stop listening; the run's final usage."""
        self.revoke(run_id)
        return await asyncio.wrap_future(self._submit(self._close(run_id)))

    async def hand_over(self, run_id: str) -> tuple[Usage | None, dict[str, Any] | None]:
        """A restart: as `close`, but the calls in flight to the run's stdio MCP servers are
        answered first (supervisor_restarting), its MCP servers and remote sessions are left
        to the next worker; the run's final usage and its MCP state for that worker
        (mcp_gateway.carry), None for a run that made no MCP call and has no stdio server."""
        return await asyncio.wrap_future(self._submit(self._hand_over(run_id)))

    async def _hand_over(self, run_id: str) -> tuple[Usage | None, dict[str, Any] | None]:
        gate = self.gates.get(run_id)
        if gate is None:
            return None, None
        # Before the gate is revoked and its connections cut: the answers to the calls in
        # flight must reach the agent.
        await mcp_gateway.hand_over(gate)
        self.revoke(run_id)
        return await self._close(run_id), mcp_gateway.carry(gate)

    def accept(self, run_id: str, sock: socket.socket) -> bool:
        """Serve `sock` as a connection accepted on the run's listener: the daemon presents a
        token this way (a drill's check that the run's token was revoked), through the same
        handler the agent's connections reach, without needing the run's network, which the
        kill has removed by then. False (`sock` left to the caller) if the run has none."""
        with self._lock:
            gate = self.gates.get(run_id)
        if gate is None or gate.factory is None or gate.listener is None:
            return False
        self._submit(self._accept(gate.factory, sock))
        return True

    async def _accept(self, factory: Callable[[], asyncio.Protocol], sock: socket.socket
                      ) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(factory, sock)
        except OSError:
            sock.close()  # the daemon's end sees the close: nothing was presented

    def suspend(self, run_id: str) -> None:
        self._set_state(run_id, "suspended")

    def resume(self, run_id: str) -> None:
        self._set_state(run_id, "active")

    def revoke(self, run_id: str) -> None:
        self._set_state(run_id, "revoked")

    def _set_state(self, run_id: str, state: GateState) -> None:
        """Takes effect for the next request at once (the check reads this); open tunnels and
        connections are cut in the gateway's loop right after."""
        with self._lock:
            gate = self.gates.get(run_id)
            if gate is None or gate.state == "revoked":
                return
            if gate.state == "expired" and state != "revoked":
                return  # neither resume nor suspend revives an expired token
            gate.state = state
        if state != "active" and self._loop is not None:
            self._loop.call_soon_threadsafe(self._cut, gate)

    def regrant(self, grant: RunGrant) -> bool:
        """A reload changed the run's routes or their secrets: its next request is judged by
        `grant`'s policy and gets its secrets. The token, its expiry, the listener and the
        counters stay the run's own (never extended by a reload). Open CONNECT tunnels were
        judged once, by the old policy, so they are cut; requests in flight finish as they
        began. False when the run is not (or no longer) here."""
        with self._lock:
            gate = self.gates.get(grant.run_id)
            if gate is None or gate.state == "revoked":
                return False
            gate.grant = dataclasses.replace(gate.grant, policy=grant.policy,
                                             secrets=dict(grant.secrets))
            gate.reflections_reset()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._cut_tunnels, gate)
        return True

    def _cut_tunnels(self, gate: _Gate) -> None:
        for transport in list(gate.tunnels):
            transport.abort()
        gate.tunnels.clear()

    def reset_breaker(self, run_id: str) -> str | None:
        """Close a tripped breaker; the reason it had tripped, or None if it was closed."""
        with self._lock:
            gate = self.gates.get(run_id)
            if gate is None or gate.breaker.tripped is None:
                return None
            reason = gate.breaker.tripped
            gate.breaker.reset(self.clock())
            return reason

    def breaker_open(self, run_id: str) -> str | None:
        gate = self.gates.get(run_id)
        return gate.breaker.tripped if gate else None

    def usage(self, run_id: str) -> Usage | None:
        gate = self.gates.get(run_id)
        if gate is None:
            return None
        usage = gate.usage.copy()
        usage.refusals = gate.refusals.as_dict()
        return usage

    def client_session(self) -> aiohttp.ClientSession:
        """The gateway's one client session (the gateway's loop only)."""
        assert self._session is not None, "the gateway is not running"
        return self._session

    def listening(self, run_id: str) -> bool:
        gate = self.gates.get(run_id)
        return gate is not None and gate.listener is not None and gate.listener.is_serving()

    # ------------------------------------------------------------------ the gateway's loop

    async def _open_session(self) -> None:
        self._resolver = _Resolver(self.config.hosts)
        connector = tcp_connector(ssl=self._ssl, resolver=self._resolver,
                                  limit=0, limit_per_host=0, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",),
            timeout=aiohttp.ClientTimeout(total=self.config.upstream_timeout,
                                          connect=self.config.connect_timeout))

    async def _close_all(self) -> None:
        for run_id in list(self.gates):
            await self._close(run_id)
        if self._session is not None:
            await self._session.close()

    async def _open(self, grant: RunGrant, stdio: dict[str, socket.socket],
                    carried: Carried | None = None) -> None:
        gate = _Gate(grant, self.clock())
        if carried is not None:
            # An adopted run: its counts and decisions go on; the breaker's window of recent
            # requests starts empty (its times were the old worker's), an open one stays open.
            gate.usage = carried.usage.copy()
            gate.breaker.tripped = carried.breaker
            gate.budget_fired = carried.budget_fired
            if carried.suspended:
                gate.state = "suspended"
        if stdio or (carried is not None and carried.mcp is not None):
            await mcp_gateway.open_stdio(gate, stdio, carried.mcp if carried else None)
        server = _Server(self._handler(gate), lambda what: self._bad_request(gate, what),
                         max_field_size=self.config.max_header_size,
                         max_line_size=self.config.max_header_size,
                         keepalive_timeout=self.config.header_timeout,
                         # A client that hangs up cancels its handler: a held approval is
                         # withdrawn, an upload or a tunnel ends with it.
                         handler_cancellation=True,
                         access_log=None)
        gate.server = server
        limit = self.config.max_connections_per_run

        def factory() -> asyncio.Protocol:
            if len(server.connections) >= limit:
                return _Refuse()
            return server()

        gate.factory = factory

        loop = asyncio.get_running_loop()
        try:
            gate.listener = await loop.create_server(factory, sock=_listening_socket(grant))
        except BaseException:
            await mcp_gateway.end_sessions(self, gate)  # the stdio bridges opened above
            raise
        with self._lock:
            self.gates[grant.run_id] = gate
        self._arm_expiry(gate)

    def _arm_expiry(self, gate: _Gate) -> None:
        """The token dies at `expires_at` whether or not a request comes: a timer cuts open
        tunnels and connections then (the clock is read again when it fires, in case it
        moved)."""
        remaining = gate.grant.expires_at - self.clock()
        if remaining > 0:
            loop = asyncio.get_running_loop()
            gate.expiry = loop.call_later(min(remaining, 3600.0), self._expire, gate)
            return
        gate.expiry = None
        with self._lock:
            if gate.state in ("revoked", "expired"):
                return
            gate.state = "expired"
        self._cut(gate)

    def _expire(self, gate: _Gate) -> None:
        if self.gates.get(gate.grant.run_id) is gate:
            self._arm_expiry(gate)

    async def _close(self, run_id: str) -> Usage | None:
        with self._lock:
            gate = self.gates.pop(run_id, None)
        if gate is None:
            return None
        gate.state = "revoked"
        if gate.expiry is not None:
            gate.expiry.cancel()
        if gate.listener is not None:
            gate.listener.close()
        self._cut(gate)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(mcp_gateway.end_sessions(self, gate), 3)
        if gate.listener is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(gate.listener.wait_closed(), 2)
        gate.usage.refusals = gate.refusals.as_dict()
        return gate.usage

    def _cut(self, gate: _Gate) -> None:
        for transport in list(gate.tunnels):
            transport.abort()
        gate.tunnels.clear()
        if gate.server is not None:
            for handler in gate.server.connections:
                handler.force_close()
                if handler.transport is not None:
                    handler.transport.abort()

    # ------------------------------------------------------------------ requests

    def _handler(self, gate: _Gate) -> Callable[[web.BaseRequest], Coroutine[Any, Any,
                                                                             web.StreamResponse]]:
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            try:
                if isinstance(request, _Malformed):
                    self._bad_request(gate, request.reason, count=False)
                    raise EgressRefusal(400, "bad_request", "the gateway could not read this "
                                        "request's target")
                if request.method != "CONNECT" and mcp_gateway.is_mcp(request):
                    # Pause holds MCP calls (in supervisor/mcp/gateway.py) instead of refusing.
                    self._authorize(gate, request, hold_suspended=True)
                    return await mcp_gateway.handle(self, gate, request)
                self._authorize(gate, request)
                if request.method == "CONNECT":
                    return await self._tunnel(gate, request)
                return await self._forward(gate, request)
            except EgressRefusal as refusal:
                return self._refuse(gate, request, refusal)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no request may go unanswered or log a traceback
                self._bad_request(gate, f"{type(exc).__name__}: {exc}", count=False)
                if request.writer.output_size > 0:
                    if request.transport is not None:
                        request.transport.abort()
                    return web.StreamResponse()
                return self._refuse(gate, request, EgressRefusal(
                    400, "bad_request", "the gateway could not handle this request"))
        return handle

    def _bad_request(self, gate: _Gate, what: str, *, count: bool = True) -> None:
        """A request that could not be parsed or handled: one rate-limited log line; counted
        as a refusal here when it never reaches `_refuse` (aiohttp's own parse errors)."""
        self.malformed_log.note(gate.grant.run_id, what)
        if count:
            self._tally(gate, "bad_request", "(unparsed request)", {"method": "-"})

    def _tally(self, gate: _Gate, code: str, target: str, detail: dict[str, Any]) -> None:
        """Count a refusal; the sink hears of the first of each (code, target) only, with
        every string clipped, so the audit rows are few and small whatever the agent sends."""
        gate.usage.denied += 1
        if gate.refusals.count(code, target):
            self.sink.denied(gate.grant.run_id, code, _clipped(detail))
        if code not in _NOT_JUDGED:
            self._judge(gate, error=True, upstream=False)

    def _refuse(self, gate: _Gate, request: web.BaseRequest,
                refusal: EgressRefusal) -> web.Response:
        target = (request.url.raw_authority if request.method == "CONNECT"
                  else request.path)
        detail = {"method": clip(request.method, 16), "target": clip(str(target)),
                  **_clipped(refusal.detail)}
        self._tally(gate, refusal.code, str(detail.get("host") or detail["target"]), detail)
        response = _refusal_response(refusal, detail)
        if request.method == "CONNECT" or refusal.status == 400:
            response.force_close()
        return response

    def _authorize(self, gate: _Gate, request: web.BaseRequest, *,
                   hold_suspended: bool = False) -> None:
        token = _token_of(request.headers.get("Proxy-Authorization", ""))
        if token is None:
            raise EgressRefusal(407, "token_required",
                                "the egress gateway needs this run's session token "
                                "(Proxy-Authorization, from HTTP_PROXY)")
        if not hmac.compare_digest(token.encode(), gate.grant.token.encode()):
            raise EgressRefusal(407, "token_invalid", "the session token is not valid for "
                                "this run")
        if gate.state == "revoked":
            raise EgressRefusal(403, "token_revoked", "this run's session token was revoked "
                                "(the run was stopped or killed)")
        if gate.state == "suspended" and not hold_suspended:
            raise EgressRefusal(403, "token_suspended", "this run's session token is suspended "
                                "while the agent is paused", retry=True)
        if gate.state == "expired" or self.clock() >= gate.grant.expires_at:
            raise EgressRefusal(403, "token_expired", "this run's session token has expired",
                                expired_at=gate.grant.expires_at)
        if gate.breaker.tripped:
            raise EgressRefusal(503, "breaker_open", f"the circuit breaker is open: "
                                f"{gate.breaker.tripped}; an operator must reset it")
        self.check_budget(gate)

    def check_budget(self, gate: _Gate, *, counted: bool = False) -> None:
        """Refuse (429 `budget_exceeded`, the tripwire fired once) when a ceiling of the run
        or agent budget is reached. Called with no await between it and the charge it guards
        (the request counted, its spend added): a request that waited (for an operator, out
        of a pause) is judged again here by what went meanwhile. `counted`: the request is
        already in `requests` (it took its place there when first judged), so that ceiling
        is judged without it."""
        budget = gate.grant.policy.budget
        own = Usage(requests=1) if counted else Usage()
        run = gate.usage.less(own)
        which, over = "run", run.over(budget.run)
        if over is None:
            which, over = "agent", gate.grant.agent_usage.add(run).over(budget.agent)
        if over is None:
            return
        self._budget_fired(gate, which, over)
        raise EgressRefusal(429, "budget_exceeded", f"the {which} budget is spent: {over}",
                            budget=which, ceiling=str(over))

    def _budget_fired(self, gate: _Gate, which: str, over: Ceiling) -> None:
        if gate.budget_fired:
            return
        gate.budget_fired = True
        self.sink.budget_exceeded(gate.grant.run_id, {
            "budget": which, "metric": over.metric, "value": over.value, "limit": over.limit,
            "action": gate.grant.policy.budget.action, "usage": gate.usage.as_dict()})

    def count_tunnel_bytes(self, gate: _Gate, n: int) -> bool:
        """Count bytes that pass (tunnels, bodies); False (cut) once the token no longer works
        (the expiry timer is the rule; reading the clock here too costs little) or a byte
        budget is spent."""
        gate.usage.bytes += n
        if gate.state != "active":
            return False
        if self.clock() >= gate.grant.expires_at:
            self._arm_expiry(gate)
            return False
        budget = gate.grant.policy.budget
        for which, usage, limit in (("run", gate.usage, budget.run.bytes),
                                    ("agent", gate.agent_total(), budget.agent.bytes)):
            if limit is not None and usage.bytes >= limit:
                self._budget_fired(gate, which, Ceiling("bytes", usage.bytes, limit))
                return False
        return True

    def _judge(self, gate: _Gate, error: bool, *, upstream: bool = True) -> None:
        """Record one request with the breaker; `errors` counts the upstream's (5xx, unreachable,
        a bad reply), while a refusal weighs on the breaker only."""
        if error and upstream:
            gate.usage.errors += 1
        reason = gate.breaker.record(self.clock(), error)
        if reason:
            self.sink.breaker_tripped(gate.grant.run_id, {
                "reason": reason, "usage": gate.usage.as_dict()})

    async def _hold(self, gate: _Gate, method: str, host: str, judged: str,
                    shown: str) -> None:
        """Wait for an operator when a rule matches `judged` (the normalised path); the
        operator is shown `shown`, the path as it will be sent."""
        policy = gate.grant.policy
        rule = policy.approval_rule(method, host, judged)
        if rule is None:
            return
        if gate.held >= policy.max_pending_approvals:
            raise EgressRefusal(429, "approvals_pending", f"this run already has "
                                f"{gate.held} requests waiting for an operator (the limit); "
                                f"wait for an answer", retry=True, rule=str(rule))
        if gate.asked >= policy.max_approval_requests:
            raise EgressRefusal(429, "approval_limit", f"this run has asked for "
                                f"{gate.asked} approvals, the most it may", rule=str(rule))
        gate.held += 1
        gate.asked += 1
        try:
            future = self.sink.request_approval(gate.grant.run_id, method, host,
                                                clip(shown, 500), str(rule))
            try:
                decision = await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                future.cancel()  # the agent hung up: the daemon withdraws the approval
                raise
        finally:
            gate.held -= 1
        if not decision.approved:
            raise EgressRefusal(403, "approval_denied",
                                f"an operator's approval was required ({rule}) and was not "
                                f"given: {decision.reason or 'denied'}",
                                approval=decision.approval_id, by=decision.by)
        if gate.state != "active":
            raise EgressRefusal(403, f"token_{gate.state}", "the run's session token stopped "
                                "working while the request was held")
        # Other requests went while this one waited: the budgets are judged again before it
        # is charged (its caller adds its spend with no await in between).
        self.check_budget(gate, counted=True)

    async def _tunnel(self, gate: _Gate, request: web.BaseRequest) -> web.StreamResponse:
        authority = request.url.raw_authority or ""
        host, port = _authority(authority)
        if is_ip_literal(host):
            raise EgressRefusal(403, "egress_denied", f"{host} is an IP address; the gateway "
                                "only tunnels to allow-listed names", host=host, port=port)
        if gate.grant.policy.allowed(host, port) is None:
            raise EgressRefusal(403, "egress_denied", f"{clip(host)}:{port} is not on this "
                                "agent's allow-list", host=host, port=port)
        gate.usage.requests += 1
        await self._hold(gate, "CONNECT", host, "", "")
        loop = asyncio.get_running_loop()
        assert self._resolver is not None
        try:
            addresses = await self._resolver.resolve(host, port)
            upstream_transport, upstream = await asyncio.wait_for(loop.create_connection(
                lambda: _Upstream(self, gate), addresses[0]["host"], port),
                self.config.connect_timeout)
        except (TimeoutError, OSError) as exc:
            self._judge(gate, error=True)
            raise EgressRefusal(502, "upstream_unreachable", f"cannot reach {host}:{port}: "
                                f"{exc or type(exc).__name__}", retry=True, host=host,
                                port=port) from None
        self._judge(gate, error=False)
        client = request.transport
        protocol = request.protocol
        if client is None or gate.state != "active":
            upstream_transport.close()
            raise EgressRefusal(403, f"token_{gate.state}", "the run's session token stopped "
                                "working while the tunnel was opened")
        response = web.StreamResponse(status=200, reason="Connection Established")
        await response.prepare(request)
        assert isinstance(upstream_transport, asyncio.Transport)
        gate.tunnels.update((client, upstream_transport))
        upstream.client = client
        assert isinstance(protocol, RequestHandler)
        protocol.set_parser(_TunnelFeed(self, gate, upstream_transport, client))  # type: ignore[arg-type]
        if upstream.pending:
            client.write(bytes(upstream.pending))
            upstream.pending.clear()
        try:
            await upstream.closed
        finally:
            gate.tunnels.discard(client)
            gate.tunnels.discard(upstream_transport)
            upstream_transport.close()
            client.close()
        return response

    def _screen(self, gate: _Gate, request: web.BaseRequest, route: Route) -> Any:
        """What a route request must pass before anything is sent: a method the route names,
        no method override, a target with one meaning. Returns the normalised target."""
        if request.method not in route.methods:
            raise EgressRefusal(405, "method_not_allowed", f"route {route.name} forwards only "
                                f"{', '.join(route.methods)}", route=route.name,
                                headers={"Allow": ", ".join(route.methods)})
        override = override_in(list(request.headers.keys()))
        try:
            if override is not None:
                raise MethodOverride(f"header {override}")
            return normalise(request.raw_path)
        except MethodOverride as exc:
            raise EgressRefusal(400, "method_override_refused", f"{exc.reason} would make the "
                                f"upstream read this request as another method than "
                                f"{request.method}; send that method itself",
                                route=route.name) from None
        except TargetRefused as exc:
            raise EgressRefusal(400, "bad_request", f"the path has no single meaning: "
                                f"{exc.reason}", route=route.name) from None

    async def _forward(self, gate: _Gate, request: web.BaseRequest) -> web.StreamResponse:
        host = (request.url.host or request.host or "").split(":")[0].lower()
        if not host:
            raise EgressRefusal(400, "bad_request", "the request names no host (an absolute "
                                "URL or a Host header)")
        route = gate.grant.policy.route_for(host)
        if route is None:
            raise EgressRefusal(403, "egress_denied", f"no credential route for "
                                f"{clip(host)!r}; plain HTTP goes only to routes, anything "
                                "else through CONNECT to an allow-listed name", host=host)
        target = self._screen(gate, request, route)
        length = request.content_length
        if length is not None and length > _MAX_BODY:
            raise EgressRefusal(413, "body_too_large", f"request bodies are limited to "
                                f"{_MAX_BODY} bytes")
        gate.usage.requests += 1
        # Rules judge the normalised form; the path sent can only be read as that same form.
        await self._hold(gate, request.method, host, target.judged, target.path)
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in _HOP_BY_HOP and k.lower() != route.header.lower()
                   and k.lower() != "accept-encoding"}
        headers[route.header] = route.header_value(gate.grant.secrets[route.name])
        # An encoded reply could hide a reflected secret from the scan below.
        headers["Accept-Encoding"] = "identity"
        if length is not None and request.body_exists:
            headers["Content-Length"] = str(length)
        url = URL(route.upstream.rstrip("/") + target.raw_path_qs, encoded=True)
        gate.usage.spend += route.price_per_call
        cut: list[EgressRefusal] = []
        meter = CallMeter()
        body = self._stream_body(gate, request, cut, meter) if request.body_exists else None
        assert self._session is not None
        try:
            upstream = await self._session.request(request.method, url, headers=headers,
                                                   data=body, allow_redirects=False)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if cut:
                raise cut[0] from None
            self._judge(gate, error=True)
            raise EgressRefusal(502, "upstream_unreachable", f"route {route.name}: "
                                f"{type(exc).__name__}: {clip(str(exc))}", retry=True,
                                route=route.name) from None
        async with upstream:
            response = await self._reply(gate, request, route, upstream, meter)
        gate.calls.record(started=meter.started, method=request.method, route=route.name,
                          path=target.path, status=upstream.status,
                          request_bytes=meter.request_bytes, reply_bytes=meter.reply_bytes,
                          tokens=meter.stream.tokens() if meter.stream else meter.tokens,
                          duration_ms=meter.elapsed_ms())
        return response

    async def _stream_body(self, gate: _Gate, request: web.BaseRequest,
                           cut: list[EgressRefusal],
                           meter: CallMeter | None = None) -> AsyncIterator[bytes]:
        """The agent's body, passed upstream as it arrives (never held whole); a body past
        the per-request limit, a form field that overrides the method, or a token that stops
        working ends the upload (the upstream never gets a whole body) and the request is
        refused."""
        size = 0
        scanner = form_scanner(request.headers.get("Content-Type", ""))
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if meter is not None:
                meter.request_bytes = size
            if scanner is not None and scanner.found_in(chunk):
                cut.append(EgressRefusal(400, "method_override_refused", "a form field "
                                         "(_method) would make the upstream read this request "
                                         f"as another method than {request.method}; send "
                                         "that method itself"))
            elif size > _MAX_BODY:
                cut.append(EgressRefusal(413, "body_too_large", f"request bodies are limited "
                                         f"to {_MAX_BODY} bytes"))
            else:
                # A byte budget is judged before each request (an upload may end past it, by
                # at most one body); a token that stops working ends the upload at once.
                gate.usage.bytes += len(chunk)
                if gate.state != "active" or self.clock() >= gate.grant.expires_at:
                    cut.append(EgressRefusal(403, "token_expired" if gate.state == "active"
                                             else f"token_{gate.state}", "the run's session "
                                             "token stopped working during the upload"))
            if cut:
                raise aiohttp.ClientPayloadError("the upload was cut")
            yield chunk

    async def _reply(self, gate: _Gate, request: web.BaseRequest, route: Route,
                     upstream: aiohttp.ClientResponse,
                     meter: CallMeter | None = None) -> web.StreamResponse:
        """The upstream's reply, or a refusal (which the breaker counts, in `_refuse`)."""
        reflection = gate.reflection(route)
        headers_out = [(k, v) for k, v in upstream.headers.items()
                       if k.lower() not in _HOP_BY_HOP]
        encoding = upstream.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise EgressRefusal(502, "upstream_encoding_refused", f"route {route.name} answered "
                                f"with Content-Encoding {clip(encoding, 40)!r}; the gateway "
                                "passes on only bodies it can read", route=route.name)
        if any(reflection.found_in(f"{k}: {v}") for k, v in headers_out) or \
                reflection.found_in(upstream.reason or ""):
            raise _reflected(route, "headers")
        length = upstream.content_length
        priced = bool(route.price_per_token) and "json" in upstream.headers.get(
            "Content-Type", "")
        response: web.StreamResponse
        if priced or (length is not None and length <= _BUFFERED_BODY):
            # One read and one write: most API replies are small and have a length.
            payload = await read_capped(upstream.content, _PRICED_BODY)
            gate.usage.bytes += len(payload)
            if len(payload) > _PRICED_BODY:
                raise EgressRefusal(502, "upstream_reply_too_large", f"route {route.name}: "
                                    f"a priced reply over {_PRICED_BODY} bytes (its tokens are "
                                    "counted from the whole body)", route=route.name)
            if reflection.found_in(payload):
                raise _reflected(route, "body")
            reported = (tokens_in(payload) if priced or "json" in upstream.headers.get(
                "Content-Type", "") else None)
            if meter is not None:
                meter.reply_bytes, meter.tokens = len(payload), reported
            if priced:
                tokens = reported or 0
                gate.usage.tokens += tokens
                gate.usage.spend += tokens * route.price_per_token
            response = web.Response(status=upstream.status, reason=upstream.reason,
                                    body=payload)
            for key, value in headers_out:
                response.headers.add(key, value)
            self._judge(gate, error=upstream.status >= 500)
            return response
        # Streamed (server-sent events, large downloads): passed on as it comes, scanned
        # across chunk boundaries; a reflection found mid-stream ends the connection before
        # any byte of it is sent.
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in headers_out:
            response.headers.add(key, value)
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        guard = reflection.guard()
        if meter is not None and "event-stream" in upstream.headers.get("Content-Type", ""):
            meter.stream = StreamUsage()
        try:
            async for chunk in upstream.content.iter_any():
                if not self.count_tunnel_bytes(gate, len(chunk)):
                    raise ConnectionResetError("cut")
                if meter is not None:
                    meter.reply_bytes += len(chunk)
                    if meter.stream is not None:
                        meter.stream.feed(chunk)
                await response.write(guard.feed(chunk))
            await response.write(guard.finish())
            await response.write_eof()
        except SecretReflected as found:
            with contextlib.suppress(ConnectionError):  # what came ahead of it, then the cut
                await response.write(found.before)
            self._tally(gate, "secret_reflected", route.name, {
                "route": route.name, "where": "streamed body", "method": request.method})
            self._abort(request)
            return response
        except (ConnectionError, aiohttp.ClientError, TimeoutError):
            self._judge(gate, error=True)
            self._abort(request)
            return response
        self._judge(gate, error=upstream.status >= 500)
        return response

    @staticmethod
    def _abort(request: web.BaseRequest) -> None:
        if request.transport is not None:
            request.transport.abort()


def _reflected(route: Route, where: str) -> EgressRefusal:
    return EgressRefusal(502, "secret_reflected", f"route {route.name}'s upstream put the "
                         f"route's secret in its reply {where}; the reply was withheld",
                         route=route.name, where=where)


def _refusal_response(refusal: EgressRefusal, detail: dict[str, Any]) -> web.Response:
    advice = ("retrying may succeed later" if refusal.retry else
              "this is the supervisor's egress policy; retrying will not help")
    body = {"error": {"code": refusal.code, "message": f"{refusal.message} ({advice})",
                      "detail": {"retry": refusal.retry, **detail}}}
    headers = {DENIED_HEADER: refusal.code, **refusal.headers}
    if refusal.status == 407:
        headers["Proxy-Authenticate"] = 'Basic realm="agent-supervisor"'
    return web.json_response(body, status=refusal.status, headers=headers)


def _clipped(detail: dict[str, Any]) -> dict[str, Any]:
    return {k: clip(v) if isinstance(v, str) else v for k, v in detail.items()}


def _authority(authority: str) -> tuple[str, int]:
    """CONNECT's `host:port`, read strictly: an ASCII DNS name (IDNA in its xn-- form) and a
    port; anything else is a 400, never an exception."""
    host, sep, port = authority.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise EgressRefusal(400, "bad_request", "CONNECT needs host:port", target=authority)
    host = host.lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        return host, int(port)  # an IPv6 literal, refused as an address by the caller
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise EgressRefusal(400, "bad_request", "CONNECT needs a DNS name (ASCII; IDNA "
                            "names in their xn-- form)", target=authority)
    return host, int(port)


def _listening_socket(grant: RunGrant) -> socket.socket:
    """Bound to the run's gateway address even before that address exists on the host
    (IP_FREEBIND): on the docker runtime the veth is wired after the engine starts the agent."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)
        sock.bind((grant.host_ip, grant.port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _token_of(header: str) -> str | None:
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        _user, sep, password = decoded.partition(":")
        return password if sep and password else None
    return None


def upstream_ssl_context(config: EgressSection) -> ssl.SSLContext:
    """The system's CAs plus [egress] ca_file; certificates and names always verified."""
    context = ssl.create_default_context()
    if config.ca_file is not None:
        context.load_verify_locations(cafile=str(config.ca_file))
    return context
