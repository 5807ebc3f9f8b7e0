"""The point of the owners' acceptor's SIGKILL (api/presignal.py), on the real kernel: with the
daemon's event loop held, so that nothing handed to it runs, an owner's kill written to the
owners' socket still kills a real cgroup's processes, from the acceptor's thread, through the
kill index's copy of the run's held `cgroup.kill`; the loop then gets the connection, with
the record of what was signalled, once it turns again. A real Acceptor, KillIndex, Unix
socket, asyncio loop thread, cgroup and `sleep`; needs root.

The test makes its own cgroup under agent-supervisor-test/ and removes it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.api.listener import Acceptor, Admission, Peer
from supervisor.api.presignal import PreSigner
from supervisor.config import ControlSection, RolesSection
from supervisor.sandbox.cgroups import Cgroup, unified_root
from supervisor.sandbox.killindex import KillIndex, PreSignal
from tests.support.sockets import listening_unix_socket

WAIT = 10.0


@pytest.fixture
def run_cgroup() -> Iterator[tuple[Cgroup, subprocess.Popen[bytes]]]:
    """A held cgroup with a real `sleep` in it, as a run's."""
    top = unified_root() / "agent-supervisor-test"
    created_top = not top.exists()
    relative = f"agent-supervisor-test/oa-{secrets.token_hex(3)}"
    (unified_root() / relative).mkdir(parents=True)
    cgroup = Cgroup(relative)
    proc = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
    try:
        (cgroup.path / "cgroup.procs").write_text(str(proc.pid))
        cgroup.hold()
        yield cgroup, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        cgroup.release()
        cgroup.remove(strict=False)
        if created_top:
            with contextlib.suppress(OSError):
                top.rmdir()


@contextlib.contextmanager
def held_loop() -> Iterator[tuple[asyncio.AbstractEventLoop, threading.Event]]:
    """An event loop on a thread of its own, stuck in a callback until the event is set."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="held-loop", daemon=True)
    stuck, release = threading.Event(), threading.Event()

    def hold() -> None:
        stuck.set()
        release.wait()

    thread.start()
    loop.call_soon_threadsafe(hold)
    assert stuck.wait(WAIT)
    try:
        yield loop, release
    finally:
        release.set()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)
        loop.close()


def kill_request(scope: dict[str, Any], reason: str) -> bytes:
    body = json.dumps({"scope": scope, "reason": reason}).encode()
    return (b"POST /v1/actions/kill HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def test_an_owners_kill_kills_the_cgroup_with_the_event_loop_held(
        run_cgroup: tuple[Cgroup, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    cgroup, proc = run_cgroup
    index = KillIndex()
    assert index.add("r1", "a1", "c", cgroup)
    roles = RolesSection()  # root is an owner whatever the roles say
    admission = Admission(config=ControlSection(), roles=roles, budget=64)
    signer = PreSigner(index, lambda: roles, max_body=262144, max_line=8190,
                       finish=lambda *_: None)
    adopted: list[tuple[socket.socket, Peer, PreSignal | None]] = []
    got = threading.Event()

    def adopt(conn: socket.socket, peer: Peer, presignal: PreSignal | None) -> None:
        adopted.append((conn, peer, presignal))
        got.set()

    path = str(tmp_path / "owner.sock")
    listening = listening_unix_socket(path)
    with held_loop() as (loop, release):
        # The daemon's hand-over (ControlListener._hand_over): the loop adopts it on a turn.
        acceptor = Acceptor(
            "owner-accept", listening, admission,
            lambda conn, peer, _at, presignal: loop.call_soon_threadsafe(
                adopt, conn, peer, presignal),
            owner_socket=True, presign=signer)
        acceptor.start()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(path)
                client.sendall(kill_request({"agent": "a1"}, "the loop is stuck"))
                # Killed by the kernel while the loop has run nothing since it was held.
                assert proc.wait(WAIT) == -9
                assert not adopted and not release.is_set()
                assert "populated 0" in (cgroup.path / "cgroup.events").read_text()
                assert signer.sent == 1
                release.set()  # the loop turns: the connection and its record reach it
                assert got.wait(WAIT)
                conn, peer, presignal = adopted[0]
                assert presignal is not None and presignal.runs == {"r1": "a1"}
                assert presignal.mechanism == {"r1": "cgroup.kill"}
                assert conn.recv(65536, socket.MSG_PEEK).startswith(
                    b"POST /v1/actions/kill ")  # the loop would read it all
                conn.close()
                admission.cancel(peer)
        finally:
            acceptor.stop()
            listening.close()
            index.close()
