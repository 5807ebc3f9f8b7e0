"""The pieces of a restart's handover that need no root (issue 13): a run's output drain
gives back its pipe and a new drain appends to the same log and index with the counts (and
so the cap) carried on; descriptors and the record cross a SOCK_SEQPACKET channel in chunks,
and a channel that ends early leaves no descriptor open; which runs are handed over.
Real pipes, sockets and files."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from supervisor.daemon import handover
from supervisor.daemon.liverun import LiveRun
from supervisor.daemon.store import RunRecord
from supervisor.daemon.watchdog import FD_CHUNK, _send_fds, receive_fds
from supervisor.profiles import Profile
from supervisor.runtime import output_index
from supervisor.runtime.output import MARKER, Outputs
from supervisor.runtime.output_index import index_path, read_index
from supervisor.states import EndCause
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


def test_only_whole_running_runc_runs_are_handed_over() -> None:
    assert "ending" in (handover.why_not(_live("running", EndCause.KILLED)) or "")
    assert "starting" in (handover.why_not(_live("starting")) or "")
    # No runc handle (a docker run, or none yet): killed at the handover, never left behind.
    assert "docker" in (handover.why_not(_live("running")) or "")
