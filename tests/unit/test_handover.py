"""The pieces of a restart's handover that need no root (issue 13): a run's output drain
gives back its pipe and a new drain appends to the same log and index with the counts (and
so the cap) carried on; descriptors and the record cross a SOCK_SEQPACKET channel in chunks,
and a channel that ends early leaves no descriptor open; which runs are handed over.
Real pipes, sockets and files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor.daemon import handover, watchdog
from supervisor.daemon.liverun import LiveRun
from supervisor.daemon.store import RunRecord
from supervisor.daemon.watchdog import FD_CHUNK, _send_fds, receive_fds
from supervisor.profiles import Profile
from supervisor.runtime import output_index
from supervisor.runtime.output import MARKER, Outputs
from supervisor.runtime.output_index import index_path, read_index
from supervisor.sandbox.cgroups import Cgroup
from supervisor.states import EndCause
from tests.support.handover import record, run_entry
from tests.unit.conftest import WAIT


def test_the_output_pipe_is_handed_over_and_the_next_drain_appends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output_index, "SPACING", 0.0)
    log = tmp_path / "r1.log"

    async def first() -> tuple[int, int, int, int]:
        recorder = Outputs(1 << 20).open("r1", log, Profile())
        write_fd = recorder.pipe()
        os.write(write_fd, b"one\n")
        await asyncio.sleep(0.2)
        kept = await recorder.hand_over(WAIT)
        assert kept is not None
        os.write(write_fd, b"two\n")  # written while no daemon drains: it waits in the pipe
        return kept, write_fd, recorder.produced, recorder.recorded

    read_fd, write_fd, produced, recorded = asyncio.run(first())
    assert (produced, recorded) == (4, 4)
    assert log.read_bytes() == b"one\n"

    async def second() -> tuple[int, int]:
        recorder = Outputs(1 << 20).resume("r1", log, Profile(), read_fd, produced, recorded)
        os.write(write_fd, b"three\n")
        os.close(write_fd)
        await recorder.finish(WAIT)
        return recorder.produced, recorder.recorded

    assert asyncio.run(second()) == (14, 14)
    assert log.read_bytes() == b"one\ntwo\nthree\n"
    offsets = [offset for offset, _when in read_index(index_path(log))]
    assert offsets[0] == 0 and 4 in offsets and offsets == sorted(offsets)  # appended


def test_the_cap_holds_across_a_handover(tmp_path: Path) -> None:
    log = tmp_path / "r1.log"
    log.write_bytes(b"x" * 8)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)

    async def resumed() -> tuple[int, int]:
        recorder = Outputs(10).resume("r1", log, Profile(), read_fd, 8, 8)
        os.write(write_fd, b"abcdef")
        os.close(write_fd)
        await recorder.finish(WAIT)
        return recorder.produced, recorder.recorded

    assert asyncio.run(resumed()) == (14, 10)
    data = log.read_bytes()
    assert data.startswith(b"x" * 8 + b"ab\n" + MARKER + b" output cap of 10 bytes")


def test_descriptors_and_the_record_cross_the_channel_in_chunks() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(FD_CHUNK + 3)]
    try:
        _send_fds(ours, {"kind": "record", "runs": ["a"]}, [r for r, _w in pipes])
        message, fds = receive_fds(theirs, "record")
        assert message == {"kind": "record", "runs": ["a"]}
        assert len(fds) == len(pipes)
        # Each descriptor is the same pipe, in order.
        os.write(pipes[-1][1], b"last")
        assert os.read(fds[-1], 4) == b"last"
        for fd in fds:
            os.close(fd)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
        ours.close()
        theirs.close()


def test_a_channel_that_ends_early_leaves_no_descriptor_open() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    socket.send_fds(ours, [b'{"kind": "fds", "count": 1}'], [read_fd])
    os.close(read_fd)
    ours.close()  # the daemon died before its last message
    open_before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match="closed before"):
        receive_fds(theirs, "handover")
    theirs.close()
    # The received copy was closed: the pipe has no reader left, so a write fails.
    with pytest.raises(BrokenPipeError):
        os.write(write_fd, b"x")
    os.close(write_fd)
    assert set(os.listdir("/proc/self/fd")) <= open_before


def _live(state: str, ending: EndCause | None = None) -> LiveRun:
    record = RunRecord(id="r", agent="a", state=state, command=["x"], profile="default",
                       workspace=None, container_id="as-r", netns="as-r",
                       cgroup="agent-supervisor/as-r", bundle="/b", log_path="/l", uid_slot=0,
                       started_at=0.0)
    live = LiveRun(record=record, profile=Profile())
    live.ending = ending
    return live


def test_only_whole_running_runs_are_handed_over() -> None:
    assert "ending" in (handover.why_not(_live("running", EndCause.KILLED)) or "")
    assert "starting" in (handover.why_not(_live("starting")) or "")
    # No runtime handle (none yet): killed at the handover, never left behind.
    assert "no runtime handle" in (handover.why_not(_live("running")) or "")


# ------------------------------------------------------- review fixes (F9, F3.3, F2, F7)


def test_received_descriptors_are_close_on_exec() -> None:
    """F9: a descriptor received from the channel is not inherited by a process the daemon
    or the watchdog spawns (socket.recv_fds in 3.11 drops MSG_CMSG_CLOEXEC)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_fd, write_fd = os.pipe()  # inheritable on the sender's side
    os.set_inheritable(read_fd, True)
    try:
        _send_fds(ours, {"kind": "record"}, [read_fd])
        _message, fds = receive_fds(theirs, "record")
        assert len(fds) == 1
        assert not os.get_inheritable(fds[0])
        os.close(fds[0])
    finally:
        for fd in (read_fd, write_fd):
            os.close(fd)
        ours.close()
        theirs.close()


def test_the_whole_handover_must_arrive_within_its_deadline() -> None:
    """F7: a peer that trickles descriptor chunks and never sends the record cannot hold the
    receiver beyond `within` (each recv's own timeout alone would be renewed by every
    chunk); what arrived is closed."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                socket.send_fds(ours, [b'{"kind": "fds", "count": 1}'], [read_fd])
            stop.wait(0.05)

    sender = threading.Thread(target=trickle)
    sender.start()
    open_before = set(os.listdir("/proc/self/fd"))
    try:
        with pytest.raises(TimeoutError):
            receive_fds(theirs, "record", 0.5)
    finally:
        stop.set()
        sender.join()
        ours.close()
        theirs.close()
    assert set(os.listdir("/proc/self/fd")) <= open_before
    os.close(read_fd)
    os.close(write_fd)


def test_a_well_formed_record_passes_the_check() -> None:
    handover.check_record(record(), 2)


@pytest.mark.parametrize(("record", "nfds", "error"), [
    (record(version=99), 2, "version"),
    (record(runs={"r1": {}}), 2, "not a list"),
    (record(runs=["r1"]), 2, "not an object"),
    (record(runs=[{**run_entry(), "pid": "10"}]), 2, "pid"),
    (record(runs=[{**run_entry(), "output_fd": True}]), 2,
     "output_fd"),
    (record(runs=[{k: v for k, v in run_entry().items()
                             if k != "agent"}]), 2, "agent"),
    (record(), 1, "descriptor index 1"),  # an index past what was received
    (record(runs=[{**run_entry(), "seccomp_fds": [0]}]), 2,
     "descriptor index 0"),  # two uses of one descriptor
    (record(runs=[{**run_entry(), "seccomp_fds": ["x"]}]), 2,
     "descriptor index 'x'"),
])
def test_a_malformed_record_is_refused_before_anything_is_adopted(
        record: dict[str, Any], nfds: int, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        handover.check_record(record, nfds)


class _Giver:
    """A listening socket handed to `await_adoption` and a next daemon on a thread that
    connects, takes the record and, before it says ADOPTED, does `meanwhile`."""

    def __init__(self, tmp_path: Path, meanwhile: Callable[[], None]) -> None:
        self.path = tmp_path / "handover.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(self.path))
        self.listener.listen(1)
        self.meanwhile = meanwhile
        self.took: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._adopt)

    def _adopt(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(str(self.path))
            message, fds = receive_fds(sock, "record", WAIT)
            for fd in fds:
                os.close(fd)
            self.took.append(message)
            self.meanwhile()
            sock.send(watchdog.ADOPTED)

    def run(self, tmp_path: Path, halt_file: Path) -> list[dict[str, Any]]:
        record = tmp_path / "watchdog.jsonl"
        message = {"window": WAIT, "halt_file": str(halt_file), "socket": str(self.path),
                   "runs": [{"run_id": "r1"}]}
        self.thread.start()
        listener_fd = self.listener.detach()
        # An agents' parent that is not there: kill_tree reports and returns (no root here).
        parent = Cgroup("absent", root=tmp_path)
        assert watchdog.await_adoption(parent, record, 0.1, message, listener_fd, []) == 0
        self.thread.join()
        assert self.took  # the give completed: the next daemon said ADOPTED
        if not record.exists():
            return []
        return [json.loads(line) for line in record.read_text().splitlines()]


def test_break_glass_during_a_give_still_kills(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """F3.3: SIGUSR1 to the watchdog while it gives the runs to the next daemon (its handler
    appends to _break_glass) kills every agent even though the give then succeeds."""
    monkeypatch.setattr(watchdog, "_break_glass", [])
    giver = _Giver(tmp_path, lambda: watchdog._break_glass.append(1))
    rows = giver.run(tmp_path, tmp_path / "HALT")
    assert len(rows) == 1 and rows[0]["trigger"].startswith("break-glass: SIGUSR1")
    assert rows[0]["handed_over"] == ["r1"]


def test_the_halt_file_during_a_give_still_kills(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watchdog, "_break_glass", [])
    halt = tmp_path / "HALT"
    rows = _Giver(tmp_path, halt.touch).run(tmp_path, halt)
    assert len(rows) == 1 and rows[0]["trigger"].startswith(f"break-glass: {halt}")


def test_a_give_with_no_break_glass_kills_nothing(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watchdog, "_break_glass", [])
    assert _Giver(tmp_path, lambda: None).run(tmp_path, tmp_path / "HALT") == []


def test_any_failure_while_holding_the_runs_kills(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """F2: not only OSError: whatever ends await_adoption other than a completed give kills
    every agent and records why."""
    monkeypatch.setattr(watchdog, "_break_glass", [])

    def broken(conn: socket.socket, *_args: object) -> bool:
        conn.close()  # as _give does, whatever happens
        raise RuntimeError("a bug in the give")

    monkeypatch.setattr(watchdog, "_give", broken)
    path = tmp_path / "handover.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(1)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client.connect(str(path))  # makes the listener ready: the loop calls _give
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    record = tmp_path / "watchdog.jsonl"
    message = {"window": WAIT, "halt_file": str(tmp_path / "HALT"), "socket": str(path),
               "runs": [{"run_id": "r1"}]}
    with pytest.raises(RuntimeError, match="a bug"):
        watchdog.await_adoption(Cgroup("absent", root=tmp_path), record, 0.1, message,
                                listener.detach(), [read_fd])
    client.close()
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["trigger"].startswith("the watchdog failed")
    assert not path.exists()
    with pytest.raises(BrokenPipeError):  # the held output pipe was closed too
        os.write(write_fd, b"x")
    os.close(write_fd)
