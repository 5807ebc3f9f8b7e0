"""An owner's kill SIGKILLed on the owners' socket's acceptor thread, before the event loop
has seen the request (docs/design.md, "Control socket admission"). The thread reads the
connection's first bytes without consuming them (`MSG_PEEK`: the loop reads the same request
afterwards, as it would have), and only when they are a complete `POST /v1/actions/kill` whose
body validates as the handler will validate it (the same model, `api/bodies.py`), from a peer
that holds the kill permission under the roles in force, does it write the targets'
`cgroup.kill` (sandbox/killindex.py). Everything else, and anything it cannot decide at once,
goes the normal way untouched; the loop's kill path then runs as always, with the record of
what was signalled (`PreSignal`). Runs in the daemon (root), on the acceptor's thread."""

from __future__ import annotations

import enum
import logging
import re
import socket
from collections.abc import Callable

from supervisor.api.bodies import decode_body
from supervisor.authz import PERMISSIONS, roles_of
from supervisor.config import RolesSection
from supervisor.errors import SupervisorError
from supervisor.models import ActionRequest, Actor
from supervisor.sandbox.killindex import KillIndex, PreSignal

log = logging.getLogger(__name__)

# At most this much of a request is peeked: a kill's head and body are a few hundred bytes.
PEEK_MAX = 8192
# A connection's first request is waited for this long at most after its accept (an owner
# writes its request right after its connect: microseconds on a quiet host, but a 5 ms and
# then a 20 ms bound were missed under load); what is not whole by then goes the normal way.
# The owners' socket's EARLY_HOLD (api/listener.py) is the same window: for this long after
# its accept an owner's connection is taken for a verb on its way, peeked at here, then
# holding the reads on the loop; past it, it is an ordinary connection. Only a connection
# that has sent nothing, or part of a kill, waits, and the acceptor waits for many at once
# (api/listener.py Acceptor): one that writes nothing, or stalls, holds back no other.
PEEK_WAIT = 0.5
_HEADERS_MAX = 32
_REQUEST_LINE = b"POST /v1/actions/kill HTTP/1.1"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# What the loop's HTTP parser refuses in a header's value (a control character but HTAB):
# a request it answers 400 must not have been SIGKILLed here.
_VALUE_REFUSED = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Headers whose request the thread does not judge: the loop's HTTP layer does (a
# Content-Encoding: the loop inflates the body before the handler reads it).
_NOT_HERE = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"content-encoding"})


class Peeked(enum.Enum):
    INCOMPLETE = "incomplete"  # could still become a kill: peek again
    NOTHING = "nothing"  # no byte written yet: peek again once there is one


def parse_kill(data: bytes, *, max_body: int, max_line: int
               ) -> ActionRequest | Peeked | None:
    """The kill request at the start of `data`, if it is one: INCOMPLETE while it may still
    become one, None when it is not (or not one this thread decides: the loop's way). Bytes
    after its body (a pipelined request) are not looked at."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        if not data.startswith((_REQUEST_LINE + b"\r\n")[:len(data)]):
            return None  # another request: no wait at all
        return Peeked.INCOMPLETE if len(data) < PEEK_MAX else None
    lines = data[:head_end].split(b"\r\n")
    if lines[0] != _REQUEST_LINE or len(lines) > _HEADERS_MAX + 1:
        return None
    length: int | None = None
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if (not sep or len(line) > max_line or not _TOKEN.fullmatch(name)
                or _VALUE_REFUSED.search(value)):
            return None
        name = name.lower()
        if name in _NOT_HERE:
            return None
        if name == b"content-length":
            value = value.strip(b" \t")
            if length is not None or not value.isdigit() or len(value) > 12:
                return None
            length = int(value)
    if length is None or length > max_body:
        return None
    start = head_end + 4
    if len(data) < start + length:
        return Peeked.INCOMPLETE if start + length <= PEEK_MAX else None
    try:
        request: ActionRequest = decode_body(data[start:start + length], ActionRequest)
    except SupervisorError:
        return None
    if not request.reason.strip():  # the handler refuses a kill without a reason
        return None
    return request


def peek_kill(conn: socket.socket, *, max_body: int, max_line: int
              ) -> ActionRequest | Peeked | None:
    """One look at `conn`'s first request, consuming nothing and never waiting: NOTHING or
    INCOMPLETE while it may still become a kill (the caller peeks again, within PEEK_WAIT of
    the accept), else as `parse_kill` (None also when the peer closed)."""
    try:
        data = conn.recv(PEEK_MAX, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return Peeked.NOTHING
    except OSError:
        return None
    if not data:
        return None  # readable without bytes: the peer closed
    return parse_kill(data, max_body=max_body, max_line=max_line)


class PreSigner:
    """The owners' acceptor's pre-signal: `__call__` on the thread, `finish` on the loop."""

    def __init__(self, index: KillIndex, roles: Callable[[], RolesSection], *, max_body: int,
                 max_line: int, finish: Callable[[PreSignal, str], None]) -> None:
        self.index = index
        self.roles = roles  # the roles in force (a reload replaces them)
        self.max_body = max_body
        self.max_line = max_line
        self.finish = finish
        self.sent = 0  # requests pre-signalled since start (for tests and metrics)

    def peek(self, conn: socket.socket) -> ActionRequest | Peeked | None:
        """On the thread: one look at `conn`'s first request (`peek_kill`)."""
        return peek_kill(conn, max_body=self.max_body, max_line=self.max_line)

    def signal(self, request: ActionRequest, actor: Actor, arrived: float
               ) -> PreSignal | None:
        """On the thread: SIGKILL the targets of a kill `peek` judged complete, if `actor`
        may kill under the roles in force; what was signalled (None: nothing)."""
        if not PERMISSIONS["kill"] & roles_of(actor, self.roles()):
            return None  # the middleware refuses it, audited, as it would have
        scope = request.scope
        every = scope.kind == "global"
        targets = self.index.targets(agent=scope.agent, agent_class=scope.agent_class,
                                     every=every)
        if not targets:
            return None
        record = PreSignal(request=request, actor=actor, arrived=arrived)
        self.index.signal(targets, record, parent=every)
        if not record.runs:
            return None  # each ended meanwhile: nothing signalled
        self.sent += 1
        return record
