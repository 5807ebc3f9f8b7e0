"""The control sockets' listeners: admission control in front of the API's handlers. Each
listening socket is accepted on a thread of its own, which reads the peer's SO_PEERCRED, applies
the caps on connections in total and per peer uid (owners keep reserved slots beyond the total)
and closes a refused connection at once, so a flood of connects is drained at the kernel's pace
and never reaches the event loop; admitted connections are handed to the loop. Also: the owners'
socket (root or the owners' group only), a header timeout, JSON errors for what the HTTP layer
refuses before a handler runs, the moment each request arrived, and the process's descriptor
limit raised so connections can never exhaust what a kill needs. Runs in the daemon (root).

Why here and not in the handlers: a connection that never completes a request never reaches a
handler, so only the listener can bound it (docs/design.md, "Control socket admission")."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import resource
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from supervisor.api.peers import actor_of, peer_credentials
from supervisor.api.presignal import PEEK_WAIT, Peeked, PreSigner
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
from supervisor.sandbox.killindex import PreSignal

log = logging.getLogger(__name__)

# File descriptors the daemon keeps for itself beyond every admitted connection: SQLite, the
# runs' cgroup files, pidfds, netlink, log files, webhook and metrics sockets.
FD_RESERVE = 4096
# One log line per this many seconds for refused connections, however many there are.
_REFUSAL_LOG_PERIOD = 10.0
# How long a stopping listener waits for requests in flight (a stop's kill path, a follow
# stream's last chunk to a peer that does not read), then as long again for the cancelled
# handlers to end: well under the unit's TimeoutStopSec (30 s), so no caller can hold a stop
# or a restart into systemd's SIGKILL. Idle keep-alive connections are closed at once.
LISTENER_DRAIN = 5.0


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
    on_owner_socket: bool = False
    # The owners' acceptor waited PEEK_WAIT for its first request in vain (or its peer
    # stopped writing before one was whole): it takes no early hold (EarlyHold).
    quiet: bool = False


@dataclass
class Admission:
    """Who is connected, and whether one more may be. `admit` runs on the acceptor threads,
    `bind` and `release` on the loop: the counts are kept under one lock."""

    config: ControlSection
    roles: RolesSection
    budget: int
    peers: dict[RequestHandler, Peer] = field(default_factory=dict)
    per_uid: dict[int, int] = field(default_factory=dict)
    connected: int = 0  # admitted, bound to a handler or on their way to the loop
    on_owner_socket: int = 0
    refused: int = 0
    _last_refusal_log: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, sock: socket.socket, *, owner_socket: bool = False) -> Peer | None:
        """Admit or refuse a new connection (None). A refusal costs one getsockopt (no user or
        group lookups), so a flood is turned away at the rate the kernel hands it over."""
        try:
            pid, uid, gid = peer_credentials(sock)
        except OSError:
            return self._refused("no peer credentials", -1)
        with self._lock:
            if self.connected >= self.budget:
                return self._refused("every connection slot is in use", uid)
            if owner_socket and self.on_owner_socket >= self.config.reserved_connections:
                return self._refused("the owners' socket holds its maximum of connections", uid)
            if uid != 0 and self.per_uid.get(uid, 0) >= self.config.max_connections_per_uid:
                return self._refused("this uid holds its maximum of connections", uid)
        actor = actor_of(pid, uid, gid)  # user and group lookups: outside the lock
        owner = uid == 0 or "owner" in roles_of(actor, self.roles)
        with self._lock:
            if owner_socket and not owner:
                return self._refused("only owners may use the owners' socket", uid)
            if self.connected >= self.config.max_connections and not owner:
                return self._refused("only owners may use the reserved connection slots", uid)
            if self.connected >= self.budget:
                return self._refused("every connection slot is in use", uid)
            self.connected += 1
            self.on_owner_socket += owner_socket
            self.per_uid[uid] = self.per_uid.get(uid, 0) + 1
        return Peer(uid=uid, actor=actor, owner=owner, on_owner_socket=owner_socket)

    def bind(self, handler: RequestHandler, peer: Peer) -> None:
        self.peers[handler] = peer

    def release(self, handler: Any) -> None:
        peer = self.peers.pop(handler, None)
        if peer is not None:
            self.cancel(peer)

    def cancel(self, peer: Peer) -> None:
        """Give an admitted connection's slot back (it closed, or never reached the loop)."""
        with self._lock:
            self.connected -= 1
            self.on_owner_socket -= peer.on_owner_socket
            left = self.per_uid.get(peer.uid, 1) - 1
            if left > 0:
                self.per_uid[peer.uid] = left
            else:
                self.per_uid.pop(peer.uid, None)

    def peer(self, handler: Any) -> Peer | None:
        return self.peers.get(handler)

    def _refused(self, why: str, uid: int) -> Peer | None:
        """Count and (at most once per period) log a refusal; None, the refusal itself."""
        self.refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= _REFUSAL_LOG_PERIOD:
            self._last_refusal_log = now
            log.warning("control socket: refused a connection from uid %d (%s); %d refused "
                        "so far, %d connected", uid, why, self.refused, self.connected)
        return None


# Verbs that hold the reads while they are served: each is bounded by the kill path's own
# timeouts. `stop` is not among them: its grace period may last minutes.
_VERBS_FIRST_PREFIX = "/v1/actions/"
_VERBS_NOT_FIRST = frozenset({"/v1/actions/stop"})


def verb_first(method: str, path: str) -> bool:
    """Whether a request is a state-changing verb that the control loop serves first."""
    path = path.split("?", 1)[0]
    return (method == "POST" and path.startswith(_VERBS_FIRST_PREFIX)
            and path not in _VERBS_NOT_FIRST)


class AcceptGate:
    """Shut while a verb is in flight: the control socket's acceptor leaves new connections in
    the kernel's listen backlog meanwhile (`VerbsFirst`). Shut and opened on the loop, waited
    on by the acceptor's thread through `fileno()` (readable once opened)."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._pipe: tuple[int, int] | None = None  # made for the first acceptor that waits

    def is_open(self) -> bool:
        return self._open.is_set()

    def shut(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()
        with self._lock:
            if self._pipe is not None:
                with contextlib.suppress(OSError):  # full: a wake is pending anyway
                    os.write(self._pipe[1], b"o")

    def fileno(self) -> int:
        with self._lock:
            if self._pipe is None:
                self._pipe = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            return self._pipe[0]

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self.fileno(), 4096):
                pass

    def dispose(self) -> None:
        """Close the pipe (its acceptor has stopped); a later `open` writes nothing."""
        with self._lock:
            pipe, self._pipe = self._pipe, None
        for fd in pipe or ():
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class _Verb:
    """One verb request on a connection, from its head to its answer."""

    held: bool = False  # its body is complete and it holds the reads
    answered: bool = False


class VerbsFirst:
    """State-changing verbs never queue behind reads on the control loop. From the moment a
    verb's request is complete (head and body) until its answer is written, the control
    socket's other connections are not read (their requests wait in the kernel's socket
    buffers, costing the loop nothing), reads already parsed wait before their handlers
    start, and new connections to the control socket are not accepted (`gate`: each one cost
    the acceptor's user and group lookups and the loop an adoption, under the GIL the kill
    needs); the owners' socket's connections are never held. Measured under a flood of
    `GET /v1/agents`: a kill's steps each wait a turn of the loop, and every turn served a
    batch of reads first, with the readers' own processes taking the CPU the kill needed
    (docs/benchmarks.md). Only a complete request holds: a caller who sends a verb's head and
    stalls its body holds nothing while the body timeout runs (a verb is served at once when
    complete, so the hold lasts as long as the verb's own work). Every hold is released by the
    verb's answer (`answered`) or by its connection's end (`lost`), so none can outlive its
    request. Runs on the loop only."""

    def __init__(self) -> None:
        self.connections: dict[RequestHandler, asyncio.Transport] = {}
        self.holds: dict[Any, int] = {}  # verbs in flight, by connection (or its socket)
        # Verb requests parsed on each connection and not yet answered, oldest first (a
        # connection's requests are handled one at a time, in order).
        self.verbs: dict[RequestHandler, collections.deque[_Verb]] = {}
        self.paused: set[RequestHandler] = set()
        self.held_total = 0  # verbs that held the reads, since start (for tests and metrics)
        self._open = asyncio.Event()
        self._open.set()
        self.gate = AcceptGate()

    @property
    def holding(self) -> bool:
        return bool(self.holds)

    def connected(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        self.connections[handler] = transport
        if self.holds:
            self._pause(handler, transport)

    def lost(self, handler: RequestHandler) -> None:
        self.connections.pop(handler, None)
        self.paused.discard(handler)
        for verb in self.verbs.pop(handler, ()):
            verb.answered = True  # a body completing now takes no hold
        if self.holds.pop(handler, 0):
            self._maybe_resume()

    def verb_arrived(self, handler: RequestHandler, payload: Any) -> None:
        """A verb's request head was parsed on `handler`'s connection: it holds the reads
        once its body is complete (at once when it has none), on the loop turn that
        completes it, if it is not answered by then (a body timeout) nor its connection
        gone."""
        verb = _Verb()
        self.verbs.setdefault(handler, collections.deque()).append(verb)

        def complete() -> None:
            if not verb.answered and handler in self.connections:
                verb.held = True
                self.hold(handler)

        payload.on_eof(complete)

    def incomplete(self, handler: RequestHandler) -> bool:
        """Whether a verb parsed on `handler`'s connection still waits for its body."""
        return any(not v.held and not v.answered for v in self.verbs.get(handler, ()))

    def answered(self, handler: Any) -> None:
        """The oldest verb on `handler`'s connection is answered (or its request failed):
        its hold ends, and a body of it that completes later takes none."""
        verbs = self.verbs.get(handler)
        if not verbs:
            return
        verb = verbs.popleft()
        if not verbs:
            del self.verbs[handler]
        verb.answered = True
        if verb.held:
            self.release(handler)

    def hold(self, handler: Any) -> None:
        """A verb's request is complete on `handler`'s connection, or (keyed by its socket)
        a connection to the owners' socket is being adopted (EarlyHold)."""
        first = not self.holds
        self.holds[handler] = self.holds.get(handler, 0) + 1
        self.held_total += 1
        if first:
            self._open.clear()
            self.gate.shut()
            for other, transport in self.connections.items():
                self._pause(other, transport)
        self.paused.discard(handler)

    def release(self, handler: Any) -> None:
        """One hold taken with `hold(handler)` ends."""
        left = self.holds.get(handler, 0) - 1
        if left < 0:
            return
        if left:
            self.holds[handler] = left
        else:
            del self.holds[handler]
        self._maybe_resume()

    async def reads_may_go(self, handler: Any) -> None:
        """Until no verb is in flight, for a read on the control socket (at once on the
        owners' socket)."""
        peer = getattr(handler, "peer", None)
        if peer is None or not peer.on_owner_socket:
            await self._open.wait()

    def _pause(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        peer = getattr(handler, "peer", None)
        if handler in self.holds or (peer is not None and peer.on_owner_socket):
            return
        if transport.is_closing() or not transport.is_reading():
            return
        transport.pause_reading()
        self.paused.add(handler)

    def _maybe_resume(self) -> None:
        if self.holds:
            return
        self._open.set()
        self.gate.open()
        for handler in self.paused:
            transport = self.connections.get(handler)
            # aiohttp's own flow control may hold the transport too: leave that to it.
            if (transport is None or transport.is_closing()
                    or getattr(handler, "_buffer_paused", False)
                    or getattr(handler, "_reading_paused", False)):
                continue
            transport.resume_reading()
        self.paused.clear()


# How long an owner's connection holds the reads before its first request is complete. What an
# owner sends on the owners' socket is almost always a verb, written right after its connect:
# held from the adoption, the verb waits for no batch of reads the loop still has before it
# parses the request. An idle or stalled owner's connection holds no longer than this. With
# a pre-signal (the daemon's owners' socket), the same window is the acceptor's PEEK_WAIT: a
# connection whose first request has not come by its end is handed over without a hold.
EARLY_HOLD = PEEK_WAIT


class EarlyHold:
    """The hold an owner's connection takes when it is adopted (keyed by its socket), until
    its first request is complete (a verb then holds by itself), is something else, the
    connection ends, or `bound` seconds pass. Release is idempotent."""

    def __init__(self, verbs_first: VerbsFirst, key: socket.socket,
                 loop: asyncio.AbstractEventLoop, bound: float) -> None:
        self._verbs_first: VerbsFirst | None = verbs_first
        self._key = key
        verbs_first.hold(key)
        self._timer = loop.call_later(bound, self.release)

    def release(self) -> None:
        verbs_first, self._verbs_first = self._verbs_first, None
        if verbs_first is not None:
            self._timer.cancel()
            verbs_first.release(self._key)


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering what its HTTP parser refuses (a bad request
    line, an over-long path or header) with our JSON error instead of text/plain, and logging
    it once at debug level instead of a traceback per request."""

    __slots__ = ("_arrivals", "_head_started", "_heads", "early_hold", "peer", "presignal",
                 "verbs_first")

    def __init__(self, *args: Any, verbs_first: VerbsFirst | None = None, **kwargs: Any
                 ) -> None:
        super().__init__(*args, **kwargs)
        self.peer: Peer | None = None
        self.verbs_first = verbs_first
        # The owners' socket: the hold taken when the connection was adopted, until the
        # first request is complete or says it is no verb (EarlyHold).
        self.early_hold: EarlyHold | None = None
        # When each parsed request began to arrive (perf_counter), oldest first; the first
        # request of a connection began when the connection was accepted.
        self._arrivals: collections.deque[float] = collections.deque(maxlen=64)
        self._head_started: float | None = None
        self._heads = 0  # request heads parsed on this connection
        # What the owners' acceptor SIGKILLed for this connection's first request, until
        # that request takes it (`take_presignal`) or the connection ends without it.
        self.presignal: PreSignal | None = None

    def take_presignal(self) -> PreSignal | None:
        presignal, self.presignal = self.presignal, None
        return presignal

    def accepted(self, peer: Peer, accepted_at: float) -> None:
        self.peer = peer
        self._head_started = accepted_at

    def data_received(self, data: bytes) -> None:
        if self._head_started is None:
            self._head_started = time.perf_counter()
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:  # a request head is complete
            self._arrivals.extend([self._head_started] * (len(self._messages) - queued))
            self._heads += len(self._messages) - queued
            self._head_started = None
            if self.verbs_first is not None:
                for index in range(queued, len(self._messages)):
                    message, payload = self._messages[index]
                    if verb_first(getattr(message, "method", ""), getattr(message, "path", "")):
                        self.verbs_first.verb_arrived(self, payload)
        # A verb whose body this completed holds by now (VerbsFirst.verb_arrived); an owner's
        # early hold lasts while its first request is a verb still waiting for its body.
        if (self.early_hold is not None and self.verbs_first is not None
                and self._heads and not self.verbs_first.incomplete(self)):
            self.release_early_hold()

    def release_early_hold(self) -> None:
        if self.early_hold is not None:
            self.early_hold.release()
        self.early_hold = None

    def arrived(self) -> float | None:
        """When the request now being handled began to arrive (None if unknown)."""
        return self._arrivals.popleft() if self._arrivals else None

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
    """aiohttp's low-level server; its connections come from the acceptors, admitted."""

    admission: Admission
    verbs_first: VerbsFirst | None = None
    presigner: PreSigner | None = None

    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, verbs_first=self.verbs_first,
                                       **self._kwargs)

    def accepted(self, peer: Peer, accepted_at: float, early_hold: EarlyHold | None = None,
                 presignal: PreSignal | None = None) -> JsonErrorRequestHandler:
        handler = JsonErrorRequestHandler(self, loop=self._loop, verbs_first=self.verbs_first,
                                          **self._kwargs)
        handler.accepted(peer, accepted_at)
        handler.early_hold = early_hold
        handler.presignal = presignal
        return handler

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        peer = getattr(handler, "peer", None)
        if peer is None:  # not from an acceptor: nothing admitted it
            handler.force_close()
            transport.abort()
            return
        self.admission.bind(handler, peer)
        if self.verbs_first is not None:
            self.verbs_first.connected(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None
                        ) -> None:
        self.admission.release(handler)
        if self.verbs_first is not None:
            self.verbs_first.lost(handler)
        if isinstance(handler, JsonErrorRequestHandler):
            handler.release_early_hold()
            presignal = handler.take_presignal()
            if presignal is not None and self.presigner is not None:
                self.presigner.finish(presignal, "its connection ended before the request "
                                                 "was handled")
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
        server.verbs_first = self.app.get(VERBS_FIRST)
        server.presigner = self.app.get(PRESIGNER)
        return server


# Pauses of an acceptor whose accept(2) failed for want of a resource (EMFILE, ENOBUFS, ...):
# the connection waits in the backlog meanwhile, and a kill still has break-glass.
_ACCEPT_BACKOFF = 0.05
_ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass
class _Peeking:
    """An owners' connection whose first request the acceptor is still waiting for."""

    conn: socket.socket
    peer: Peer
    accepted_at: float
    deadline: float  # perf_counter: handed over as it is then


# Connections accepted per wake before the acceptor looks at the ones it is peeking at: a flood
# of connects cannot keep it from a waiting kill's bytes (nor those from the next accept).
_ACCEPT_BATCH = 64
# A peeked connection is watched edge-triggered: its POLLIN stays up while bytes that are no
# whole request yet sit unread (the peek consumes nothing), and an edge comes with each new
# arrival, so a stalled head costs the thread nothing until its next bytes or its deadline.
_PEEKED_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_ENDED = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


class Acceptor:
    """Accepts one listening socket's connections on a thread of its own and hands each
    admitted one to the loop (`hand_over`, called on the thread). A refused connection is
    closed on the thread: a flood of connects costs the loop nothing, and a kill's connect on
    another socket never waits for the loop to work through it.

    With `presign` (the owners' socket), an admitted connection's first request is peeked at
    before the hand-over: an owner's kill is SIGKILLed here (api/presignal.py), and what was
    signalled goes to the loop with the connection. The thread waits for no one connection's
    bytes: one whose request is not there yet, or not whole, joins the descriptors it polls
    beside the listening socket, each with its own deadline (PEEK_WAIT after its accept), and
    is peeked at again when bytes arrive (never by time); it is handed over the moment its
    first request is decided (a whole kill: signalled first; anything else: at once), when its
    peer stops writing, or at its deadline. So an owner that connects and writes nothing, or
    stalls, never holds back another owner's accept or kill; the connections waited on are
    admitted ones, at most the owners' socket's cap (`reserved_connections`)."""

    def __init__(self, name: str, sock: socket.socket, admission: Admission,
                 hand_over: Callable[[socket.socket, Peer, float, PreSignal | None], None], *,
                 owner_socket: bool = False, gate: AcceptGate | None = None,
                 presign: PreSigner | None = None) -> None:
        self.name = name
        self.sock = sock
        self.admission = admission
        self.hand_over = hand_over
        self.owner_socket = owner_socket
        self.gate = gate  # shut: leave connections in the backlog (VerbsFirst)
        self.presign = presign
        # By descriptor, in the order accepted, hence of deadline (each PEEK_WAIT after its
        # accept): the first is always the next due. The thread's own.
        self._peeking: dict[int, _Peeking] = {}
        self._poller = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def peeking(self) -> int:
        """Connections whose first request is being waited for (for tests and metrics)."""
        return len(self._peeking)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._poller.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        poller = self._poller
        poller.register(self.sock.fileno(), select.EPOLLIN)
        poller.register(self._wake_r, select.EPOLLIN)
        gate = self.gate
        watching = True
        if gate is not None:
            poller.register(gate.fileno(), select.EPOLLIN)
        try:
            while True:
                events = dict(poller.poll(self._poll_timeout()))
                if self._wake_r in events:
                    return
                if gate is not None:
                    if gate.fileno() in events:
                        gate.drain()
                    if gate.is_open() != watching:  # level-triggered: unwatch while shut
                        watching = gate.is_open()
                        if watching:
                            poller.register(self.sock.fileno(), select.EPOLLIN)
                        else:
                            poller.unregister(self.sock.fileno())
                if watching:
                    self._drain()
                if self._peeking:
                    self._peek_again(events)
        finally:
            for waiting in list(self._peeking.values()):  # stopped: never reach the loop
                self._forget(waiting)
                waiting.conn.close()
                self.admission.cancel(waiting.peer)

    def _poll_timeout(self) -> float:
        """Seconds until the first deadline among the connections peeked at (-1: none)."""
        for waiting in self._peeking.values():
            return max(0.0, waiting.deadline - time.perf_counter())
        return -1

    def _drain(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            if self.gate is not None and not self.gate.is_open():
                return
            try:
                conn, _address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_ERRORS:
                    log.error("control socket %s: accept failed (%s); retrying", self.name, exc)
                    time.sleep(_ACCEPT_BACKOFF)
                elif exc.errno != errno.ECONNABORTED:
                    log.error("control socket %s: accept failed: %s", self.name, exc)
                    time.sleep(_ACCEPT_BACKOFF)
                return
            accepted_at = time.perf_counter()
            peer = self.admission.admit(conn, owner_socket=self.owner_socket)
            if peer is None:
                conn.close()
                continue
            if self.presign is None:
                self._hand(conn, peer, accepted_at, None)
            else:
                self._peek(_Peeking(conn, peer, accepted_at, accepted_at + PEEK_WAIT), 0)

    def _peek_again(self, events: dict[int, int]) -> None:
        """Peek at the connections whose bytes came or whose peer stopped writing, then hand
        over those whose deadline has passed (one last look first)."""
        for fd, mask in events.items():
            waiting = self._peeking.get(fd)
            if waiting is not None:
                self._peek(waiting, mask)
        now = time.perf_counter()
        while self._peeking:
            waiting = next(iter(self._peeking.values()))
            if waiting.deadline > now:
                return
            self._peek(waiting, 0)

    def _peek(self, waiting: _Peeking, mask: int) -> None:
        """Judge `waiting`'s first request as it is now: hand it over (signalled, if a whole
        kill) once judged, ended or due, else wait on for its next bytes."""
        assert self.presign is not None
        presignal = None
        try:
            verdict = self.presign.peek(waiting.conn)
            if isinstance(verdict, Peeked):
                if not mask & _ENDED and time.perf_counter() < waiting.deadline:
                    self._wait(waiting)
                    return
                # Due, or its peer stopped writing: the loop's as it is, with no early hold
                # (its window, EARLY_HOLD after the accept, is over: ControlListener._adopt).
                waiting.peer.quiet = True
            elif verdict is not None:
                presignal = self.presign.signal(verdict, waiting.peer.actor,
                                                waiting.accepted_at)
        except Exception:  # the request goes the normal way; what was signalled is
            # settled by its runs' exit watchers (daemon/presignalled.py settle)
            log.exception("control socket %s: the pre-signal failed", self.name)
        self._forget(waiting)
        self._hand(waiting.conn, waiting.peer, waiting.accepted_at, presignal)

    def _wait(self, waiting: _Peeking) -> None:
        fd = waiting.conn.fileno()
        if fd not in self._peeking:
            # Bytes that came since the look are reported at once (epoll_ctl looks too).
            self._poller.register(fd, _PEEKED_EVENTS)
            self._peeking[fd] = waiting

    def _forget(self, waiting: _Peeking) -> None:
        """Stop waiting on `waiting` (before its descriptor leaves this thread)."""
        fd = waiting.conn.fileno()
        if self._peeking.pop(fd, None) is not None:
            self._poller.unregister(fd)

    def _hand(self, conn: socket.socket, peer: Peer, accepted_at: float,
              presignal: PreSignal | None) -> None:
        try:
            self.hand_over(conn, peer, accepted_at, presignal)
        except RuntimeError:  # the loop is closed: the daemon is stopping
            conn.close()
            self.admission.cancel(peer)
            if presignal is not None:  # the index held only runs its shutdown left
                log.critical("control socket %s: runs %s SIGKILLed for a request the "
                             "stopped loop never saw", self.name, sorted(presignal.runs))


class ControlListener:
    """The control socket (and the owners' socket, when given) served with admission control;
    start() after the app is built."""

    def __init__(self, app: web.Application, sock: socket.socket, config: ControlSection,
                 roles: RolesSection, owner_sock: socket.socket | None = None,
                 presigner: PreSigner | None = None) -> None:
        soft, _hard = raise_fd_limit()
        self.admission = Admission(config=config, roles=roles,
                                   budget=connection_budget(config, soft))
        app[ADMISSION] = self.admission
        self.presigner = presigner
        if presigner is not None:
            app[PRESIGNER] = presigner
        self.runner = ControlRunner(
            app, self.admission,
            # aiohttp closes a connection that has not completed a request head this long
            # after it connected or after its last response: the header timeout (slowloris).
            keepalive_timeout=config.header_timeout,
            max_line_size=config.max_line, max_field_size=config.max_line,
            shutdown_timeout=LISTENER_DRAIN)
        self.sock = sock
        self.owner_sock = owner_sock
        self.config = config
        self.acceptors: list[Acceptor] = []
        self.early_hold = EARLY_HOLD  # seconds (EarlyHold)
        self._adopting: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        await self.runner.setup()
        server = self.runner.server
        assert isinstance(server, ControlHttpServer)
        self._loop = asyncio.get_running_loop()
        # A deep backlog: connects that will be refused must not fill the queue another
        # connect waits in (the acceptor drains it at the kernel's pace).
        self.sock.listen(self.config.backlog)
        self.acceptors.append(Acceptor(
            "control-accept", self.sock, self.admission, self._hand_over,
            gate=server.verbs_first.gate if server.verbs_first is not None else None))
        if self.owner_sock is not None:
            self.owner_sock.listen(128)
            self.acceptors.append(Acceptor("owner-accept", self.owner_sock, self.admission,
                                           self._hand_over, owner_socket=True,
                                           presign=self.presigner))
        for acceptor in self.acceptors:
            acceptor.start()
        log.info("control socket: %d connections (%d per uid, %d reserved for owners), "
                 "header timeout %gs; owners' socket %s", self.admission.budget,
                 self.config.max_connections_per_uid, self.config.reserved_connections,
                 self.config.header_timeout, "on" if self.owner_sock is not None else "off")

    def _hand_over(self, conn: socket.socket, peer: Peer, accepted_at: float,
                   presignal: PreSignal | None = None) -> None:
        """On an acceptor's thread: the loop takes the connection on its next turn."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._adopt, conn, peer, accepted_at, presignal)

    def _adopt(self, conn: socket.socket, peer: Peer, accepted_at: float,
               presignal: PreSignal | None = None) -> None:
        server = self.runner.server
        if not isinstance(server, ControlHttpServer):  # stopped meanwhile
            conn.close()
            self.admission.cancel(peer)
            self._unheard(presignal, "the control socket was stopping")
            return
        assert self._loop is not None
        early_hold = None
        if peer.on_owner_socket and not peer.quiet and server.verbs_first is not None:
            early_hold = EarlyHold(server.verbs_first, conn, self._loop, self.early_hold)
        made: list[JsonErrorRequestHandler] = []

        def protocol() -> JsonErrorRequestHandler:
            made.append(server.accepted(peer, accepted_at, early_hold, presignal))
            return made[-1]

        task = self._loop.create_task(self._loop.connect_accepted_socket(protocol, sock=conn))
        self._adopting.add(task)
        task.add_done_callback(lambda done: self._adopted(done, conn, peer, early_hold,
                                                          presignal, made))

    def _adopted(self, task: asyncio.Task[Any], conn: socket.socket, peer: Peer,
                 early_hold: EarlyHold | None, presignal: PreSignal | None,
                 made: list[JsonErrorRequestHandler]) -> None:
        self._adopting.discard(task)
        if task.cancelled() or task.exception() is not None:
            conn.close()
            self.admission.cancel(peer)
            if early_hold is not None:
                early_hold.release()
            # Not yet taken by a request (the handler made, if any, holds it until then).
            self._unheard(made[0].take_presignal() if made else presignal,
                          "its connection could not be adopted")

    def _unheard(self, presignal: PreSignal | None, why: str) -> None:
        if presignal is not None and self.presigner is not None:
            self.presigner.finish(presignal, why)

    async def stop(self) -> None:
        """Stop accepting, close idle connections, wait LISTENER_DRAIN for requests in flight,
        cancel what is left (follow streams are ended before: server.py FollowStreams)."""
        for acceptor in self.acceptors:
            acceptor.stop()
            if acceptor.gate is not None:
                acceptor.gate.dispose()
        for sock in (self.sock, self.owner_sock):
            if sock is not None:
                sock.close()
        await self.runner.cleanup()


ADMISSION = web.AppKey("admission", Admission)
PRESIGNER = web.AppKey("presigner", PreSigner)
VERBS_FIRST = web.AppKey("verbs_first", VerbsFirst)
