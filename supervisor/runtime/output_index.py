"""When each part of a run's log arrived: a sidecar index beside the log file, so `logs --since`
can start at a time while the log keeps the agent's bytes exactly as they came (no stamps
written into them). Written by the output drain's thread (root, 0600, like the log); read by
the API off the event loop.

The index is a sequence of 16-byte records (little-endian u64 offset, f64 Unix time): "the
bytes from this offset on arrived at or after this time". The drain adds one when it is about
to write and at least `SPACING` seconds passed since the last record, so the index has at most
one record per second of output, and the bytes of each record (up to the next) arrived less
than `SPACING` after its time. At `max_records` it stops growing, with a last record whose time
is +inf that says so (the bytes from there on arrived at any later time: an answer may show
more than asked, never less). An index whose write failed (a full disk) ends there, and an
answer from it may then miss output that came after its last record."""

from __future__ import annotations

import bisect
import os
import struct
from pathlib import Path

_RECORD = struct.Struct("<Qd")
SPACING = 1.0
# Records an index holds at most (4 MiB); a smaller cap for logs with a small byte cap.
MAX_RECORDS = 1 << 18


def index_path(log_path: Path) -> Path:
    return log_path.with_name(log_path.name + ".idx")


def max_records_for(cap: int) -> int:
    """An index never outgrows 1/64 of what its log may record (at least 64 records)."""
    return max(64, min(MAX_RECORDS, cap // (64 * _RECORD.size)))


class IndexWriter:
    """Appends records for one log; single writer (the drain thread). A failure to write the
    index never stops the drain: the index just ends there."""

    def __init__(self, path: Path, max_records: int, existing: bool = False) -> None:
        """`existing`: the index of a run handed over by the previous daemon, appended to
        (a torn last record is cut off first)."""
        self.path = path
        self.max_records = max_records
        self.records = 0
        self._last_time = float("-inf")
        flags = os.O_CREAT | (0 if existing else os.O_EXCL)
        self._fd: int | None = os.open(path, os.O_WRONLY | flags | os.O_NOFOLLOW
                                       | os.O_CLOEXEC, 0o600)
        if existing:
            size = os.fstat(self._fd).st_size
            self.records = size // _RECORD.size
            os.ftruncate(self._fd, self.records * _RECORD.size)
            os.lseek(self._fd, 0, os.SEEK_END)
            if self.records >= max_records:
                self.close()

    def mark(self, offset: int, now: float) -> None:
        """The bytes about to be written at `offset` arrive at `now`."""
        if self._fd is None or now - self._last_time < SPACING:
            return
        full = self.records + 1 >= self.max_records
        try:
            # 16 bytes: one write, or none
            os.write(self._fd, _RECORD.pack(offset, float("inf") if full else now))
        except OSError:
            self.close()
            return
        self._last_time = now
        self.records += 1
        if full:
            self.close()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def read_index(path: Path) -> list[tuple[int, float]]:
    """The records of an index ([] when there is none: a run from before indexes, or one whose
    index could not be made). A torn last record is ignored."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    whole = len(data) - len(data) % _RECORD.size
    return [_RECORD.unpack_from(data, at) for at in range(0, whole, _RECORD.size)]


def since_offset(log_path: Path, since: float) -> int:
    """Where the output that arrived at or after `since` starts in the log: at the first record
    whose bytes may have arrived then or later. A record's bytes (up to the next record)
    arrived less than SPACING after its time, or the drain would have written another record;
    so up to SPACING before `since` may be included, never less than asked. 0 without an
    index; the end of the log when nothing arrived since."""
    records = read_index(index_path(log_path))
    if not records:
        return 0
    try:
        size = log_path.stat().st_size
    except OSError:
        return 0
    first = bisect.bisect_right([when for _offset, when in records], since - SPACING)
    return size if first == len(records) else min(records[first][0], size)
