"""A docker run's output as the engine's log driver keeps it, read with timestamps, so that a
daemon that follows a run the previous daemon followed (an orderly restart, daemon/handover.py)
goes on at the first message the previous one did not record: nothing lost, nothing twice.

The engine keeps each run's output in a bounded log of its own (the `local` driver, at most
`ENGINE_LOG_FILES` files of `ENGINE_LOG_FILE_SIZE`, on the engine's disk, removed with the
container). The supervisor follows it (`docker logs --follow --timestamps`): the engine
sends one chunk per log message (a line, or a piece of one when the line is longer than the
engine's 16 KiB buffer or has no newline yet), each prefixed with the time the engine read it,
to the nanosecond. `LogCursor` strips the prefix and remembers the last message taken: its
time and how many messages with exactly that time were taken (two messages in the same
nanosecond are told apart by their order). A daemon that takes the run over asks the engine
for the log from that second on and skips what the cursor says was taken.

The guarantee: every message the agent wrote while no daemon followed it is recorded once,
in order, provided the engine still has the last message the previous daemon took. If the
engine's log rotated past it (more than the engine's bound was written while no daemon read),
the messages in between may be gone: the log then says so in a line of the supervisor's
(`LogCursor.gap`), and the output counts only cover what was read."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

# The engine's own bound on a run's output kept for the supervisor (the `local` log driver).
ENGINE_LOG_FILE_SIZE = "16m"
ENGINE_LOG_FILES = 2
ENGINE_LOG_DRIVER = "local"

_STAMP = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d) ")


def stamp_ns(prefix: bytes) -> int | None:
    """Nanoseconds since the epoch of the engine's timestamp at the start of `prefix` (RFC 3339
    with up to nine fractional digits and a zone), None if it does not start with one."""
    match = _STAMP.match(prefix)
    if match is None:
        return None
    whole, fraction, zone = (g.decode() if g is not None else "" for g in match.groups())
    seconds = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone)).timestamp()
    return int(seconds) * 1_000_000_000 + int(fraction.ljust(9, "0") or 0)


class LogCursor:
    """Where a run's output was read to in the engine's log: the time (ns) of the last message
    taken and how many messages of exactly that time were taken. A message counts as taken
    once the reader asks for the next one (so one handed out and then dropped by a reader that
    stopped is read again by the next daemon)."""

    def __init__(self, last_ns: int | None = None, taken_at_last: int = 0) -> None:
        self.last_ns = last_ns
        self.taken_at_last = taken_at_last
        # Set by `frames` when the engine no longer had the last message taken.
        self.gap = False

    @classmethod
    def from_wire(cls, value: Any) -> LogCursor:
        """From a handover record's `output_since` (`as_wire`); ValueError if malformed."""
        if value is None:
            return cls()
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                or value[0] < 0 or value[1] < 1):
            raise ValueError(f"output_since {value!r} is not [nanoseconds, count]")
        return cls(value[0], value[1])

    def as_wire(self) -> list[int] | None:
        return None if self.last_ns is None else [self.last_ns, self.taken_at_last]

    def since(self) -> int | None:
        """The `since` to ask the engine for: the second of the last message taken (the
        engine's `since` keeps messages of that time and later)."""
        return None if self.last_ns is None else self.last_ns // 1_000_000_000

    def frames(self, chunks: Iterable[bytes],
               on_gap: Callable[[], None] | None = None) -> Iterator[bytes]:
        """The messages of `chunks` (the engine's, each with its timestamp) not taken yet,
        without their timestamps. `on_gap` is called once, before the first message, when the
        engine no longer has the last message taken (see the module's docstring)."""
        resuming = self.last_ns is not None
        skip = self.taken_at_last
        for chunk in chunks:
            at = stamp_ns(chunk)
            if at is None:  # not the engine's format: take it whole, keep the cursor
                yield chunk
                continue
            payload = chunk[chunk.index(b" ") + 1:]
            if resuming:
                assert self.last_ns is not None
                if at < self.last_ns or (at == self.last_ns and skip > 0):
                    if at == self.last_ns:
                        skip -= 1
                    continue
                if at > self.last_ns and skip == self.taken_at_last and not self.gap:
                    # Not one message of the cursor's time was there: it rotated away.
                    self.gap = True
                    if on_gap is not None:
                        on_gap()
                resuming = False
            yield payload
            self._took(at)  # the reader asked for the next one: this one was taken

    def _took(self, at: int) -> None:
        if at == self.last_ns:
            self.taken_at_last += 1
        else:
            self.last_ns, self.taken_at_last = at, 1
