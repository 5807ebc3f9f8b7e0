"""A run's output on its way to the host, and the disk it lands on. Needs root (the log
directory is root's, 0700).

The agent never holds the run's log file. It writes into a pipe (runc: the pipe is its
stdout and stderr) or into the engine's pipe to its log driver (docker: the supervisor
follows the engine's bounded log of the run, supervisor/runtime/engine_log.py); a thread of
the supervisor drains that into the log file, which only that thread has open.
So `ftruncate`, `fallocate` or a reopen of /proc/self/fd/1 with O_TRUNC reach a
pipe, never the recorded bytes.

Each run records at most its cap (`[output] max_bytes`, lowered by a profile's own
`[output] max_bytes`). Past the cap the drain goes on and discards what it reads: the
agent never blocks on its own output (a chatty but legitimate agent keeps working) and
every byte is still counted (`produced`), while the log file stops growing (`recorded`,
plus one marker line). The moment the cap is reached `Outputs.tripwires` hears of it once (the
daemon audits it and fires the run's `output_bytes` tripwire with the profile's action).

Draining never runs on the daemon's event loop: one thread per run, moving at most
`_CHUNK` bytes per call, with `splice(2)` so the bytes go pipe -> page cache (or pipe ->
/dev/null past the cap) without passing through Python. A kill never waits for it: the
kill path touches the cgroup only, and `finish` (at cleanup, after the kill is confirmed)
waits for the drain a bounded time, then stops it.

The recorder keeps a write end of its pipe until `finish`: the end of the output is the
daemon's to say, never the last agent process's exit. So a scoped halt's deaths wake no drain
while the kernel is still killing (a hundred drains ending at once, each a thread's wake, a
note and an exit, took the CPU from the dying processes: docs/benchmarks.md run 12); each
drain reads to the end of its pipe at the run's cleanup, after the answer.

Launches are refused (`disk_space_low`) while the filesystem of the state directory or of
the run logs is under the free-space watermark (`check_free_space`)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from supervisor.errors import DiskSpaceLow, EnforcementError
from supervisor.profiles import Profile
from supervisor.runtime.output_index import IndexWriter, index_path, max_records_for

log = logging.getLogger(__name__)

# Bytes moved per splice/read: bounds what one call holds and how long the drain goes without
# looking at its stop signal.
_CHUNK = 1 << 20
# F_SETPIPE_SZ: a larger pipe means fewer wake-ups under a flood (best effort; the default
# /proc/sys/fs/pipe-max-size is 1 MiB).
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# Once stopped, the drain takes at most this much more of what is already in the pipe.
_FINAL_DRAIN = 4 * _PIPE_SIZE
MARKER = b"[agent-supervisor]"
# How long a run's cleanup waits for the drain to reach the end of the output (its writers
# are dead by then, so only what is already in the pipe or the engine's stream is left).
OUTPUT_FINISH_TIMEOUT = 5.0


@dataclass(frozen=True)
class OutputCounts:
    """One run's output so far: every byte the agent produced, the bytes in its log file."""

    produced: int
    recorded: int
    cap: int
    capped: bool
    # Why the log file stopped taking bytes before the cap (ENOSPC, EIO), if it did.
    error: str | None = None

    @property
    def discarded(self) -> int:
        return self.produced - self.recorded

    def as_dict(self) -> dict[str, object]:
        return {"produced": self.produced, "recorded": self.recorded, "cap": self.cap,
                "capped": self.capped, "discarded": self.discarded, "error": self.error}


CapListener = Callable[[str, OutputCounts], None]


class Outputs:
    """Every live run's recorder. Runtimes open one per run; the daemon's tripwires hear of
    caps and telemetry reads the counts. Event-loop thread only, except `counter`'s
    callables."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        # Told once per run when its output reaches the cap (daemon/containment.py).
        self.tripwires: CapListener | None = None
        self._recorders: dict[str, OutputRecorder] = {}
        # Bytes of the runs whose output has ended, produced and recorded (for metrics).
        self._ended_produced = 0
        self._ended_recorded = 0

    def cap_for(self, profile: Profile) -> int:
        """The profile's cap, never above the host's."""
        wanted = profile.output.max_bytes
        return self.max_bytes if wanted is None else min(wanted, self.max_bytes)

    def open(self, run_id: str, log_path: Path, profile: Profile) -> OutputRecorder:
        recorder = OutputRecorder(run_id, log_path, self.cap_for(profile),
                                  asyncio.get_running_loop(), self._capped,
                                  lambda: self._closed(run_id))
        self._recorders[run_id] = recorder
        return recorder

    def resume(self, run_id: str, log_path: Path, profile: Profile, read_fd: int | None,
               produced: int, recorded: int) -> OutputRecorder:
        """A run handed over by the previous daemon (daemon/handover.py): drain `read_fd`
        (the pipe's read end it kept) into the end of the run's existing log, counting on
        from where it stopped, so the cap holds across the handover. Takes `read_fd`; None:
        the caller gives the recorder its source (`follow`, an engine's stream)."""
        recorder = OutputRecorder(run_id, log_path, self.cap_for(profile),
                                  asyncio.get_running_loop(), self._capped,
                                  lambda: self._recorders.pop(run_id, None),
                                  resumed=(produced, recorded))
        self._recorders[run_id] = recorder
        if read_fd is not None:
            recorder.drain(read_fd)
        return recorder

    def counts(self, run_id: str) -> OutputCounts | None:
        recorder = self._recorders.get(run_id)
        return recorder.counts() if recorder is not None else None

    def counter(self, run_id: str) -> Callable[[], tuple[int, int]] | None:
        """For telemetry's output_bytes: (produced, recorded) of the run, from any thread."""
        recorder = self._recorders.get(run_id)
        if recorder is None:
            return None
        return lambda: (recorder.produced, recorder.recorded)

    def totals(self) -> tuple[int, int]:
        """Bytes every run since the daemon started produced and recorded (ended runs, and the
        live ones so far): never lower than at the last call, a counter's rule."""
        produced, recorded = self._ended_produced, self._ended_recorded
        for recorder in list(self._recorders.values()):
            produced += recorder.produced
            recorded += recorder.recorded
        return produced, recorded

    def _closed(self, run_id: str) -> None:
        recorder = self._recorders.pop(run_id, None)
        if recorder is not None:  # closing is idempotent; a run counts once
            self._ended_produced += recorder.produced
            self._ended_recorded += recorder.recorded

    def _capped(self, run_id: str, counts: OutputCounts) -> None:
        if self.tripwires is None:
            return
        try:
            self.tripwires(run_id, counts)
        except Exception:  # an observer must never stop the recording
            log.exception("output cap observer %r failed", self.tripwires)


def open_log(path: Path, existing: bool = False) -> int:
    """A new log file (root, 0600), for the supervisor's drain only; `existing`: the run's
    log as the previous daemon left it, appended to."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_APPEND if existing else os.O_CREAT | os.O_EXCL
    try:
        return os.open(path, os.O_WRONLY | flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise EnforcementError(f"cannot create the run's log file {path}: {exc.strerror}",
                               path=str(path)) from exc


class OutputRecorder:
    """One run's drain: from a pipe (`pipe`) or an engine's stream (`follow`) into its log
    file, up to `cap` bytes. The counters are written by the drain thread only."""

    def __init__(self, run_id: str, log_path: Path, cap: int,
                 loop: asyncio.AbstractEventLoop, on_cap: CapListener,
                 on_closed: Callable[[], object],
                 resumed: tuple[int, int] | None = None) -> None:
        self.run_id = run_id
        self.log_path = log_path
        self.cap = cap
        self.produced, self.recorded = resumed or (0, 0)
        self.capped = self.recorded >= cap and self.produced > self.recorded
        self.error: str | None = None
        self._loop = loop
        self._on_cap = on_cap
        self._on_closed = on_closed
        self._log_fd: int | None = open_log(log_path, existing=resumed is not None)
        # The log file's size: recorded bytes plus the supervisor's notes.
        self._offset = os.fstat(self._log_fd).st_size
        self._index = _open_index(log_path, cap, existing=resumed is not None)
        # hand_over(): the drain ends without closing the pipe, which it leaves here.
        self._keep_pipe = False
        self.kept_pipe: int | None = None
        self._stop = threading.Event()
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._done: asyncio.Future[None] = loop.create_future()
        self._thread: threading.Thread | None = None
        self._close_stream: Callable[[], None] | None = None
        self._copy = False  # splice refused by the log's filesystem: read and write instead
        # `pipe()`'s write end kept by the daemon: the drain sees no end of file before
        # `finish` (or a handover) lets go of it.
        self._write_end: int | None = None

    def counts(self) -> OutputCounts:
        return OutputCounts(self.produced, self.recorded, self.cap, self.capped, self.error)

    # ------------------------------------------------------------- sources

    def pipe(self) -> int:
        """A new pipe whose read end this recorder drains; returns a write end, for the
        agent's stdout and stderr (the caller closes it once the runtime passed it on). The
        recorder keeps a write end of its own until `finish`, so the drain never ends on the
        agent's last exit (the module's docstring)."""
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(read_fd, _F_SETPIPE_SZ, _PIPE_SIZE)
        try:
            self._write_end = os.dup(write_fd)  # close-on-exec, as os.dup makes it
        except OSError:
            os.close(read_fd)
            os.close(write_fd)
            raise
        self.drain(read_fd)
        return write_fd

    def drain(self, read_fd: int) -> None:
        """Drain the pipe whose read end is `read_fd` (taken: closed when the drain ends)."""
        os.set_blocking(read_fd, False)
        self._start(lambda: self._drain_pipe(read_fd), f"output-{self.run_id}")

    async def hand_over(self, timeout: float) -> int | None:
        """An orderly restart: record what the pipe holds now, then stop draining and give
        back the pipe's read end (None if the drain had already ended, or did not stop within
        `timeout`: then the run cannot be handed over whole). The log file is closed; the
        next daemon appends to it (Outputs.resume). Pipes only (`hand_over_stream`)."""
        if self._thread is None or self._close_stream is not None:
            return None
        if not await self._hand_over(timeout):
            return None
        kept, self.kept_pipe = self.kept_pipe, None
        return kept

    async def hand_over_stream(self, timeout: float) -> bool:
        """`hand_over` for an engine's stream: stop following it, with no closing words (the
        engine keeps what comes next; the next daemon follows on from the source's own
        cursor). False if the drain had already ended or did not stop within `timeout`."""
        if self._thread is None or self._close_stream is None:
            return False
        return await self._hand_over(timeout)

    async def _hand_over(self, timeout: float) -> bool:
        self._keep_pipe = True  # the run goes on: no closing words, a pipe is kept
        self._let_go()  # the next daemon's drain ends at the agent's last exit
        self.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._done), timeout)
        if not self._done.done():
            return False
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1
        self._on_closed()
        return True

    def follow(self, stream: Iterable[bytes], close: Callable[[], None]) -> None:
        """Drain an engine's output stream; `close` ends it from another thread."""
        self._close_stream = close
        self._start(lambda: self._drain_stream(stream, close), f"output-{self.run_id}")

    def _start(self, target: Callable[[], None], name: str) -> None:
        if self._thread is not None:
            raise RuntimeError(f"run {self.run_id}: output already has a source")

        def main() -> None:
            try:
                target()
            except Exception:
                log.exception("run %s: the output drain failed", self.run_id)
            finally:
                if not self._keep_pipe:  # handed over: the run goes on
                    self._closing_words()
                self._close_log()
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    self._loop.call_soon_threadsafe(self._set_done)

        self._thread = threading.Thread(target=main, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------- the end

    async def finish(self, timeout: float) -> OutputCounts:
        """Once the run's processes are gone: let the drain reach the end of the output (at
        most `timeout`), then stop it. The log file is complete and closed afterwards.
        Idempotent; never raises."""
        self._let_go()
        if self._thread is None:
            self._close_log()
            self._set_done()
        elif not self._done.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._done), timeout)
            if not self._done.done():
                self.stop()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._done), max(timeout, 1.0))
                if not self._done.done():
                    log.error("run %s: the output drain did not stop; it closes the log "
                              "file when it does", self.run_id)
        if self._stop_fd >= 0 and self._done.done():
            os.close(self._stop_fd)
            self._stop_fd = -1
        self._on_closed()
        return self.counts()

    async def ended(self, timeout: float) -> bool:
        """Wait at most `timeout` for the source to end by itself (an engine's log ends once
        the container has stopped and the log is read to its end); never stops it. True if
        it ended."""
        if self._thread is None:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._done), timeout)
        return self._done.done()

    async def abort(self) -> None:
        """A launch failed: stop the drain without waiting for the end of the output."""
        await self.finish(0.0)

    def stop(self) -> None:
        """Tell the drain to take what is already there and end (any thread)."""
        self._stop.set()
        if self._stop_fd >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(self._stop_fd, 1)
        if self._close_stream is not None:
            with contextlib.suppress(Exception):
                self._close_stream()

    def _let_go(self) -> None:
        """Close the recorder's own write end: once the agent's are closed too (its processes
        gone), the drain reads to the end of the pipe and ends."""
        fd, self._write_end = self._write_end, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _set_done(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def _close_log(self) -> None:
        fd, self._log_fd = self._log_fd, None
        if fd is not None:
            os.close(fd)
        if self._index is not None:
            self._index.close()

    def _mark(self) -> None:
        """What is written next arrives now (for `logs --since`)."""
        if self._index is not None:
            self._index.mark(self._offset, time.time())

    # ------------------------------------------------------------- the drain thread

    def _drain_pipe(self, read_fd: int) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        poller = select.poll()
        poller.register(read_fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        try:
            while not self._stop.is_set():
                poller.poll()
                if self._stop.is_set() or not self._move_all(read_fd, devnull, None):
                    break
            if self._stop.is_set():
                self._move_all(read_fd, devnull, _FINAL_DRAIN)
        finally:
            if self._keep_pipe:
                self.kept_pipe = read_fd
            else:
                os.close(read_fd)
            os.close(devnull)

    def _move_all(self, read_fd: int, devnull: int, limit: int | None) -> bool:
        """Move what the pipe holds now (up to `limit`); False at end of file."""
        moved = 0
        while limit is None or moved < limit:
            try:
                count = self._move(read_fd, devnull)
            except BlockingIOError:
                return True
            if count == 0:
                return False
            moved += count
        return True

    def _move(self, read_fd: int, devnull: int) -> int:
        room = self.cap - self.recorded
        if room > 0 and self.error is None and self._log_fd is not None:
            try:
                count = self._record_from(read_fd, min(room, _CHUNK))
            except BlockingIOError:
                raise
            except OSError as exc:
                self._failed(exc)
                return self._move(read_fd, devnull)
            self.recorded += count
        else:
            count = os.splice(read_fd, devnull, _CHUNK, flags=os.SPLICE_F_NONBLOCK)
        self.produced += count
        self._check_cap()
        return count

    def _record_from(self, read_fd: int, size: int) -> int:
        assert self._log_fd is not None
        self._mark()
        if not self._copy:
            try:
                count = os.splice(read_fd, self._log_fd, size, flags=os.SPLICE_F_NONBLOCK)
                self._offset += count
                return count
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._copy = True  # this filesystem takes no splice
        data = os.read(read_fd, size)
        self._write_all(data)
        return len(data)

    def _drain_stream(self, stream: Iterable[bytes], close: Callable[[], None]) -> None:
        try:
            for chunk in stream:
                if self._stop.is_set():
                    break
                self._take(chunk)
        except Exception as exc:  # the engine went away: say so where the output goes
            if not self._stop.is_set():
                self._note(f"output capture ended: the docker engine is unreachable "
                           f"({type(exc).__name__})")
        finally:
            with contextlib.suppress(Exception):
                close()

    def _take(self, chunk: bytes) -> None:
        room = self.cap - self.recorded
        if room > 0 and self.error is None and self._log_fd is not None:
            part = chunk[:room]
            self._mark()
            try:
                self._write_all(part)
            except OSError as exc:
                self._failed(exc)
            else:
                self.recorded += len(part)
        self.produced += len(chunk)
        self._check_cap()

    def _write_all(self, data: bytes) -> None:
        assert self._log_fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._log_fd, view)
            self._offset += written
            view = view[written:]

    def _check_cap(self) -> None:
        if self.capped or self.recorded < self.cap or self.produced <= self.recorded:
            return
        self.capped = True
        self._note(f"output cap of {self.cap} bytes reached: the rest of this run's output "
                   f"is discarded (and counted)")
        counts = self.counts()
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._on_cap, self.run_id, counts)

    def _failed(self, exc: OSError) -> None:
        self.error = exc.strerror or str(exc)
        log.error("run %s: cannot write its log file %s (%s): its output is discarded from "
                  "here on", self.run_id, self.log_path, self.error)

    def _closing_words(self) -> None:
        if self.produced > self.recorded:
            self._note(f"{self.produced - self.recorded} bytes of output were not recorded "
                       f"({self.produced} produced, {self.recorded} recorded)")

    def note(self, text: str) -> None:
        """One line of the supervisor's own in the log (never counted against the cap), from
        the drain thread (a source's callback) or before the drain starts."""
        self._note(text)

    def _note(self, text: str) -> None:
        """One line of the supervisor's own in the log (never counted against the cap)."""
        if self._log_fd is None or self.error is not None:
            return
        self._mark()
        with contextlib.suppress(OSError):
            self._write_all(b"\n" + MARKER + b" " + text.encode() + b"\n")


def _open_index(log_path: Path, cap: int, existing: bool = False) -> IndexWriter | None:
    """The log's time index, or None when it cannot be made: the index serves `logs --since`
    only, so a run never fails for want of it (its --since then shows the whole log)."""
    try:
        return IndexWriter(index_path(log_path), max_records_for(cap), existing=existing)
    except OSError as exc:
        log.warning("cannot create the time index of %s (%s): logs --since shows the whole "
                    "log", log_path, exc.strerror)
        return None


@dataclass(frozen=True)
class FreeSpace:
    """A filesystem's free and total bytes, as an unprivileged writer sees them."""
    path: str
    free_bytes: int
    total_bytes: int

    @property
    def free_percent(self) -> float:
        return 100.0 * self.free_bytes / self.total_bytes if self.total_bytes else 0.0


def free_space(path: Path) -> FreeSpace:
    """What an unprivileged writer could still put on `path`'s filesystem (root's reserve
    is not counted: the watermark keeps it for the host)."""
    stat = os.statvfs(path)
    return FreeSpace(str(path), stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize)


def check_free_space(paths: Iterable[Path], min_free_bytes: int,
                     min_free_percent: float) -> None:
    """Raise DiskSpaceLow when a filesystem holding one of `paths` (the nearest existing
    ancestor of each) is under either watermark (0 turns a watermark off)."""
    seen: set[int] = set()
    for path in paths:
        while not path.exists() and path != path.parent:
            path = path.parent
        device = path.stat().st_dev
        if device in seen:
            continue
        seen.add(device)
        space = free_space(path)
        low_bytes = min_free_bytes and space.free_bytes < min_free_bytes
        low_percent = min_free_percent and space.free_percent < min_free_percent
        if low_bytes or low_percent:
            raise DiskSpaceLow(
                f"only {space.free_bytes // 1024**2} MiB ({space.free_percent:.1f}%) free on "
                f"the filesystem of {path}: no new runs until there is more than "
                f"{min_free_bytes // 1024**2} MiB and {min_free_percent:g}%",
                path=str(path), free_bytes=space.free_bytes, total_bytes=space.total_bytes,
                min_free_bytes=min_free_bytes, min_free_percent=min_free_percent,
                hint="free space there (old run logs go after [daemon] log_retention), or "
                     "lower [disk] min_free_bytes / min_free_percent")
