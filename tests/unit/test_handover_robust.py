"""A restart's handover under stress (issue 13, the review's open findings): a record far
larger than one SOCK_SEQPACKET datagram crosses the daemon -> watchdog -> next daemon path
whole, within a bound on both sides; the watchdog's checks (break-glass, the window) and a
next daemon's give do not wait for a peer that connects and stalls. Real sockets, pipes and
a real watchdog process; no root."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from supervisor.daemon import handover, watchdog
from supervisor.daemon.watchdog import (
    ADOPTED,
    PART_SIZE,
    PART_TAG,
    _send_fds,
    receive_fds,
)
from supervisor.sandbox.cgroups import Cgroup
from tests.support.handover import record, run_entry
from tests.unit.conftest import WAIT

# The longest name and the most tripwires a run may carry (models: _TRIPWIRES_MAX).
_TRIPWIRES = [{"name": f"{n:02d}" + "t" * 61, "metric": "memory_bytes", "above": 1e30,
               "action": "alert"} for n in range(64)]


def _record(runs: int, from_pid: int = 1) -> dict[str, Any]:
    """What `hand_over` writes for `runs` runs (each with an output pipe at index 2i and a
    seccomp fd at 2i+1), each as large as a run's entry gets."""
    return record(*(run_entry(f"r{i:05d}", agent=f"agent-{i:05d}", pid=100000 + i,
                              output_fd=2 * i, produced=1 << 40, recorded=1 << 30,
                              seccomp_fds=[2 * i + 1], tripwires=_TRIPWIRES)
                    for i in range(runs)),
                  from_pid=from_pid, ts=0.0, window=WAIT, halt_file="/nonexistent/HALT",
                  socket="/nonexistent/handover.sock")


def _sndbuf(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


def test_a_record_larger_than_a_datagram_crosses_whole() -> None:
    """400 runs with the most tripwires each: several times what one datagram may hold (the
    old single message failed with EMSGSIZE, and the restart killed every run)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    record = {"kind": "record", "record": _record(400)}
    assert len(json.dumps(record)) > 10 * _sndbuf(ours)
    pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(300)]
    errors: list[BaseException] = []

    def send() -> None:
        try:
            _send_fds(ours, record, [r for r, _w in pipes])
        except BaseException as exc:  # shown by the assertion below
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        message, fds = receive_fds(theirs, "record", WAIT)
        sender.join()
        assert errors == []
        assert message == record
        assert len(fds) == len(pipes)
        os.write(pipes[-1][1], b"x")
        assert os.read(fds[-1], 1) == b"x"
        for fd in fds:
            os.close(fd)
    finally:
        sender.join()
        for r, w in pipes:
            os.close(r)
            os.close(w)
        ours.close()
        theirs.close()


def test_a_record_over_the_bound_is_refused_before_anything_is_sent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watchdog, "RECORD_MAX", 1000)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        with pytest.raises(OSError, match="more than 1000"):
            _send_fds(ours, {"kind": "record", "record": _record(3)}, [read_fd])
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing at all went out
            theirs.recv(16)
    finally:
        for fd in (read_fd, write_fd):
            os.close(fd)
        ours.close()
        theirs.close()


def test_a_receiver_stops_at_the_bound_and_closes_what_it_got(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A sender that goes on past RECORD_MAX (parts with no end) is cut off there, not read
    until memory runs out; the descriptors it sent are closed."""
    monkeypatch.setattr(watchdog, "RECORD_MAX", 4 * PART_SIZE)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    stop = threading.Event()

    def flood() -> None:
        socket.send_fds(ours, [b'{"kind": "fds", "count": 1}'], [read_fd])
        os.close(read_fd)
        with contextlib.suppress(OSError):
            while not stop.is_set():
                ours.sendmsg([PART_TAG + b"x" * PART_SIZE])

    sender = threading.Thread(target=flood)
    ours.settimeout(WAIT)
    sender.start()
    try:
        with pytest.raises(ValueError, match="larger than"):
            receive_fds(theirs, "record", WAIT)
    finally:
        stop.set()
        theirs.close()
        sender.join()
        ours.close()
    with pytest.raises(BrokenPipeError):  # the received copy is closed: no reader is left
        os.write(write_fd, b"x")
    os.close(write_fd)


def test_a_record_sent_whole_by_an_earlier_version_is_still_read() -> None:
    """An upgrade: the watchdog of the daemon being replaced runs the code it started with,
    which sent the record as one datagram; the new daemon still takes it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        socket.send_fds(ours, [b'{"kind": "fds", "count": 1}'], [read_fd])
        record = {"kind": "record", "record": _record(1)}
        ours.sendmsg([json.dumps(record).encode()])
        message, fds = receive_fds(theirs, "record", WAIT)
        assert message == record and len(fds) == 1
        os.close(fds[0])
    finally:
        for fd in (read_fd, write_fd):
            os.close(fd)
        ours.close()
        theirs.close()


def test_the_end_must_match_what_arrived() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        body = json.dumps({"kind": "record"}).encode()
        ours.sendmsg([PART_TAG + body])
        ours.sendmsg([json.dumps({"kind": "end", "size": len(body) + 1}).encode()])
        with pytest.raises(ValueError, match="its end says"):
            receive_fds(theirs, "record", WAIT)
    finally:
        ours.close()
        theirs.close()


def _watchdog_process(tmp_path: Path, channel: socket.socket) -> subprocess.Popen[bytes]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor.daemon.watchdog", "--cgroup",
         str(tmp_path / "absent-parent"), "--record", str(tmp_path / "watchdog.jsonl"),
         "--timeout", "0.1"], stdin=channel.fileno(), env=env, stderr=subprocess.PIPE)


def test_many_runs_go_through_a_real_watchdog_process_to_the_next_daemon(
        tmp_path: Path) -> None:
    """The whole path with the record of 1,000 runs: a daemon hands it to a real watchdog
    process, which gives it to a next daemon that connects; the next daemon checks it as
    `adopt` does, says ADOPTED and the watchdog exits without killing anything."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = _watchdog_process(tmp_path, theirs)
    theirs.close()
    runs = 1000
    path = tmp_path / "handover.sock"
    record = {**_record(runs, from_pid=os.getpid()), "socket": str(path),
              "halt_file": str(tmp_path / "HALT")}
    pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(2 * runs)]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind(str(path))
        listener.listen(4)
        ours.settimeout(WAIT)
        _send_fds(ours, {**record, "kind": "handover"},
                  [listener.fileno(), *(r for r, _w in pipes)])
        listener.close()
        for r, _w in pipes:  # the watchdog holds the only copies of the read ends now
            os.close(r)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(str(path))
            message, fds = receive_fds(sock, "record", WAIT)
            got = message["record"]
            handover.check_record(got, len(fds))
            assert got == {**record, "kind": "handover"}
            assert len(fds) == len(pipes)
            _w = pipes[-1][1]
            os.write(_w, b"y")
            assert os.read(fds[got["runs"][-1]["seccomp_fds"][0]], 1) == b"y"
            for fd in fds:
                os.close(fd)
            sock.send(ADOPTED)
        assert proc.wait(WAIT) == 0, proc.stderr.read() if proc.stderr else b""
        assert not (tmp_path / "watchdog.jsonl").exists()  # nothing was killed
    finally:
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
        for _r, w in pipes:
            os.close(w)
        ours.close()
        listener.close()


# -------------------------------------------------- a peer that connects and stalls (c)


def _stalled_peer(path: Path) -> socket.socket:
    """Root's (here: the same user's) process that connects to the handover socket and then
    neither reads nor answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(str(path))
    return sock


class _Held:
    """`await_adoption` on a thread of its own, over a real listening socket."""

    def __init__(self, tmp_path: Path, window: float) -> None:
        self.path = tmp_path / "handover.sock"
        self.halt = tmp_path / "HALT"
        self.record = tmp_path / "watchdog.jsonl"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(str(self.path))
        listener.listen(4)
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        message = {"window": window, "halt_file": str(self.halt), "socket": str(self.path),
                   "runs": [{"run_id": "r1"}]}
        self.result: list[int] = []
        parent = Cgroup("absent", root=tmp_path)
        fds = [os.dup(self.read_fd)]
        listener_fd = listener.detach()
        self.thread = threading.Thread(target=lambda: self.result.append(
            watchdog.await_adoption(parent, self.record, 0.1, message, listener_fd, fds)))

    def start(self) -> _Held:
        self.thread.start()
        return self

    def rows(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


@pytest.fixture
def patient_give(monkeypatch: pytest.MonkeyPatch) -> None:
    """A give's own deadline far beyond the test's: only a watchdog that does not wait for a
    stalled peer can pass (the old one sat in the give until its deadline)."""
    monkeypatch.setattr(watchdog, "_break_glass", [])
    monkeypatch.setattr(watchdog, "GIVE_TIMEOUT", 3600.0)


@pytest.mark.usefixtures("patient_give")
def test_the_halt_file_kills_while_a_peer_stalls_a_give(tmp_path: Path) -> None:
    held = _Held(tmp_path, window=3600).start()
    stalled = _stalled_peer(held.path)
    try:
        held.halt.write_text("incident\n")
        held.thread.join(WAIT)
        assert not held.thread.is_alive(), "the watchdog waited for the stalled peer"
        rows = held.rows()
        assert len(rows) == 1 and rows[0]["trigger"].startswith("break-glass: ")
        assert rows[0]["handed_over"] == ["r1"]
        # Every held descriptor is closed: the output pipe has no reader left (once the
        # stalled peer, which may hold a copy in flight, is gone too).
        stalled.close()
        os.close(held.read_fd)
        held.read_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        with pytest.raises(BrokenPipeError):
            os.write(held.write_fd, b"x")
    finally:
        stalled.close()
        held.thread.join(WAIT)
        held.close()


@pytest.mark.usefixtures("patient_give")
def test_the_window_ends_while_a_peer_stalls_a_give(tmp_path: Path) -> None:
    held = _Held(tmp_path, window=0.5)
    stalled = _stalled_peer(held.path)  # waits in the backlog: accepted at the first look
    held.start()
    try:
        held.thread.join(WAIT)
        assert not held.thread.is_alive(), "the watchdog waited for the stalled peer"
        rows = held.rows()
        assert len(rows) == 1 and "adopt_window" in rows[0]["trigger"]
    finally:
        stalled.close()
        held.thread.join(WAIT)
        held.close()


@pytest.mark.usefixtures("patient_give")
def test_a_next_daemon_is_given_the_runs_while_a_peer_stalls(tmp_path: Path) -> None:
    held = _Held(tmp_path, window=3600)
    stalled = [_stalled_peer(held.path) for _ in range(3)]
    held.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(str(held.path))
            message, fds = receive_fds(sock, "record", WAIT)
            assert message["record"]["runs"] == [{"run_id": "r1"}]
            for fd in fds:
                os.close(fd)
            sock.send(ADOPTED)
        held.thread.join(WAIT)
        assert not held.thread.is_alive(), "the give waited behind the stalled peers"
        assert held.result == [0] and held.rows() == []
    finally:
        for sock in stalled:
            sock.close()
        held.thread.join(WAIT)
        held.close()


@pytest.mark.usefixtures("patient_give")
def test_stalled_peers_are_bounded_and_cut_at_the_end(tmp_path: Path) -> None:
    """More stalled peers than the watchdog gives to at once: the rest wait in the backlog
    (no thread each); at the end every connection it holds is cut, so no descriptor of the
    runs stays with a peer that did not adopt."""
    held = _Held(tmp_path, window=3600)
    stalled = [_stalled_peer(held.path) for _ in range(watchdog.GIVES_MAX)]
    held.start()
    try:
        # Every slot is a stalled peer: wait until each has its record (it is not reading
        # it; the watchdog has sent it), then end the window by break-glass.
        for sock in stalled:
            sock.settimeout(WAIT)
            sock.recv(1, socket.MSG_PEEK)
        held.halt.write_text("incident\n")
        held.thread.join(WAIT)
        assert not held.thread.is_alive()
        for sock in stalled:  # each was cut: it reads what had been sent, then the end
            sock.settimeout(WAIT)
            while sock.recv(1 << 20):
                pass
    finally:
        for sock in stalled:
            sock.close()
        held.thread.join(WAIT)
        held.close()
