"""The control socket's listener: admission control in front of the API's handlers. Caps on
connections in total and per peer uid (owners keep reserved slots beyond the total), a header
timeout, JSON errors for what the HTTP layer refuses before a handler runs, and the process's
file-descriptor limit raised so connections can never exhaust what a kill needs. Runs in the
daemon (root); reads each peer's SO_PEERCRED once, when it connects.

Why here and not in the handlers: a connection that never completes a request never reaches a
handler, so only the listener can bound it (docs/design.md, "Control socket admission")."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from supervisor.api.peers import actor_of, peer_credentials
from supervisor.authz import roles_of
from supervisor.config import ControlSection, RolesSection
from supervisor.errors import (
    BadHttpRequest,
    BodyTooLarge,
    HeadersTooLarge,
    SupervisorError,
    UriTooLong,
)
from supervisor.models import Actor

log = logging.getLogger(__name__)

# File descriptors the daemon keeps for itself beyond every admitted connection: SQLite, the
# runs' cgroup files, pidfds, netlink, log files, webhook and metrics sockets.
FD_RESERVE = 4096
# One log line per this many seconds for refused connections, however many there are.
_REFUSAL_LOG_PERIOD = 10.0


def raise_fd_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; (soft, hard) as they now are."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, hard, exc)
    return soft, hard


def connection_budget(config: ControlSection, fd_limit: int) -> int:
    """Connections admitted in total (owners' reserved slots included), so that the daemon
    always keeps FD_RESERVE descriptors for everything else."""
    wanted = config.max_connections + config.reserved_connections
    return max(1, min(wanted, fd_limit - FD_RESERVE))


@dataclass
class Peer:
    """One connection's peer, as SO_PEERCRED reported it when it connected."""

    uid: int
    actor: Actor
    owner: bool


@dataclass
class Admission:
    """Who is connected, and whether one more may be."""

    config: ControlSection
    roles: RolesSection
    budget: int
    peers: dict[RequestHandler, Peer] = field(default_factory=dict)
    per_uid: dict[int, int] = field(default_factory=dict)
    refused: int = 0
    _last_refusal_log: float = 0.0

    def admit(self, handler: RequestHandler, transport: asyncio.Transport) -> bool:
        """Admit or refuse a new connection. A refusal costs one getsockopt (no user or group
        lookups), so a flood is turned away at the rate the loop accepts it."""
        sock: socket.socket | None = transport.get_extra_info("socket")
        if sock is None:
            return self._refuse("no socket", -1)
        try:
            pid, uid, gid = peer_credentials(sock)
        except OSError:
            return self._refuse("no peer credentials", -1)
        total = len(self.peers)
        if total >= self.budget:
            return self._refuse("every connection slot is in use", uid)
        if uid != 0 and self.per_uid.get(uid, 0) >= self.config.max_connections_per_uid:
            return self._refuse("this uid holds its maximum of connections", uid)
        actor = actor_of(pid, uid, gid)
        owner = uid == 0 or "owner" in roles_of(actor, self.roles)
        if total >= self.config.max_connections and not owner:
            return self._refuse("only owners may use the reserved connection slots", uid)
        self.peers[handler] = Peer(uid=uid, actor=actor, owner=owner)
        self.per_uid[uid] = self.per_uid.get(uid, 0) + 1
        return True

    def release(self, handler: RequestHandler) -> None:
        peer = self.peers.pop(handler, None)
        if peer is None:
            return
        left = self.per_uid.get(peer.uid, 1) - 1
        if left > 0:
            self.per_uid[peer.uid] = left
        else:
            self.per_uid.pop(peer.uid, None)

    def peer(self, handler: Any) -> Peer | None:
        return self.peers.get(handler)

    def _refuse(self, why: str, uid: int) -> bool:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= _REFUSAL_LOG_PERIOD:
            self._last_refusal_log = now
            log.warning("control socket: refused a connection from uid %d (%s); %d refused "
                        "so far, %d connected", uid, why, self.refused, len(self.peers))
        return False


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering what its HTTP parser refuses (a bad request
    line, an over-long path or header) with our JSON error instead of text/plain, and logging
    it once at debug level instead of a traceback per request."""

    __slots__ = ()

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None
                     ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent; the connection is dropped")
        self.log_debug("control socket: refused a request: %s", exc or message)
        error = http_layer_error(status, exc, message)
        response = web.json_response(error.to_body(), status=error.http_status)
        response.force_close()
        return response


def http_layer_error(status: int, exc: BaseException | None, message: str | None
                     ) -> SupervisorError:
    text = str(getattr(exc, "message", None) or message or "").strip() or "bad request"
    if isinstance(exc, LineTooLong):
        # The parser names no part; what it quotes tells: a request target starts with "/".
        line = exc.args[0] if exc.args else b""
        if isinstance(line, bytes | bytearray | str) and line[:1] in (b"/", "/"):
            return UriTooLong("the request path is too long", limit=exc.args[1])
        return HeadersTooLarge("a request header is too long", limit=exc.args[1])
    if status == 413:
        return BodyTooLarge("the request body is too large")
    if status >= 500:
        return SupervisorError("internal error")
    return BadHttpRequest(f"the request could not be parsed: {text[:200]}")


class ControlHttpServer(web.Server):
    """aiohttp's low-level server with admission at connect time."""

    admission: Admission

    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if not self.admission.admit(handler, transport):
            # Closed before the handler reads a byte: the fd is freed at once, and the
            # connection's task (started next) finds it closed and ends.
            handler.force_close()
            transport.abort()

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None
                        ) -> None:
        self.admission.release(handler)
        super().connection_lost(handler, exc)


class ControlRunner(web.AppRunner):
    """An AppRunner whose server is a ControlHttpServer."""

    def __init__(self, app: web.Application, admission: Admission, **kwargs: Any) -> None:
        super().__init__(app, handle_signals=False, access_log=None, **kwargs)
        self.admission = admission

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The app's own handler and request factory, served by our subclass (same layout).
        server.__class__ = ControlHttpServer
        assert isinstance(server, ControlHttpServer)
        server.admission = self.admission
        return server


class ControlListener:
    """The control socket served with admission control; start() after the app is built."""

    def __init__(self, app: web.Application, sock: socket.socket, config: ControlSection,
                 roles: RolesSection) -> None:
        soft, _hard = raise_fd_limit()
        self.admission = Admission(config=config, roles=roles,
                                   budget=connection_budget(config, soft))
        app[ADMISSION] = self.admission
        self.runner = ControlRunner(
            app, self.admission,
            # aiohttp closes a connection that has not completed a request head this long
            # after it connected or after its last response: the header timeout (slowloris).
            keepalive_timeout=config.header_timeout,
            max_line_size=config.max_line, max_field_size=config.max_line)
        self.sock = sock
        self.config = config
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        await self.runner.setup()
        server = self.runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        # A deep backlog: a flood of connects that are refused at once must not fill the
        # queue an owner's connect waits in.
        self._server = await loop.create_unix_server(server, sock=self.sock,
                                                     backlog=self.config.backlog)
        log.info("control socket: %d connections (%d per uid, %d reserved for owners), "
                 "header timeout %gs", self.admission.budget,
                 self.config.max_connections_per_uid, self.config.reserved_connections,
                 self.config.header_timeout)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.runner.cleanup()


ADMISSION = web.AppKey("admission", Admission)
