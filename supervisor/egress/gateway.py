"""The egress gateway: an HTTP proxy (aiohttp's low-level server and client) in a thread of its
own, with one listener per run on the host end of that run's veth. Needs root only for what the
daemon set up around it (the veth and the nftables rules); the proxy itself binds an address.

Every request must carry the run's session token (Proxy-Authorization). `CONNECT host:port`
tunnels only to allow-listed names, which the gateway resolves itself; plain-HTTP requests go
only to credential routes, which are forwarded over TLS with the real secret added here, so
the secret never enters the sandbox. Budgets, the circuit breaker and approval holds are judged
on every request; a revoked or suspended token cuts open tunnels and connections at once.

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
import hmac
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal, Protocol, TypeVar

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from aiohttp.web_protocol import RequestHandler
from yarl import URL

from supervisor.config import EgressSection
from supervisor.egress.accounting import BreakerState, Ceiling, Usage, tokens_in
from supervisor.egress.grant import Decision, RunGrant
from supervisor.models.egress import is_ip_literal

log = logging.getLogger(__name__)

DENIED_HEADER = "X-Agent-Supervisor-Denied"
_HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authorization", "Proxy-Authenticate", "Proxy-Connection",
    "TE", "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length"))
_TUNNEL_HIGH_WATER = 1024 * 1024
_MAX_BODY = 64 * 1024 * 1024
_BUFFERED_BODY = 1024 * 1024  # replies up to this size with a known length go in one write
_IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # linux/in.h; Python 3.12 names it
T = TypeVar("T")

GateState = Literal["active", "suspended", "revoked"]


class GatewaySink(Protocol):
    """The daemon's side. Called in the gateway's thread; must not block."""

    def budget_exceeded(self, run_id: str, detail: dict[str, Any]) -> None: ...
    def breaker_tripped(self, run_id: str, detail: dict[str, Any]) -> None: ...
    def denied(self, run_id: str, code: str, detail: dict[str, Any]) -> None: ...
    def request_approval(self, run_id: str, method: str, host: str, path: str, rule: str
                         ) -> concurrent.futures.Future[Decision]: ...


class EgressRefusal(Exception):
    """Raised inside a handler; rendered as the structured refusal the agent sees."""

    def __init__(self, status: int, code: str, message: str, *, retry: bool = False,
                 **detail: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry = retry
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
        self.tunnels: set[asyncio.Transport] = set()

    def agent_total(self) -> Usage:
        return self.grant.agent_usage.add(self.usage)


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

    async def open(self, grant: RunGrant) -> None:
        """Listen for `grant`'s run on its host address (called from the daemon's loop)."""
        await asyncio.wrap_future(self._submit(self._open(grant)))

    async def close(self, run_id: str) -> Usage | None:
        """Revoke, cut every connection, stop listening; the run's final usage."""
        self.revoke(run_id)
        return await asyncio.wrap_future(self._submit(self._close(run_id)))

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
            gate.state = state
        if state != "active" and self._loop is not None:
            self._loop.call_soon_threadsafe(self._cut, gate)

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
        return Usage(**vars(gate.usage)) if gate else None

    def listening(self, run_id: str) -> bool:
        gate = self.gates.get(run_id)
        return gate is not None and gate.listener is not None and gate.listener.is_serving()

    # ------------------------------------------------------------------ the gateway's loop

    async def _open_session(self) -> None:
        self._resolver = _Resolver(self.config.hosts)
        connector = aiohttp.TCPConnector(ssl=self._ssl, resolver=self._resolver,
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

    async def _open(self, grant: RunGrant) -> None:
        gate = _Gate(grant, self.clock())
        server = web.Server(self._handler(gate), max_field_size=self.config.max_header_size,
                            max_line_size=self.config.max_header_size,
                            keepalive_timeout=self.config.header_timeout,
                            access_log=None)
        gate.server = server
        limit = self.config.max_connections_per_run

        def factory() -> asyncio.Protocol:
            if len(server.connections) >= limit:
                return _Refuse()
            return server()

        loop = asyncio.get_running_loop()
        gate.listener = await loop.create_server(factory, sock=_listening_socket(grant))
        with self._lock:
            self.gates[grant.run_id] = gate

    async def _close(self, run_id: str) -> Usage | None:
        with self._lock:
            gate = self.gates.pop(run_id, None)
        if gate is None:
            return None
        gate.state = "revoked"
        if gate.listener is not None:
            gate.listener.close()
        self._cut(gate)
        if gate.listener is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(gate.listener.wait_closed(), 2)
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
                self._authorize(gate, request)
                if request.method == "CONNECT":
                    return await self._tunnel(gate, request)
                return await self._forward(gate, request)
            except EgressRefusal as refusal:
                return self._refuse(gate, request, refusal)
        return handle

    def _refuse(self, gate: _Gate, request: web.BaseRequest,
                refusal: EgressRefusal) -> web.Response:
        gate.usage.denied += 1
        target = request.path if request.method != "CONNECT" else request.url.raw_authority
        detail = {"method": request.method, "target": str(target)[:300], **refusal.detail}
        self.sink.denied(gate.grant.run_id, refusal.code, detail)
        advice = ("retrying may succeed later" if refusal.retry else
                  "this is the supervisor's egress policy; retrying will not help")
        body = {"error": {"code": refusal.code, "message": f"{refusal.message} ({advice})",
                          "detail": {"retry": refusal.retry, **detail}}}
        headers = {DENIED_HEADER: refusal.code}
        if refusal.status == 407:
            headers["Proxy-Authenticate"] = 'Basic realm="agent-supervisor"'
        response = web.json_response(body, status=refusal.status, headers=headers)
        if request.method == "CONNECT":
            response.force_close()
        return response

    def _authorize(self, gate: _Gate, request: web.BaseRequest) -> None:
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
        if gate.state == "suspended":
            raise EgressRefusal(403, "token_suspended", "this run's session token is suspended "
                                "while the agent is paused", retry=True)
        if self.clock() >= gate.grant.expires_at:
            raise EgressRefusal(403, "token_expired", "this run's session token has expired",
                                expired_at=gate.grant.expires_at)
        if gate.breaker.tripped:
            raise EgressRefusal(503, "breaker_open", f"the circuit breaker is open: "
                                f"{gate.breaker.tripped}; an operator must reset it")
        self._check_budget(gate)

    def _check_budget(self, gate: _Gate) -> None:
        budget = gate.grant.policy.budget
        which, over = "run", gate.usage.over(budget.run)
        if over is None:
            which, over = "agent", gate.agent_total().over(budget.agent)
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
        """Count tunnelled bytes; False (cut the tunnel) once revoked or over budget."""
        gate.usage.bytes += n
        if gate.state != "active":
            return False
        budget = gate.grant.policy.budget
        for which, usage, limit in (("run", gate.usage, budget.run.bytes),
                                    ("agent", gate.agent_total(), budget.agent.bytes)):
            if limit is not None and usage.bytes >= limit:
                self._budget_fired(gate, which, Ceiling("bytes", usage.bytes, limit))
                return False
        return True

    def _judge(self, gate: _Gate, error: bool) -> None:
        if error:
            gate.usage.errors += 1
        reason = gate.breaker.record(self.clock(), error)
        if reason:
            self.sink.breaker_tripped(gate.grant.run_id, {
                "reason": reason, "usage": gate.usage.as_dict()})

    async def _hold(self, gate: _Gate, method: str, host: str, path: str) -> None:
        rule = gate.grant.policy.approval_rule(method, host, path)
        if rule is None:
            return
        future = self.sink.request_approval(gate.grant.run_id, method, host, path, str(rule))
        try:
            decision = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise
        if not decision.approved:
            raise EgressRefusal(403, "approval_denied",
                                f"an operator's approval was required ({rule}) and was not "
                                f"given: {decision.reason or 'denied'}",
                                approval=decision.approval_id, by=decision.by)
        if gate.state != "active":
            raise EgressRefusal(403, f"token_{gate.state}", "the run's session token stopped "
                                "working while the request was held")

    async def _tunnel(self, gate: _Gate, request: web.BaseRequest) -> web.StreamResponse:
        host, port = request.url.raw_host or "", request.url.port or 0
        if not host or not port:
            raise EgressRefusal(400, "bad_request", "CONNECT needs host:port")
        if is_ip_literal(host):
            raise EgressRefusal(403, "egress_denied", f"{host} is an IP address; the gateway "
                                "only tunnels to allow-listed names", host=host, port=port)
        if gate.grant.policy.allowed(host, port) is None:
            raise EgressRefusal(403, "egress_denied", f"{host}:{port} is not on this agent's "
                                "allow-list", host=host, port=port)
        gate.usage.requests += 1
        await self._hold(gate, "CONNECT", host, "")
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
            raise EgressRefusal(403, "token_revoked", "the run's token was revoked")
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
            client.close()
        return response

    async def _forward(self, gate: _Gate, request: web.BaseRequest) -> web.StreamResponse:
        host = (request.url.host or request.host or "").split(":")[0].lower()
        route = gate.grant.policy.route_for(host)
        if route is None:
            raise EgressRefusal(403, "egress_denied", f"no credential route for {host!r}; "
                                "plain HTTP goes only to routes, anything else through "
                                "CONNECT to an allow-listed name", host=host)
        gate.usage.requests += 1
        # Rules are judged on exactly the path that is sent: normalised once, here.
        target = _canonical(request.url.raw_path_qs)
        await self._hold(gate, request.method, host, target.path)
        body = await _read_body(request)
        gate.usage.bytes += len(body)
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in _HOP_BY_HOP and k.lower() != route.header.lower()}
        headers[route.header] = route.header_value(gate.grant.secrets[route.name])
        url = URL(route.upstream.rstrip("/") + target.raw_path_qs, encoded=True)
        gate.usage.spend += route.price_per_call
        assert self._session is not None
        try:
            upstream = await self._session.request(request.method, url, headers=headers,
                                                   data=body or None, allow_redirects=False)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self._judge(gate, error=True)
            raise EgressRefusal(502, "upstream_unreachable", f"route {route.name}: "
                                f"{type(exc).__name__}: {exc}", retry=True,
                                route=route.name) from None
        async with upstream:
            headers_out = [(k, v) for k, v in upstream.headers.items()
                           if k.lower() not in _HOP_BY_HOP]
            length = upstream.content_length
            priced = bool(route.price_per_token) and "json" in upstream.headers.get(
                "Content-Type", "")
            response: web.StreamResponse
            if priced or (length is not None and length <= _BUFFERED_BODY):
                # One read and one write: most API replies are small and have a length.
                payload = await upstream.read()
                gate.usage.bytes += len(payload)
                if priced:
                    tokens = tokens_in(payload) or 0
                    gate.usage.tokens += tokens
                    gate.usage.spend += tokens * route.price_per_token
                response = web.Response(status=upstream.status, reason=upstream.reason,
                                        body=payload)
                for key, value in headers_out:
                    response.headers.add(key, value)
            else:  # streamed (server-sent events, large downloads): passed on as it comes
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for key, value in headers_out:
                    response.headers.add(key, value)
                if length is not None:
                    response.content_length = length
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    gate.usage.bytes += len(chunk)
                    await response.write(chunk)
                await response.write_eof()
        self._judge(gate, error=upstream.status >= 500)
        return response


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


def _canonical(raw_path_qs: str) -> URL:
    """The request's path with dot segments resolved (as yarl, and then the upstream, would).
    A dot segment still there after that was percent-encoded to slip past a rule: refused."""
    if not raw_path_qs.startswith("/"):
        raw_path_qs = "/" + raw_path_qs
    target = URL("http://route" + raw_path_qs, encoded=True)
    if any(segment in (".", "..") for segment in target.path.split("/")):
        raise EgressRefusal(400, "bad_request", "encoded dot segments are not allowed in a "
                            "route's path", path=raw_path_qs[:300])
    return target


async def _read_body(request: web.BaseRequest) -> bytes:
    if not request.body_exists:
        return b""
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > _MAX_BODY:
            raise EgressRefusal(413, "body_too_large", f"request bodies are limited to "
                                f"{_MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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
