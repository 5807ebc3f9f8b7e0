"""State-changing verbs never queue behind reads: from a verb's request head to its answer the
listener reads nothing else on the control socket and holds reads not yet started, while the
owners' socket is served as before (supervisor/api/listener.py, VerbsFirst)."""

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


def kill_head(body: bytes) -> bytes:
    return (b"POST /v1/actions/kill HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")


def test_reads_wait_while_a_kill_is_served_and_owners_do_not(serve: ServeFactory) -> None:
    server = serve(listener=True)
    Client(server.socket_path, timeout=WAIT).run(RUN_BODY)
    body = json.dumps({"scope": {"agent": "a1"}, "reason": "verbs first"}).encode()
    with connection(server.socket_path) as reader, \
            connection(server.socket_path) as killer:
        reader.sendall(GET_AGENTS)
        assert answer(reader)[0] == 200  # the reader's connection is up and kept alive
        # The kill's head alone: its handler waits for the body, the verb is in flight.
        killer.sendall(kill_head(body))
        wait_until(server, lambda vf: vf.holding and vf.paused, "the kill holds the reads")
        reader.sendall(GET_AGENTS)
        with connection(owner_socket_of(server.socket_path)) as owner:
            owner.sendall(GET_AGENTS)
            status, page = answer(owner)  # the owners' socket is never held
        assert status == 200 and [a["state"] for a in page["agents"]] == ["active"]
        assert not readable(reader, 0.3), "a read was answered while a kill was in flight"
        killer.sendall(body)
        status, result = answer(killer)
        assert status == 200 and result["results"][0]["new_state"] == "killed"
        status, page = answer(reader)  # served once the kill has answered, and sees it
        assert status == 200 and [a["state"] for a in page["agents"]] == ["killed"]
    wait_until(server, lambda vf: not vf.holding and not vf.paused, "the hold is released")
    # The launch's connection (the client sends a POST to the owners' socket first), the
    # kill's head, and the owners' read until its head said what it was.
    assert server.call(lambda: verbs_first_of(server).held_total) == 3


def test_an_owners_connection_holds_the_reads_until_its_head_arrives(
        serve: ServeFactory) -> None:
    """What an owner sends on the owners' socket is a verb: the reads are held from the
    moment the connection is adopted, not only once the loop has parsed the head."""
    server = serve(listener=True)
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


def test_a_verb_whose_connection_ends_releases_the_reads(serve: ServeFactory) -> None:
    server = serve(listener=True)
    Client(server.socket_path, timeout=WAIT).run(RUN_BODY)
    with connection(server.socket_path) as reader:
        reader.sendall(GET_AGENTS)
        assert answer(reader)[0] == 200
        with connection(server.socket_path) as killer:
            killer.sendall(kill_head(b"{}"))
            wait_until(server, lambda vf: vf.holding, "the kill holds the reads")
            reader.sendall(GET_AGENTS)
            assert not readable(reader, 0.2)
        # The kill's caller went away before its body: nothing may stay held.
        assert answer(reader)[0] == 200
    wait_until(server, lambda vf: not vf.holding and not vf.paused, "the hold is released")


def test_which_requests_are_served_first() -> None:
    for method, path in [("POST", "/v1/actions/kill"), ("POST", "/v1/actions/pause"),
                         ("POST", "/v1/actions/resume?x=1"), ("POST", "/v1/actions/reactivate")]:
        assert verb_first(method, path), path
    # stop waits out a grace period; reads and other posts are not verbs of the kill path.
    for method, path in [("POST", "/v1/actions/stop"), ("GET", "/v1/actions/kill"),
                         ("GET", "/v1/agents"), ("POST", "/v1/runs"), ("POST", "/v1/reload")]:
        assert not verb_first(method, path), path
