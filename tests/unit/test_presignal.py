"""The owners' acceptor's SIGKILL (api/presignal.py, sandbox/killindex.py,
daemon/presignalled.py): the peek parser judges only a complete, valid kill and leaves
everything else to the loop; the kill index never writes a descriptor after its close,
whatever thread closes it; and runs signalled for a request whose kill path did not take them
are killed, audited and finalised as killed, not as exited. The arbiter runs over the fake
runtime; descriptors are pipes. No root."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from supervisor.api import listener
from supervisor.api.listener import Acceptor, Admission, Peer
from supervisor.api.presignal import PEEK_MAX, Peeked, PreSigner, parse_kill, peek_kill
from supervisor.config import ControlSection, RolesSection
from supervisor.daemon import presignalled
from supervisor.errors import GlobalHalt
from supervisor.models import ActionRequest, RunRequest, Scope
from supervisor.sandbox.killindex import KillIndex, PreSignal
from tests.support.sockets import listening_unix_socket
from tests.unit.conftest import ALICE, WAIT, ArbiterEnv

LIMITS = {"max_body": 262144, "max_line": 8190}


def kill(scope: dict[str, Any], reason: str = "why", *, path: bytes = b"/v1/actions/kill",
         extra: bytes = b"", body: bytes | None = None) -> bytes:
    raw = json.dumps({"scope": scope, "reason": reason}).encode() if body is None else body
    return (b"POST " + path + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
            b"\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(raw) + raw)


# ----------------------------------------------------------------------------- the parser


@pytest.mark.parametrize("scope", [{"agent": "a1"}, {"class": "c"}, {"all": True}])
def test_a_complete_kill_is_parsed_with_the_handlers_model(scope: dict[str, Any]) -> None:
    parsed = parse_kill(kill(scope), **LIMITS)
    assert isinstance(parsed, ActionRequest)
    assert parsed.scope == Scope.model_validate(scope) and parsed.reason == "why"


def test_a_pipelined_request_after_the_kill_is_not_looked_at() -> None:
    data = kill({"class": "c"}) + b"GET /v1/agents HTTP/1.1\r\nHost: x\r\n\r\n"
    parsed = parse_kill(data, **LIMITS)
    assert isinstance(parsed, ActionRequest) and parsed.scope.agent_class == "c"


def test_every_prefix_of_a_kill_is_incomplete() -> None:
    data = kill({"agent": "a1"})
    for end in range(1, len(data)):
        assert parse_kill(data[:end], **LIMITS) is Peeked.INCOMPLETE, data[:end]


@pytest.mark.parametrize("data", [
    b"G", b"GET /v1/agents HTTP/1.1\r\n\r\n", b"POST /v1/actions/pause",
    b"POST /v1/actions/kil ", b"POST /v1/actions/killx HTTP/1.1\r\n",
])
def test_another_request_is_left_to_the_loop_at_its_first_bytes(data: bytes) -> None:
    assert parse_kill(data, **LIMITS) is None


@pytest.mark.parametrize("data", [
    kill({"agent": "a1"}, path=b"/v1/actions/pause"),
    kill({"agent": "a1"}, path=b"/v1/actions/kill?x=1"),
    kill({"agent": "a1"}, reason=""),  # the handler refuses it
    kill({"agent": "a1"}, reason="   "),
    kill({}, body=b'{"scope": {"agent": "a1"}, "reason": "x"'),  # bad JSON
    kill({}, body=b'{"scope": {"agent": "a1", "class": "c"}, "reason": "x"}'),  # two scopes
    kill({}, body=b'{"scope": {"agent": "a1"}, "reason": "x", "force": true}'),  # extra field
    kill({}, body=b'{"scope": {"agent": "a1"}, "reason": "x", "grace": NaN}'),
    kill({}, body=b"[" * 40 + b"]" * 40),  # nested beyond the limit
    kill({"agent": "a1"}, extra=b"Transfer-Encoding: chunked\r\n"),
    kill({"agent": "a1"}, extra=b"Expect: 100-continue\r\n"),
    kill({"agent": "a1"}, extra=b"Content-Length: 5\r\n"),  # a second length
    kill({"agent": "a1"}, extra=b"Bad Header: x\r\n"),
    # The loop's HTTP layer reads these otherwise: it inflates an encoded body, and refuses
    # a control character in a header's value (400) after the acceptor had SIGKILLed.
    kill({"agent": "a1"}, extra=b"Content-Encoding: gzip\r\n"),
    kill({"agent": "a1"}, extra=b"X-A: a\x01b\r\n"),
    kill({"agent": "a1"}, extra=b"X-A: a\x7fb\r\n"),
    kill({"agent": "a1"}, extra=b"X-Long: " + b"a" * 9000 + b"\r\n"),
    kill({"agent": "a1"}).replace(b"HTTP/1.1", b"HTTP/1.0"),
    b"POST /v1/actions/kill HTTP/1.1\r\nHost: x\r\n\r\n",  # no body at all
    b"POST /v1/actions/kill HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/actions/kill HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n",  # over max_body
])
def test_what_the_thread_cannot_decide_goes_the_normal_way(data: bytes) -> None:
    assert parse_kill(data, **LIMITS) is None


def test_a_body_larger_than_a_peek_is_left_to_the_loop() -> None:
    reason = "x" * (PEEK_MAX + 10)
    data = kill({"agent": "a1"}, reason=reason)
    assert parse_kill(data[:PEEK_MAX], **LIMITS) is None
    assert parse_kill(b"POST /v1/actions/kill HTTP/1.1\r\n" + b"X: y\r\n" * 2000, **LIMITS) \
        is None


def test_the_peek_consumes_nothing_and_never_waits() -> None:
    """One look, never a wait: the acceptor waits for many connections' bytes at once, each
    at most PEEK_WAIT (test_a_silent_or_stalled_owner_never_holds_back_another_owners_kill)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert peek_kill(ours, **LIMITS) is Peeked.NOTHING  # nothing written
        data = kill({"class": "c"})
        theirs.sendall(data[:20])
        assert peek_kill(ours, **LIMITS) is Peeked.INCOMPLETE
        theirs.sendall(data[20:])
        parsed = peek_kill(ours, **LIMITS)
        assert isinstance(parsed, ActionRequest) and parsed.scope.agent_class == "c"
        assert ours.recv(65536, socket.MSG_DONTWAIT) == data  # all still there for the loop
        theirs.sendall(data[:30])  # a stalled body: not judged, nothing consumed
        assert peek_kill(ours, **LIMITS) is Peeked.INCOMPLETE
        assert ours.recv(65536, socket.MSG_DONTWAIT) == data[:30]
        theirs.close()
        assert peek_kill(ours, **LIMITS) is None  # the peer gone


# ----------------------------------------------------------------------------- the index


class Held:
    """A cgroup whose held `cgroup.kill` is a pipe's write end."""

    def __init__(self) -> None:
        self.read, self.write = os.pipe()

    def held_file(self, name: str) -> int | None:
        return self.write if name == "cgroup.kill" else None

    def written(self) -> bytes:
        os.set_blocking(self.read, False)
        try:
            return os.read(self.read, 4096)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        for fd in (self.read, self.write):
            os.close(fd)


def record(scope: dict[str, Any]) -> PreSignal:
    return PreSignal(request=ActionRequest(scope=Scope.model_validate(scope), reason="why"),
                     actor=ALICE, arrived=time.perf_counter())


def test_the_index_signals_by_agent_class_and_parent() -> None:
    index = KillIndex()
    cgroups = {run: Held() for run in ("r1", "r2", "r3", "parent")}
    try:
        index.add("r1", "a1", "c", cgroups["r1"])
        index.add("r2", "a2", "c", cgroups["r2"])
        index.add("r3", "a3", "d", cgroups["r3"])
        index.hold_parent(cgroups["parent"])
        for cgroup in cgroups.values():
            os.close(cgroup.write)  # the owner's own descriptor closed: the index has copies
            cgroup.write = -1
        sent = record({"class": "c"})
        index.signal(index.targets(agent_class="c"), sent, parent=False)
        assert sent.runs == {"r1": "a1", "r2": "a2"}
        assert sent.mechanism == {"r1": "cgroup.kill", "r2": "cgroup.kill"}
        assert [cgroups[r].written() for r in ("r1", "r2", "r3")] == [b"1", b"1", b""]
        assert index.signalled("r1") is sent and index.signalled("r3") is None
        every = record({"all": True})
        index.signal(index.targets(every=True), every, parent=True)
        assert set(every.mechanism.values()) == {"cgroup.kill (parent)"}
        assert cgroups["parent"].written() == b"1" and cgroups["r3"].written() == b""
        assert [t.run_id for t in index.targets(agent="a3")] == ["r3"]
    finally:
        index.close()
        for cgroup in cgroups.values():
            os.close(cgroup.read)


def test_the_index_hushes_the_seccomp_listener_once_every_write_is_done() -> None:
    """The kernel's kill starts at the first write, so nothing comes before the writes:
    the listener's hush (a wake of its thread) follows them, for the signalled runs that
    have a container, and says so in the record (the loop's sweep does not ask again). A
    hush that fails leaves the kill sent and the record without hushed runs."""
    index = KillIndex()
    cgroups = {run: Held() for run in ("r1", "r2", "r3")}
    asked: list[tuple[list[str], list[bytes]]] = []

    def hush(container_ids: list[str]) -> None:
        asked.append((container_ids, [cgroups[r].written() for r in ("r1", "r2", "r3")]))

    try:
        index.add("r1", "a1", "c", cgroups["r1"], container_id="k1")
        index.add("r2", "a2", "c", cgroups["r2"], container_id="k2")
        index.add("r3", "a3", "c", cgroups["r3"])  # no container: nothing to hush
        index.hush = hush
        sent = record({"class": "c"})
        index.signal(index.targets(agent_class="c"), sent, parent=False)
        assert asked == [(["k1", "k2"], [b"1", b"1", b"1"])], "hushed before a write"
        assert sent.hushed == {"r1", "r2"} and set(sent.runs) == {"r1", "r2", "r3"}

        def broken(container_ids: list[str]) -> None:
            raise RuntimeError("listener gone")

        index.hush = broken
        again = record({"class": "c"})
        index.signal(index.targets(agent_class="c"), again, parent=False)
        assert again.hushed == set()
        assert again.mechanism == {"r1": "cgroup.kill", "r2": "cgroup.kill",
                                   "r3": "cgroup.kill"}
        assert [cgroups[r].written() for r in ("r1", "r2", "r3")] == [b"1", b"1", b"1"]
    finally:
        index.close()
        for cgroup in cgroups.values():
            os.close(cgroup.read)
            os.close(cgroup.write)


def test_a_removed_runs_descriptor_is_never_written_once_its_number_is_reused() -> None:
    index = KillIndex()
    old = Held()
    index.add("r1", "a1", "c", old)
    targets = index.targets(agent="a1")  # taken by the thread before the loop removes it
    index.remove("r1")
    old.close()
    reused = [os.pipe() for _ in range(8)]  # among them, the copy's number again
    try:
        sent = record({"agent": "a1"})
        index.signal(targets, sent, parent=False)
        assert sent.runs == {} and index.signalled("r1") is None
        for read, _write in reused:
            os.set_blocking(read, False)
            with pytest.raises(BlockingIOError):
                os.read(read, 16)
    finally:
        for pair in reused:
            for fd in pair:
                os.close(fd)


def test_signals_racing_launches_and_ends_write_only_live_copies() -> None:
    index = KillIndex()
    stop = threading.Event()
    hits = [0]

    def acceptor() -> None:
        while not stop.is_set():
            one = record({"class": "c"})
            index.signal(index.targets(agent_class="c"), one, parent=False)
            hits[0] += bool(one.runs)

    thread = threading.Thread(target=acceptor)
    thread.start()
    strays: list[bytes] = []
    try:
        for round_ in range(300):
            cgroup = Held()
            index.add(f"r{round_}", "a", "c", cgroup)
            os.close(cgroup.write)
            time.sleep(0.0002 * (round_ % 3))  # now and then the acceptor finds it live
            index.remove(f"r{round_}")
            # A pipe made now may get the copy's number: no write may land in it.
            read, write = os.pipe()
            os.set_blocking(read, False)
            time.sleep(0)
            with_data = b""
            with contextlib.suppress(BlockingIOError):
                with_data = os.read(read, 16)
            strays.append(with_data)
            os.close(read)
            os.close(write)
            cgroup.written()
            os.close(cgroup.read)
    finally:
        stop.set()
        thread.join(WAIT)
        index.close()
    assert not any(strays)
    assert hits[0] > 0  # the race was run: some signals hit live copies


# ----------------------------------------------------------------------------- the loop's side


def test_runs_signalled_for_a_request_that_never_killed_them_are_killed_and_audited(
        env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        views = [await arbiter.launch(RunRequest.model_validate(
            {"name": name, "class": "c", "command": ["sleep", "infinity"]}), ALICE)
            for name in ("a1", "a2")]
        held = {view.id: Held() for view in views}
        for view in views:
            arbiter.kill_index.add(view.id, view.agent, "c", held[view.id])
        sent = record({"class": "c"})
        arbiter.kill_index.signal(arbiter.kill_index.targets(agent_class="c"), sent,
                                  parent=False)
        assert set(sent.runs) == {view.id for view in views}
        # The first run's init dies of it before the loop has seen the request: its exit
        # watcher must not end it as exited.
        env.runtime.handles[views[0].id].finish(137)
        await asyncio.sleep(0.05)
        assert views[0].id in arbiter.live and arbiter.live[views[0].id].ending is None
        # The request's handler failed before its kill path: the loop settles the record.
        presignalled.finish(arbiter, sent, "its handler failed")
        await asyncio.wait_for(sent.settled.wait(), WAIT)
        for view in views:
            await asyncio.wait_for(arbiter.settled(view.id), WAIT)
            run = env.store.run(view.id)
            assert run is not None and (run.state, run.end_cause) == ("killed", "killed"), run
            assert arbiter.agents[view.agent].state == "killed"
        rows = [e for e in env.audit.list(limit=100) if e.verb == "kill"]
        assert {row.target for row in rows} == {"a1", "a2"}
        for row in rows:
            assert row.detail["sigkill"]["at"] == "owners_acceptor"
            assert "its handler failed" in (row.reason or "")
        assert len(arbiter.kill_index) == 0
        for cgroup in held.values():
            assert cgroup.written() == b"1"
            cgroup.close()

    asyncio.run(body())


def test_a_request_whose_kill_took_its_runs_leaves_nothing_to_settle(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(RunRequest.model_validate(
            {"name": "a1", "class": "c", "command": ["sleep", "infinity"]}), ALICE)
        other = await arbiter.launch(RunRequest.model_validate(
            {"name": "b1", "class": "d", "command": ["sleep", "infinity"]}), ALICE)
        held = {run: Held() for run in (view.id, other.id)}
        arbiter.kill_index.add(view.id, "a1", "c", held[view.id])
        # b1 indexed under a class it no longer has: the thread signals it, the loop's
        # kill of class c does not take it.
        arbiter.kill_index.add(other.id, "b1", "c", held[other.id])
        sent = record({"class": "c"})
        arbiter.kill_index.signal(arbiter.kill_index.targets(agent_class="c"), sent,
                                  parent=False)
        result = await arbiter.act("kill", sent.request, ALICE, arrived=sent.arrived,
                                   presignal=sent)
        assert [r.agent for r in result.results] == ["a1"]
        assert sent.claimed == {view.id}
        presignalled.finish(arbiter, sent, "its kill path did not take it")
        await asyncio.wait_for(sent.settled.wait(), WAIT)
        for run_id in (view.id, other.id):
            await asyncio.wait_for(arbiter.settled(run_id), WAIT)
            run = env.store.run(run_id)
            assert run is not None and run.state == "killed", run
        rows = {e.target: e for e in env.audit.list(limit=100) if e.verb == "kill"}
        assert rows["a1"].reason == "why" and rows["b1"].reason != "why"
        assert rows["b1"].detail["sigkill"]["at"] == "owners_acceptor"
        # Once more: nothing happens twice.
        presignalled.finish(arbiter, sent, "again")
        assert len([e for e in env.audit.list(limit=100) if e.verb == "kill"]) == 2
        for cgroup in held.values():
            cgroup.close()

    asyncio.run(body())


def test_a_global_kill_the_loop_never_handled_leaves_the_global_halt_in_force(
        env: ArbiterEnv) -> None:
    """Every run SIGKILLed at the acceptor for `all=true`, its request never handled (the
    connection gone, refused by the HTTP layer): the global halt is in force, on record,
    and a launch is refused, as after a global kill the loop handled."""
    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(RunRequest.model_validate(
            {"name": "a1", "class": "c", "command": ["sleep", "infinity"]}), ALICE)
        held = Held()
        arbiter.kill_index.add(view.id, view.agent, "c", held)
        sent = record({"all": True})
        arbiter.kill_index.signal(arbiter.kill_index.targets(every=True), sent, parent=False)
        presignalled.finish(arbiter, sent, "its connection ended before the request was "
                                           "handled")
        await asyncio.wait_for(sent.settled.wait(), WAIT)
        await asyncio.wait_for(arbiter.settled(view.id), WAIT)
        run = env.store.run(view.id)
        assert run is not None and run.state == "killed", run
        assert arbiter.global_halt is True
        halts = [e for e in env.audit.list(limit=100) if e.verb == "global_halt"]
        assert len(halts) == 1 and halts[0].actor == ALICE.label(), halts
        assert halts[0].detail["why"] == ("its connection ended before the request was "
                                          "handled")
        with pytest.raises(GlobalHalt):
            await arbiter.launch(RunRequest.model_validate(
                {"name": "a2", "command": ["sleep", "infinity"]}), ALICE)
        held.close()

    asyncio.run(body())


def test_a_signalled_run_that_ended_first_gets_a_row_of_its_own(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        view = await arbiter.launch(RunRequest.model_validate(
            {"name": "a1", "class": "c", "command": ["sleep", "infinity"]}), ALICE)
        cgroup = Held()
        arbiter.kill_index.add(view.id, "a1", "c", cgroup)
        sent = record({"agent": "a1"})
        arbiter.kill_index.signal(arbiter.kill_index.targets(agent="a1"), sent, parent=False)
        # Another kill (a tripwire's, say) ends the run before the request reaches the loop.
        await arbiter.act("kill", ActionRequest(scope=Scope(agent="a1"), reason="other"),
                          ALICE)
        presignalled.finish(arbiter, sent, "the connection ended first")
        await asyncio.wait_for(sent.settled.wait(), WAIT)
        [row] = [e for e in env.audit.list(limit=100) if e.verb == "acceptor_sigkill"]
        assert row.outcome == "unclaimed" and row.detail["runs"] == {view.id: "a1"}
        assert row.detail["sigkill"][view.id]["at"] == "owners_acceptor"
        cgroup.close()

    asyncio.run(body())


# ----------------------------------------------------------------------------- the acceptor


def test_a_silent_or_stalled_owner_never_holds_back_another_owners_kill(tmp_path: Any) -> None:
    """The acceptor waits for no connection's bytes in front of another's: an owner that
    connects and writes nothing, or stalls in the middle of a kill's head, is peeked at beside
    the next connections, and a complete kill behind them is SIGKILLed and handed over first."""
    index = KillIndex()
    cgroup = Held()
    index.add("r1", "a1", "c", cgroup)
    roles = RolesSection(owner=[f"user:{os.getuid()}"])
    admission = Admission(config=ControlSection(), roles=roles, budget=64)
    signer = PreSigner(index, lambda: roles, finish=lambda *_: None, **LIMITS)
    handed: list[tuple[bytes, PreSignal | None]] = []
    done = threading.Event()

    def hand_over(conn: socket.socket, peer: Peer, _at: float,
                  presignal: PreSignal | None) -> None:
        with conn:
            handed.append((conn.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                           if presignal is not None else b"", presignal))
        admission.cancel(peer)
        if len(handed) == 3:
            done.set()

    path = str(tmp_path / "owner.sock")
    listening = listening_unix_socket(path)
    clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    acceptor = Acceptor("owner-accept", listening, admission, hand_over, owner_socket=True,
                        presign=signer)
    try:
        _silent, stalled, killer = clients
        data = kill({"agent": "a1"})
        for client in clients:  # all three in the backlog, the kill last, before any accept
            client.connect(path)
        stalled.sendall(data[:40])
        killer.sendall(data)
        acceptor.start()
        assert done.wait(WAIT)
        # The kill first, signalled; the two others after their peek's wait, unsignalled.
        assert handed[0][0] == data and handed[0][1] is not None
        assert set(handed[0][1].runs) == {"r1"} and cgroup.written() == b"1"
        assert [presignal for _data, presignal in handed[1:]] == [None, None]
        assert signer.sent == 1
    finally:
        acceptor.stop()
        for client in clients:
            client.close()
        listening.close()
        index.close()
        cgroup.close()
    assert admission.connected == 0


def test_a_stopped_acceptor_closes_the_connections_it_was_peeking_at(tmp_path: Any) -> None:
    roles = RolesSection(owner=[f"user:{os.getuid()}"])
    admission = Admission(config=ControlSection(), roles=roles, budget=64)
    index = KillIndex()
    signer = PreSigner(index, lambda: roles, finish=lambda *_: None, **LIMITS)
    handed: list[Peer] = []
    path = str(tmp_path / "owner.sock")
    listening = listening_unix_socket(path)
    acceptor = Acceptor("owner-accept", listening, admission,
                        lambda conn, peer, _at, _ps: (handed.append(peer), conn.close()),
                        owner_socket=True, presign=signer)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(path)
        client.sendall(kill({"agent": "a1"})[:40])  # a kill's head, stalled
        acceptor.start()
        # Admitted, then either still peeked at when the stop comes (closed by it, its slot
        # given back) or handed over after its wait (the loop's then).
        for _ in range(int(WAIT / 0.001)):
            if admission.connected:
                break
            time.sleep(0.001)
        assert admission.connected == 1
        acceptor.stop()
        assert admission.connected == len(handed)
        if not handed:  # closed by the acceptor (reset: its bytes were left unread)
            client.settimeout(WAIT)
            with contextlib.suppress(ConnectionResetError):
                assert client.recv(1) == b""
    listening.close()
    index.close()


class OwnersAcceptor:
    """A real owners' acceptor thread on a real Unix socket, pre-signalling into an index
    with one run (`r1` of agent `a1`, class `c`, its cgroup.kill a pipe); what it hands over
    is queued, in order, for the test to take."""

    def __init__(self, tmp_path: Any, *, reserved: int = 32) -> None:
        self.index = KillIndex()
        self.cgroup = Held()
        self.index.add("r1", "a1", "c", self.cgroup)
        roles = RolesSection(owner=[f"user:{os.getuid()}"])
        self.admission = Admission(config=ControlSection(reserved_connections=reserved),
                                   roles=roles, budget=64)
        self.signer = PreSigner(self.index, lambda: roles, finish=lambda *_: None, **LIMITS)
        self.peeks: dict[int, int] = {}  # looks at each connection, by its descriptor
        peek = self.signer.peek

        def counted(conn: socket.socket) -> ActionRequest | Peeked | None:
            self.peeks[conn.fileno()] = self.peeks.get(conn.fileno(), 0) + 1
            return peek(conn)

        self.signer.peek = counted  # type: ignore[method-assign]
        self.handed: queue.Queue[tuple[socket.socket, Peer, float, PreSignal | None]] = \
            queue.Queue()
        self.path = str(tmp_path / "owner.sock")
        self.listening = listening_unix_socket(self.path)
        self.acceptor = Acceptor("owner-accept", self.listening, self.admission,
                                 lambda *handed: self.handed.put(handed), owner_socket=True,
                                 presign=self.signer)
        self.clients: list[socket.socket] = []
        self.taken: list[socket.socket] = []
        self.acceptor.start()

    def connect(self) -> socket.socket:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.clients.append(client)
        client.connect(self.path)
        return client

    def peeking(self, count: int) -> None:
        """Until `count` connections are waited on (their accept and first look are done)."""
        for _ in range(int(WAIT / 0.001)):
            if self.acceptor.peeking == count:
                return
            time.sleep(0.001)
        raise AssertionError(f"{self.acceptor.peeking} connections peeked at, not {count}")

    def take(self) -> tuple[socket.socket, Peer, float, PreSignal | None]:
        conn, peer, at, presignal = self.handed.get(timeout=WAIT)
        self.taken.append(conn)
        self.admission.cancel(peer)
        return conn, peer, at, presignal

    def close(self) -> None:
        self.acceptor.stop()
        for sock in [*self.clients, *self.taken, self.listening]:
            sock.close()
        self.index.close()
        self.cgroup.close()


@pytest.fixture
def owners(tmp_path: Any) -> Iterator[OwnersAcceptor]:
    made = OwnersAcceptor(tmp_path)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def long_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deadline no test reaches: only bytes, or their end, hand a connection over."""
    monkeypatch.setattr(listener, "PEEK_WAIT", 100 * WAIT)


def test_a_silent_owner_accepted_first_does_not_delay_a_later_owners_kill(
        long_wait: None, owners: OwnersAcceptor) -> None:
    """An owner's connection that writes nothing is being waited on when a second owner
    connects and writes a kill: the kill is accepted, signalled and handed over while the
    silent one is still waited on (its deadline is out of reach), and the silent one is
    handed over, unsignalled, the moment its peer hangs up."""
    silent = owners.connect()
    owners.peeking(1)
    killer = owners.connect()
    data = kill({"agent": "a1"})
    killer.sendall(data)
    conn, _peer, _at, presignal = owners.take()
    assert presignal is not None and set(presignal.runs) == {"r1"}
    assert conn.recv(65536, socket.MSG_PEEK) == data  # the loop reads it all
    assert owners.cgroup.written() == b"1"
    assert owners.acceptor.peeking == 1 and owners.handed.empty()  # the silent one waits on
    silent.close()
    assert owners.take()[3] is None
    assert owners.acceptor.peeking == 0 and owners.signer.sent == 1


def test_a_request_that_completes_late_within_the_deadline_is_still_presignalled(
        long_wait: None, owners: OwnersAcceptor) -> None:
    """Bytes that come after the accept's look, in pieces, are peeked at as they come: a
    kill whole before the deadline is signalled, with its arrival stamped at the accept
    (before any of its bytes were written), and nothing of it consumed."""
    client = owners.connect()
    owners.peeking(1)
    data = kill({"class": "c"})
    before_bytes = time.perf_counter()
    client.sendall(data[:25])
    client.sendall(data[25:60])
    assert owners.handed.empty()
    client.sendall(data[60:])
    conn, peer, accepted_at, presignal = owners.take()
    assert presignal is not None and set(presignal.runs) == {"r1"} and not peer.quiet
    assert accepted_at < before_bytes and presignal.arrived == accepted_at
    assert conn.recv(65536, socket.MSG_PEEK) == data
    assert owners.cgroup.written() == b"1"


def test_a_stalled_head_is_looked_at_again_only_when_bytes_come(
        long_wait: None, owners: OwnersAcceptor) -> None:
    """A kill's head that stalls is not peeked at by time: the thread looks again at each
    arrival of bytes (edge-triggered), however long the head waits, and hands it over at
    once when its peer stops writing."""
    stalled = owners.connect()
    stalled.sendall(kill({"agent": "a1"})[:40])
    owners.peeking(1)
    fd = next(iter(owners.acceptor._peeking))
    for _ in range(3):  # other connections come and go meanwhile, each its own kill
        other = owners.connect()
        other.sendall(kill({"agent": "nobody-here"}))
        assert owners.take()[3] is None  # no live run: nothing signalled
    # The accept's look and, at most, the one epoll reports for bytes already there when the
    # connection was registered: none by time.
    assert owners.peeks[fd] <= 2, owners.peeks
    stalled.sendall(b"Content")
    owners.peeking(1)
    stalled.shutdown(socket.SHUT_WR)  # no more bytes: handed over now, not at the deadline
    _conn, peer, _at, presignal = owners.take()
    assert presignal is None and peer.quiet and owners.cgroup.written() == b""


def test_the_deadline_hands_a_connection_over_unsignalled(
        monkeypatch: pytest.MonkeyPatch, owners: OwnersAcceptor) -> None:
    """A kill still incomplete at its deadline goes to the loop unsignalled and takes no early
    hold there; its rest, written after, is the loop's to read (no SIGKILL here)."""
    monkeypatch.setattr(listener, "PEEK_WAIT", 0.05)
    client = owners.connect()
    data = kill({"agent": "a1"})
    client.sendall(data[:40])
    conn, peer, _at, presignal = owners.take()
    assert presignal is None and peer.quiet
    client.sendall(data[40:])
    assert conn.recv(65536, socket.MSG_PEEK | socket.MSG_WAITALL) == data
    assert owners.cgroup.written() == b"" and owners.signer.sent == 0


def test_the_connections_waited_on_are_bounded_by_the_owners_sockets_cap(
        long_wait: None, tmp_path: Any) -> None:
    owners = OwnersAcceptor(tmp_path, reserved=2)
    try:
        waiting = [owners.connect() for _ in range(2)]
        owners.peeking(2)
        refused = owners.connect()
        refused.settimeout(WAIT)
        with contextlib.suppress(ConnectionResetError):
            assert refused.recv(1) == b""  # closed at its accept
        assert owners.acceptor.peeking == 2 and owners.admission.connected == 2
        for client in waiting:
            client.close()
            assert owners.take()[3] is None
    finally:
        owners.close()
