"""State-changing verbs never queue behind reads: from a verb's complete request (head and body)
to its answer the listener reads nothing else on the control socket and holds reads not yet
started, while the owners' socket is served as before; a stalled body or an idle owner's
connection holds nothing for long (supervisor/api/listener.py, VerbsFirst, EarlyHold)."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from supervisor.api.client import Client, owner_socket_of
from supervisor.api.listener import VERBS_FIRST, VerbsFirst, verb_first
from supervisor.config import ControlSection, KillSection
from supervisor.runtime.fake import FakeRuntime
from tests.unit.conftest import WAIT, ServeFactory, ServerThread

RUN_BODY: dict[str, Any] = {"name": "a1", "class": "web", "command": ["sleep", "infinity"]}
GET_AGENTS = b"GET /v1/agents HTTP/1.1\r\nHost: x\r\n\r\n"


@contextlib.contextmanager
def connection(path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(WAIT)
        sock.connect(str(path))
        yield sock
    finally:
        sock.close()


def answer(sock: socket.socket) -> tuple[int, Any]:
    """One HTTP/1.1 response with a Content-Length, read whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed before an answer"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines
                  if line.lower().startswith("content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in an answer"
        body += chunk
    return int(lines[0].split()[1]), json.loads(body)


def readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def verbs_first_of(server: ServerThread) -> VerbsFirst:
    return server.app[VERBS_FIRST]


def wait_until(server: ServerThread, check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not server.call(lambda: check(verbs_first_of(server))):
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def kill_body(reason: str) -> bytes:
    return json.dumps({"scope": {"agent": "a1"}, "reason": reason}).encode()


def kill_head(body: bytes) -> bytes:
    return (b"POST /v1/actions/kill HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")


def kill_in_flight(serve: ServeFactory, **kwargs: Any) -> tuple[ServerThread, FakeRuntime]:
    """A server with one active agent whose kill stays in flight until the test ends its run
    (`end_run`): the run leaves a survivor, and the kill waits up to WAIT for it to go."""
    runtime = FakeRuntime(leave_survivor=True)
    server = serve(listener=True, runtime=runtime,
                   kill=KillSection(confirm_timeout=WAIT, default_grace=2.0), **kwargs)
    Client(server.socket_path, timeout=WAIT).run(RUN_BODY)
    return server, runtime


@contextlib.contextmanager
def stalled_kill(server: ServerThread, body: bytes
                 ) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A reader's connection, and a killer's that sent a kill's head and all of its body but
    the last byte."""
    with connection(server.socket_path) as reader, \
            connection(server.socket_path) as killer:
        killer.sendall(kill_head(body) + body[:-1])
        yield reader, killer


def end_run(server: ServerThread, runtime: FakeRuntime) -> None:
    """Once the kill has written cgroup.kill (which leaves the survivor), the run ends."""
    deadline = time.monotonic() + WAIT
    while not server.call(lambda: all(h.cgroup.kills for h in runtime.handles.values())):
        assert time.monotonic() < deadline, "the kill never reached cgroup.kill"
        time.sleep(0.01)
    server.call(lambda: [handle.finish(137) for handle in runtime.handles.values()])


def held_total(server: ServerThread) -> int:
    return server.call(lambda: verbs_first_of(server).held_total)


def test_reads_wait_while_a_kill_is_served_and_owners_do_not(serve: ServeFactory) -> None:
    server, runtime = kill_in_flight(serve)
    body = kill_body("verbs first")
    with connection(server.socket_path) as reader, \
            connection(server.socket_path) as killer:
        reader.sendall(GET_AGENTS)
        assert answer(reader)[0] == 200  # the reader's connection is up and kept alive
        killer.sendall(kill_head(body) + body)  # in flight until the run ends
        wait_until(server, lambda vf: vf.holding and vf.paused, "the kill holds the reads")
        reader.sendall(GET_AGENTS)
        with connection(owner_socket_of(server.socket_path)) as owner:
            owner.sendall(GET_AGENTS)
            status, page = answer(owner)  # the owners' socket is never held
        assert status == 200 and [a["name"] for a in page["agents"]] == ["a1"]
        assert not readable(reader, 0.3), "a read was answered while a kill was in flight"
        end_run(server, runtime)
        status, result = answer(killer)
        assert status == 200 and result["results"][0]["new_state"] == "killed"
        status, page = answer(reader)  # served once the kill has answered, and sees it
        assert status == 200 and [a["state"] for a in page["agents"]] == ["killed"]
    wait_until(server, lambda vf: not vf.holding and not vf.paused, "the hold is released")
    # The launch's connection (the client sends a POST to the owners' socket first), the
    # kill, and the owners' read until its head said what it was.
    assert held_total(server) == 3


def control_connections(server: ServerThread) -> int:
    """Connections to the control socket (not the owners') the loop holds."""
    return sum(1 for handler in verbs_first_of(server).connections
               if not getattr(getattr(handler, "peer", None), "on_owner_socket", False))


def test_new_connections_wait_in_the_backlog_while_a_kill_is_served(
        serve: ServeFactory) -> None:
    """While a verb is in flight the control socket's acceptor takes no new connection (no
    user lookups, no adoption on the loop); they are accepted and served after its answer.
    The owners' socket is accepted as before."""
    server, runtime = kill_in_flight(serve)
    body = kill_body("backlog")
    with connection(server.socket_path) as killer:
        killer.sendall(kill_head(body) + body)  # in flight until the run ends
        wait_until(server, lambda vf: vf.holding and not vf.gate.is_open(),
                   "the kill holds the reads and shuts the gate")
        before = server.call(lambda: control_connections(server))
        with connection(server.socket_path) as late, \
                connection(owner_socket_of(server.socket_path)) as owner:
            late.sendall(GET_AGENTS)  # connect() returns: the kernel queued it
            owner.sendall(GET_AGENTS)
            assert answer(owner)[0] == 200  # the owners' socket is accepted and served
            time.sleep(0.3)
            assert not readable(late, 0)
            assert server.call(lambda: control_connections(server)) == before, \
                "a connection to the control socket was accepted while a kill was in flight"
            end_run(server, runtime)
            assert answer(killer)[0] == 200
            status, page = answer(late)  # accepted once the kill has answered
            assert status == 200 and [a["state"] for a in page["agents"]] == ["killed"]
    wait_until(server, lambda vf: not vf.holding and vf.gate.is_open(), "the gate is open")


def test_an_owners_connection_holds_the_reads_until_its_head_arrives(
        serve: ServeFactory) -> None:
    """What an owner sends on the owners' socket is a verb: the reads are held from the
    moment the connection is adopted, not only once the loop has parsed the request (for
    EARLY_HOLD at most, made long here: test_an_idle_owner_holds_the_reads_only_briefly)."""
    server = serve(listener=True)
    assert server.listener is not None
    server.listener.early_hold = 100 * WAIT
    with connection(server.socket_path) as reader:
        reader.sendall(GET_AGENTS)
        assert answer(reader)[0] == 200
        with connection(owner_socket_of(server.socket_path)) as owner:
            wait_until(server, lambda vf: vf.holding and vf.paused, "the owner holds the reads")
            reader.sendall(GET_AGENTS)
            assert not readable(reader, 0.2)
            owner.sendall(GET_AGENTS)  # a read after all: the hold ends with its head
            assert answer(owner)[0] == 200
            assert answer(reader)[0] == 200
            wait_until(server, lambda vf: not vf.holding, "the hold is released")
        with connection(owner_socket_of(server.socket_path)) as owner:
            wait_until(server, lambda vf: vf.holding, "the owner holds the reads")
        # An owner's connection that ends without a request releases them too.
        wait_until(server, lambda vf: not vf.holding and not vf.paused, "the hold is released")
        reader.sendall(GET_AGENTS)
        assert answer(reader)[0] == 200


def test_an_idle_owner_holds_the_reads_only_briefly(serve: ServeFactory) -> None:
    """An owner's connection that sends nothing, or a verb's head and part of its body,
    holds the reads for EARLY_HOLD, not for the header or body timeout (made longer than the
    test here, so only the early hold's own bound can have let the reads go)."""
    server, runtime = kill_in_flight(
        serve, control=ControlSection(header_timeout=3600, body_timeout=3600))
    body = kill_body("idle owner")
    before = held_total(server)
    with connection(server.socket_path) as reader, \
            connection(owner_socket_of(server.socket_path)) as idle, \
            connection(owner_socket_of(server.socket_path)) as stalled:
        stalled.sendall(kill_head(body) + body[:5])
        # Both adopted, each with its early hold (a count: the holds may be over by now).
        wait_until(server, lambda vf: vf.held_total >= before + 2, "the owners' early holds")
        reader.sendall(GET_AGENTS)
        assert answer(reader)[0] == 200  # while both owners' connections are open and idle
        assert not server.call(lambda: verbs_first_of(server).holding)
        # Both connections are still served: the idle one's read, the stalled kill's body.
        idle.sendall(GET_AGENTS)
        assert answer(idle)[0] == 200
        stalled.sendall(body[5:])
        wait_until(server, lambda vf: vf.holding, "the complete kill holds the reads")
        end_run(server, runtime)
        status, result = answer(stalled)
        assert status == 200 and result["results"][0]["new_state"] == "killed"
    wait_until(server, lambda vf: not vf.holding and not vf.paused, "the hold is released")


def test_a_verb_holds_nothing_until_its_body_is_complete(serve: ServeFactory) -> None:
    """A caller who may kill sends a kill's head and stalls its body: the reads go on for
    as long as the body timeout lets it wait, and the hold begins with the last byte."""
    server, runtime = kill_in_flight(serve, control=ControlSection(body_timeout=3600))
    body = kill_body("stalled body")
    before = held_total(server)
    with stalled_kill(server, body) as (reader, killer):
        for _ in range(3):  # the kill's handler has started and waits for the last byte
            reader.sendall(GET_AGENTS)
            assert answer(reader)[0] == 200
        assert held_total(server) == before
        killer.sendall(body[-1:])
        wait_until(server, lambda vf: vf.holding and vf.paused, "the kill holds the reads")
        reader.sendall(GET_AGENTS)
        assert not readable(reader, 0.2)
        end_run(server, runtime)
        assert answer(killer)[0] == 200
        assert answer(reader)[0] == 200
    wait_until(server, lambda vf: not vf.holding and not vf.paused, "the hold is released")
    assert held_total(server) == before + 1


def test_a_body_completed_after_its_timeout_holds_nothing(serve: ServeFactory) -> None:
    """The verb was answered (408) before its body came: the late body is no verb in flight,
    and takes no hold that no answer would ever release."""
    server, _runtime = kill_in_flight(serve, control=ControlSection(body_timeout=0.1))
    body = kill_body("late body")
    before = held_total(server)
    with stalled_kill(server, body) as (reader, killer):
        status, error = answer(killer)
        assert status == 408 and error["error"]["code"] == "request_timeout"
        with contextlib.suppress(OSError):  # the daemon may have closed the connection
            killer.sendall(body[-1:])
        reader.sendall(GET_AGENTS)
        assert answer(reader)[0] == 200
        reader.sendall(GET_AGENTS)
        assert answer(reader)[0] == 200
    assert held_total(server) == before
    assert not server.call(lambda: verbs_first_of(server).holding)
    assert server.call(lambda: verbs_first_of(server).verbs) == {}


def test_a_verb_whose_connection_ends_releases_the_reads(serve: ServeFactory) -> None:
    server, runtime = kill_in_flight(serve)
    body = kill_body("caller gone")
    with connection(server.socket_path) as reader:
        reader.sendall(GET_AGENTS)
        assert answer(reader)[0] == 200
        with connection(server.socket_path) as killer:
            killer.sendall(kill_head(body) + body)
            wait_until(server, lambda vf: vf.holding, "the kill holds the reads")
            reader.sendall(GET_AGENTS)
            assert not readable(reader, 0.2)
        # The kill's caller went away before its answer: nothing may stay held.
        assert answer(reader)[0] == 200
        wait_until(server, lambda vf: not vf.holding and not vf.paused, "the hold is released")
        end_run(server, runtime)
    wait_until(server, lambda vf: not vf.verbs, "the kill is answered")


def test_which_requests_are_served_first() -> None:
    for method, path in [("POST", "/v1/actions/kill"), ("POST", "/v1/actions/pause"),
                         ("POST", "/v1/actions/resume?x=1"), ("POST", "/v1/actions/reactivate")]:
        assert verb_first(method, path), path
    # stop waits out a grace period; reads and other posts are not verbs of the kill path.
    for method, path in [("POST", "/v1/actions/stop"), ("GET", "/v1/actions/kill"),
                         ("GET", "/v1/agents"), ("POST", "/v1/runs"), ("POST", "/v1/reload")]:
        assert not verb_first(method, path), path
