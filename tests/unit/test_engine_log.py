"""A docker run's output read from the engine's log with timestamps (issue 13): the next daemon
after a restart reads on where the previous one stopped, skipping what it recorded (also two
messages of the same nanosecond), says so when the engine's log rotated past that point, and a
message handed out but never taken by a reader that stopped is read again. The handover
record's docker entries are checked like runc's. No root: frames as the engine sends them,
streams that end when closed, real files."""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.daemon import handover
from supervisor.profiles import Profile
from supervisor.runtime.engine_log import LogCursor, stamp_ns
from supervisor.runtime.output import MARKER, Outputs
from tests.support.handover import record, run_entry
from tests.unit.conftest import WAIT

T0 = 1_796_239_269_000_000_000  # 2026-12-02T19:21:09Z


def _frame(at_ns: int, text: bytes) -> bytes:
    seconds, nanos = divmod(at_ns, 1_000_000_000)
    whole = datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{whole}.{nanos:09d}Z ".encode() + text


def test_the_engines_timestamps_are_read_to_the_nanosecond() -> None:
    assert stamp_ns(b"2026-12-02T19:21:09.000000007Z tick\n") == T0 + 7
    assert stamp_ns(b"2026-12-02T20:21:09.5+01:00 x") == T0 + 500_000_000
    assert stamp_ns(b"2026-12-02T19:21:09Z x") == T0
    assert stamp_ns(b"tick-1\n") is None
    assert stamp_ns(b"2026-12-02T19:21:09.1 no zone") is None


def test_a_first_read_takes_every_message_without_its_timestamp() -> None:
    cursor = LogCursor()
    frames = [_frame(T0 + 1, b"one\n"), _frame(T0 + 2, b"two\n"), _frame(T0 + 2, b"2b")]
    assert list(cursor.frames(frames)) == [b"one\n", b"two\n", b"2b"]
    assert cursor.as_wire() == [T0 + 2, 2]
    assert cursor.since() == T0 // 1_000_000_000


def test_the_next_reader_skips_what_was_taken_also_in_the_same_nanosecond() -> None:
    log = [_frame(T0 + 1, b"a\n"), _frame(T0 + 5, b"b\n"), _frame(T0 + 5, b"c\n"),
           _frame(T0 + 5, b"d\n"), _frame(T0 + 9, b"e\n")]
    first = LogCursor()
    reader = first.frames(log)
    taken = [next(reader), next(reader), next(reader)]  # a, b, c: then the reader stops
    reader.close()
    assert taken == [b"a\n", b"b\n", b"c\n"]
    # c was handed out but the reader never asked for more: it counts as not taken.
    assert first.as_wire() == [T0 + 5, 1]
    gaps: list[bool] = []
    second = LogCursor.from_wire(first.as_wire())
    assert list(second.frames(log, lambda: gaps.append(True))) == [b"c\n", b"d\n", b"e\n"]
    assert gaps == [] and not second.gap


def test_a_log_rotated_past_the_cursor_is_said_once() -> None:
    cursor = LogCursor(T0 + 5, 1)
    gaps: list[bool] = []
    rotated = [_frame(T0 + 7, b"x\n"), _frame(T0 + 8, b"y\n")]  # no message of T0+5 left
    assert list(cursor.frames(rotated, lambda: gaps.append(True))) == [b"x\n", b"y\n"]
    assert gaps == [True] and cursor.gap


@pytest.mark.parametrize("wire", [[1], [1, 0], [-1, 1], ["1", 1], [True, 1], {"a": 1}, 5])
def test_a_malformed_cursor_is_refused(wire: Any) -> None:
    with pytest.raises(ValueError, match="output_since"):
        LogCursor.from_wire(wire)


class _Stream:
    """An engine's followed log: frames put by the test, ended by `close` from another
    thread (as the SDK's CancellableStream is)."""

    def __init__(self) -> None:
        self._frames: list[bytes] = []
        self._cond = threading.Condition()
        self._closed = False

    def put(self, *frames: bytes) -> None:
        with self._cond:
            self._frames.extend(frames)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def end(self) -> None:
        """The engine ends the log (the container stopped): iteration stops cleanly."""
        self.put(b"")

    def __iter__(self) -> Iterator[bytes]:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._frames or self._closed)
                if self._closed:
                    raise OSError("stream closed")
                frame = self._frames.pop(0)
            if not frame:
                return
            yield frame


def test_a_followed_log_is_handed_over_and_the_next_daemon_appends_once(
        tmp_path: Path) -> None:
    """Through the real recorder: the old daemon stops following without closing words, the
    next one appends to the same log from its cursor, and the counts (so the cap) go on."""
    log = tmp_path / "r1.log"
    engine = [_frame(T0 + n, f"tick-{n}\n".encode()) for n in range(1, 7)]

    async def first() -> tuple[list[int] | None, int, int]:
        recorder = Outputs(1 << 20).open("r1", log, Profile())
        cursor, stream = LogCursor(), _Stream()
        recorder.follow(cursor.frames(stream), stream.close)
        stream.put(*engine[:3])
        for _ in range(200):
            if recorder.produced == 21:
                break
            await asyncio.sleep(0.01)
        assert await recorder.hand_over_stream(WAIT)
        return cursor.as_wire(), recorder.produced, recorder.recorded

    wire, produced, recorded = asyncio.run(first())
    assert wire == [T0 + 3, 1] and (produced, recorded) == (21, 21)
    assert log.read_bytes() == b"tick-1\ntick-2\ntick-3\n"  # no closing words

    async def second() -> tuple[int, int]:
        recorder = Outputs(1 << 20).resume("r1", log, Profile(), None, produced, recorded)
        cursor, stream = LogCursor.from_wire(wire), _Stream()
        recorder.follow(cursor.frames(stream), stream.close)
        stream.put(*engine)  # the engine's log from that second on: all of it here
        for _ in range(200):
            if recorder.produced == 42:
                break
            await asyncio.sleep(0.01)
        await recorder.finish(0.1)
        return recorder.produced, recorder.recorded

    assert asyncio.run(second())[0] == 42
    data = log.read_bytes()
    assert data.startswith(b"".join(f"tick-{n}\n".encode() for n in range(1, 7)))
    assert data.count(b"tick-3\n") == 1 and MARKER not in data.split(b"tick-6\n")[0]


def test_a_run_ends_once_its_log_is_read_to_the_end_or_the_wait_is_over(
        tmp_path: Path) -> None:
    """`ended` waits for the source to end by itself and never stops it."""
    async def run() -> tuple[bool, bool, bool]:
        recorder = Outputs(1 << 20).open("r1", tmp_path / "r1.log", Profile())
        stream = _Stream()
        recorder.follow(LogCursor().frames(stream), stream.close)
        stream.put(_frame(T0, b"last words\n"))
        waited = await recorder.ended(0.2)  # the engine has not ended the log: still read
        still = recorder._thread is not None and recorder._thread.is_alive()
        stream.end()
        done = await recorder.ended(WAIT)
        await recorder.finish(WAIT)
        return waited, still, done

    assert asyncio.run(run()) == (False, True, True)
    assert (tmp_path / "r1.log").read_bytes() == b"last words\n"


def _docker_entry(**overrides: Any) -> dict[str, Any]:
    """A record of one docker run: no descriptor, its log cursor instead."""
    run = {k: v for k, v in run_entry().items() if k != "output_fd"}
    return record({**run, "runtime": "docker", "output_since": [T0, 1], "seccomp_fds": [],
                   **overrides})


def test_a_docker_entry_needs_no_descriptor() -> None:
    handover.check_record(_docker_entry(), 0)
    handover.check_record(_docker_entry(output_since=None), 0)  # no line read yet


@pytest.mark.parametrize(("overrides", "error"), [
    ({"output_fd": 0}, "no descriptor"),
    ({"seccomp_fds": [0]}, "no descriptor"),
    ({"output_since": [T0]}, "output_since"),
    ({"runtime": "crun"}, "not runc or docker"),
])
def test_a_malformed_docker_entry_is_refused(overrides: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        handover.check_record(_docker_entry(**overrides), 1)
