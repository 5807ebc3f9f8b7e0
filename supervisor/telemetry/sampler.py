"""Per-run telemetry sampling. Needs root (other users' /proc entries, cgroup files).

One sampler thread walks every registered run each 1/rate_hz seconds on a drift-free schedule:
the cgroup's numbers (processes, CPU time, memory, OOM kills) on every tick, the processes'
numbers (RSS, threads, fds, connections, I/O, children, commands; procfs.ProcStat and
procfs.Descriptors, psutil's values with fewer /proc lookups) on every `process_every`-th
tick, carried in between. Each tick's samples go to the event loop in one
`call_soon_threadsafe`; there they enter the run's rolling window and running summary and are
passed to the hub's `tripwires` (daemon/containment.py). The event loop never waits on /proc
or cgroupfs.

A pid that vanished or turned zombie, a permission error or a cgroup file that disappeared
skips that one datum, is counted (the summary's `skipped`) and never stops the sampler."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from supervisor.models import TelemetrySummary
from supervisor.telemetry import Sample
from supervisor.telemetry.procfs import (
    CgroupReader,
    Descriptors,
    OpenFiles,
    ProcStat,
    value_of,
)
from supervisor.telemetry.store import SummaryStore
from supervisor.telemetry.summary import SummaryBuilder

if TYPE_CHECKING:
    import psutil
else:
    psutil = None  # load_psutil(): at the first process walk, or at the daemon's start


def load_psutil() -> None:
    """psutil (~5 ms to import) is the process walk's alone (its exceptions, and the tests'
    process sources): a run shorter than the sampler's first walk of it (an embedded CI run of
    a quick command) never needs it. The daemon loads
    it as it starts, so no walk during a kill pays for the import."""
    global psutil
    if psutil is None:
        import psutil as module

        psutil = module

__all__ = ["TelemetryHub", "TickSchedule", "cpu_percent_between", "run_ticks"]

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_COMMANDS = 32
# The longest the sampler waits at one step for a kill to end (`stand_aside`): a kill's sweep
# is bounded by its confirmation timeouts; this only bounds a gate left shut by a bug.
STAND_ASIDE_MAX = 30.0
# Syscall attempts of a run not registered yet (a notification can beat the run_started hook,
# which fires once `runc start` has returned), for at most this many runs.
_MAX_EARLY_RUNS = 1024

Subscriber = Callable[[str, Sample], None]
# A pid's open fd count and the inodes of its TCP/UDP sockets (procfs.Descriptors), given
# what it found of each network namespace met so far in the walk (it fills that in).
FdReader = Callable[[int, dict[int, bool]], tuple[int, set[str]]]
# The run's veth counters (bytes, packets), for runs that have one; absent: not measured.
NetworkCounter = Callable[[], tuple[int, int]]
# The run's output counters (produced, recorded), from its output drain.
OutputCounter = Callable[[], tuple[int, int]]
# (tool calls, cost) the MCP gateway let through for a run so far (supervisor/daemon/egress.py).
McpCounter = Callable[[], tuple[int, float]]


class CgroupLike(Protocol):
    """A run's cgroup (supervisor.sandbox.cgroups.Cgroup): its v2 directory, and where its
    memory counters are (v2 files, or the v1 memory controller's on a hybrid host)."""

    path: Path

    def memory_files(self) -> tuple[Path, Path] | None: ...


class ProcessLike(Protocol):
    """The part of psutil.Process the sampler reads (procfs.ProcStat; the seam for tests)."""

    def oneshot(self) -> AbstractContextManager[Any]: ...
    def status(self) -> str: ...
    def name(self) -> str: ...
    def ppid(self) -> int: ...
    def memory_info(self) -> Any: ...
    def num_threads(self) -> int: ...
    def io_counters(self) -> Any: ...


ProcessSource = Callable[[int], ProcessLike]


def cpu_percent_between(previous: tuple[float, int], current: tuple[float, int]
                        ) -> float | None:
    """CPU use between two (monotonic seconds, usage_usec) readings; 100 = one core busy.
    None when no time passed or the counter went backwards."""
    elapsed = current[0] - previous[0]
    used_usec = current[1] - previous[1]
    if elapsed <= 0 or used_usec < 0:
        return None
    return used_usec / 1e6 / elapsed * 100.0


class TickSchedule:
    """Tick k is due at start + k*period, whatever the ticks before it cost, so the rate does
    not drift. A tick that ends past the next due time skips ahead to the first slot still in
    the future and counts the slots it missed as overruns."""

    def __init__(self, period: float, start: float) -> None:
        self.period = period
        self.start = start
        self.index = 0
        self.overruns = 0

    @property
    def due(self) -> float:
        return self.start + self.index * self.period

    def advance(self, now: float) -> int:
        """After a tick that ended at `now`: move to the next slot; returns the slots missed."""
        self.index += 1
        if now <= self.due:
            return 0
        first_future = math.floor((now - self.start) / self.period) + 1
        missed = first_future - self.index
        self.index = first_future
        self.overruns += missed
        return missed


def run_ticks(schedule: TickSchedule, clock: Callable[[], float],
              wait: Callable[[float], bool], tick: Callable[[], None]) -> None:
    """Call `tick` at each slot of `schedule` until `wait(timeout)` returns True (stop)."""
    while not wait(max(0.0, schedule.due - clock())):
        tick()
        schedule.advance(clock())


# ----------------------------------------------------------------------------- per-run state

@dataclass
class _ProcessTotals:
    """Sums over the run's processes at the last walk (None: no process answered)."""

    rss_bytes: int | None = None
    threads: int | None = None
    open_fds: int | None = None
    connections: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None
    children: int | None = None


def _plus(total: int | None, value: int | None) -> int | None:
    if value is None:
        return total
    return value if total is None else total + value


@dataclass(eq=False)
class _Probe:
    """What the sampler thread keeps of one run; only that thread changes it once registered
    (the event loop reads `skipped`, an int, which the GIL keeps whole)."""

    run_id: str
    cgroup_dir: str
    cpu_file: str
    stat_file: str
    memory_file: str | None
    oom_file: str | None
    started_at: float
    network_counter: NetworkCounter | None
    overruns_at_start: int
    output_counter: OutputCounter | None = None
    mcp_counter: McpCounter | None = None
    ticks: int = 0
    last_cpu: tuple[float, int] | None = None
    # cgroup.procs of the run's cgroup and of any descendant (re-listed on each walk).
    procs_files: list[str] = field(default_factory=list)
    processes: dict[int, ProcessLike] = field(default_factory=dict)
    totals: _ProcessTotals = field(default_factory=_ProcessTotals)
    commands: dict[str, None] = field(default_factory=dict)  # an insertion-ordered set
    skipped: int = 0
    failed: bool = False  # an unexpected error has been logged for this run

    @property
    def directories(self) -> list[str]:
        found = [self.cgroup_dir]
        for path in (self.memory_file, self.oom_file):
            if path is not None:
                found.append(os.path.dirname(path))
        return found


# A handed-over run's window in the handover record (daemon/handover.py), as rows of the
# sample's fields in order: at most this many bytes of JSON per run, the newest samples.
CARRIED_WINDOW_BYTES = 32 * 1024
_SAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(Sample))
_MAX_COMMAND_CHARS = 4096


def _window_to_wire(window: deque[Sample], budget: int) -> list[list[Any]]:
    rows: list[list[Any]] = []
    used = 2
    for sample in reversed(window):
        row = [list(value) if isinstance(value, tuple) else value
               for value in dataclasses.astuple(sample)]
        used += len(json.dumps(row, separators=(",", ":"))) + 1
        if used > budget:
            break
        rows.append(row)
    rows.reverse()
    return rows


def _window_from_wire(rows: Any) -> list[Sample] | None:
    """The samples `_window_to_wire` made; None if any row is not of its form (the window
    then starts empty: telemetry, never a reason to refuse the run). Absent: none."""
    if rows is None:
        return []
    if not isinstance(rows, list):
        return None
    samples = []
    for row in rows:
        if not isinstance(row, list) or len(row) != len(_SAMPLE_FIELDS):
            return None
        values = dict(zip(_SAMPLE_FIELDS, row, strict=True))
        commands = values.pop("commands")
        if not isinstance(commands, list) or len(commands) > MAX_COMMANDS or not all(
                isinstance(c, str) and len(c) <= _MAX_COMMAND_CHARS for c in commands):
            return None
        if not all(value is None or (isinstance(value, int | float)
                                     and not isinstance(value, bool) and math.isfinite(value))
                   for value in values.values()) or any(
                values[key] is None for key in ("ts", "wall_seconds", "processes",
                                                "syscall_attempts")):
            return None
        samples.append(Sample(**values, commands=tuple(commands)))
    return samples


@dataclass(eq=False)
class _Track:
    """What the event loop keeps of one run: the rolling window and the running summary."""

    window: deque[Sample]
    summary: SummaryBuilder
    syscall_attempts: int = 0


# ----------------------------------------------------------------------------- the hub

class TelemetryHub:
    """Every live run's telemetry. `register`, `unregister`, the readers, `deliver` and
    `add_syscall_attempt` belong to the event loop thread; the sampler thread only builds
    samples (`sample_once`) and hands them over."""

    def __init__(self, rate_hz: float, process_every: int, window: int,
                 loop: asyncio.AbstractEventLoop, *, store: SummaryStore | None = None,
                 cgroup_reader: CgroupReader | None = None,
                 process_source: ProcessSource | None = None,  # None: procfs.ProcStat
                 fd_reader: FdReader | None = None,  # None: procfs.Descriptors()
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.period = 1.0 / rate_hz
        self.process_every = process_every
        self.window = window
        self.loop = loop
        self.store = store
        # Each sample, once it is in its run's window (daemon/containment.py `on_sample`).
        self.tripwires: Subscriber | None = None
        self.ticks = 0
        self.schedule = TickSchedule(self.period, clock())
        self._files: CgroupReader = cgroup_reader if cgroup_reader is not None else OpenFiles()
        self._process_source = process_source
        self._fd_reader: FdReader = fd_reader if fd_reader is not None else Descriptors()
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()  # guards _probes and _released
        self._probes: dict[str, _Probe] = {}
        self._released: list[list[str]] = []  # directories whose open files the sampler closes
        self._tracks: dict[str, _Track] = {}  # event loop thread only
        self._early_attempts: dict[str, int] = {}
        self._carried: dict[str, dict[str, Any]] = {}  # expected adoptions (`expect`)
        self._tripwire_failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Shut while a kill runs (stand_aside): the sampler waits at its next run or process.
        self._no_kill = threading.Event()
        self._no_kill.set()
        self._kills = 0  # event loop thread only
        self.stood_aside = 0  # times the sampler waited for a kill (sampler thread)

    @property
    def overruns(self) -> int:
        return self.schedule.overruns

    @contextlib.contextmanager
    def stand_aside(self) -> Iterator[None]:
        """While a kill runs (event loop thread; nests): the sampler stops at its next run
        or process and waits. On a small host its walk of every process (a core's
        worth with a hundred agents of twenty processes) took CPU from the dying processes and
        the GIL from the kill; a tick missed meanwhile is counted as an overrun."""
        self._kills += 1
        self._no_kill.clear()
        try:
            yield
        finally:
            self._kills -= 1
            if not self._kills:
                self._no_kill.set()

    def _give_way(self) -> None:
        """Sampler thread: wait while a kill runs (bounded)."""
        if not self._no_kill.is_set():
            self.stood_aside += 1
            self._no_kill.wait(STAND_ASIDE_MAX)

    # ------------------------------------------------------------- registry (event loop)

    def register(self, run_id: str, cgroup: CgroupLike, started_at: float, *,
                 network_counter: NetworkCounter | None = None,
                 output_counter: OutputCounter | None = None,
                 mcp_counter: McpCounter | None = None) -> None:
        memory = cgroup.memory_files()
        memory_file, oom_file = (str(memory[0]), str(memory[1])) if memory else (None, None)
        directory = str(cgroup.path)
        probe = _Probe(run_id=run_id, cgroup_dir=directory, cpu_file=f"{directory}/cpu.stat",
                       stat_file=f"{directory}/cgroup.stat", memory_file=memory_file,
                       oom_file=oom_file, started_at=started_at,
                       network_counter=network_counter, overruns_at_start=self.overruns,
                       output_counter=output_counter, mcp_counter=mcp_counter)
        track = _Track(window=deque(maxlen=self.window),
                       summary=SummaryBuilder(run_id=run_id, started_at=started_at),
                       syscall_attempts=self._early_attempts.pop(run_id, 0))
        carried = self._carried.pop(run_id, None)
        if carried is not None:
            self._go_on(probe, track, carried)
        with self._lock:
            self._probes[run_id] = probe
        self._tracks[run_id] = track
        log.debug("telemetry: sampling run %s (%s, memory from %s)", run_id, directory,
                  memory_file)

    def carry(self, run_id: str, window_bytes: int = CARRIED_WINDOW_BYTES
              ) -> dict[str, Any] | None:
        """What the next daemon needs to go on with the run's telemetry where this one is
        (daemon/handover.py): its cumulative counts and summary, the CPU reading the next
        sample's cpu_percent is measured from (as wall time: the clocks are per process), and
        the newest samples of its window that fit in `window_bytes` of JSON (the record is
        bounded as a whole; the caller shares a budget among its runs)."""
        track = self._tracks.get(run_id)
        with self._lock:
            probe = self._probes.get(run_id)
        if track is None or probe is None:
            return None
        last_cpu = probe.last_cpu  # a tuple, replaced whole by the sampler thread
        summary = track.summary.freeze(ended_at=None, syscall_attempts=track.syscall_attempts,
                                       overruns=0, skipped=0)
        return {"syscall_attempts": track.syscall_attempts,
                "summary": summary.model_dump(mode="json"),
                "window": _window_to_wire(track.window, window_bytes),
                "last_cpu": None if last_cpu is None else [
                    self._wall_clock() - (self._clock() - last_cpu[0]), last_cpu[1]]}

    def expect(self, run_id: str, carried: dict[str, Any]) -> None:
        """`carry`'s answer from the previous daemon, for the run about to be registered
        (an adoption); at most `_MAX_EARLY_RUNS` wait."""
        if len(self._carried) >= _MAX_EARLY_RUNS:
            self._carried.pop(next(iter(self._carried)))
        self._carried[run_id] = carried

    def _go_on(self, probe: _Probe, track: _Track, carried: dict[str, Any]) -> None:
        """Take what `carry` gave; a part that is not of its form is logged and left at its
        start (a counter that restarts is telemetry, never a reason to refuse the run)."""
        attempts = carried.get("syscall_attempts")
        if isinstance(attempts, int) and not isinstance(attempts, bool) and attempts >= 0:
            track.syscall_attempts += attempts
        try:
            summary = TelemetrySummary.model_validate(carried.get("summary"))
            if summary.run_id != probe.run_id:
                raise ValueError(f"a summary of run {summary.run_id}")
            track.summary = SummaryBuilder.resumed(summary)
        except ValueError as exc:
            log.error("telemetry: run %s's summary not carried over: %s", probe.run_id, exc)
        kept = _window_from_wire(carried.get("window"))
        if kept is None:
            log.error("telemetry: run %s's window not carried over: not of its form",
                      probe.run_id)
        else:
            track.window.extend(kept)  # the deque keeps at most the newest `window`
        last_cpu = carried.get("last_cpu")
        if (isinstance(last_cpu, list) and len(last_cpu) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                        for v in last_cpu)):
            probe.last_cpu = (self._clock() - (self._wall_clock() - last_cpu[0]),
                              int(last_cpu[1]))

    def unregister(self, run_id: str) -> TelemetrySummary | None:
        """Stop sampling the run; its summary goes to SQLite and is returned."""
        with self._lock:
            probe = self._probes.pop(run_id, None)
            if probe is not None:
                self._released.append(probe.directories)
        track = self._tracks.pop(run_id, None)
        self._early_attempts.pop(run_id, None)
        self._carried.pop(run_id, None)
        if track is None or probe is None:
            return None
        if probe.output_counter is not None:  # the drain has finished by the run's end
            track.summary.add_output(*probe.output_counter())
        summary = self._freeze(track, probe, ended_at=self._wall_clock())
        if self.store is not None:
            try:
                self.store.put(summary)
            except sqlite3.Error as exc:
                log.error("telemetry: could not store the summary of run %s: %s", run_id, exc)
        log.debug("telemetry: run %s ended after %d samples", run_id, summary.samples)
        return summary

    def _freeze(self, track: _Track, probe: _Probe, ended_at: float | None
                ) -> TelemetrySummary:
        return track.summary.freeze(
            ended_at=ended_at, syscall_attempts=track.syscall_attempts,
            overruns=self.overruns - probe.overruns_at_start, skipped=probe.skipped)

    def add_syscall_attempt(self, run_id: str, count: int = 1) -> None:
        """Count notified syscalls of the run; the next sample carries the new total."""
        track = self._tracks.get(run_id)
        if track is not None:
            track.syscall_attempts += count
            return
        if run_id not in self._early_attempts and len(self._early_attempts) >= _MAX_EARLY_RUNS:
            self._early_attempts.pop(next(iter(self._early_attempts)))
        self._early_attempts[run_id] = self._early_attempts.get(run_id, 0) + count

    # ------------------------------------------------------------- readers (event loop)

    def tracking(self, run_id: str) -> bool:
        return run_id in self._tracks

    def samples(self, run_id: str, limit: int) -> list[Sample]:
        """The run's most recent samples (at most `limit`), oldest first."""
        track = self._tracks.get(run_id)
        if track is None or limit <= 0:
            return []
        window = track.window
        start = max(0, len(window) - limit)
        return [window[i] for i in range(start, len(window))]

    def latest(self, run_id: str) -> Sample | None:
        track = self._tracks.get(run_id)
        return track.window[-1] if track is not None and track.window else None

    def summary(self, run_id: str) -> TelemetrySummary | None:
        """The live summary of a sampled run, else the stored one of an ended run."""
        track = self._tracks.get(run_id)
        with self._lock:
            probe = self._probes.get(run_id)
        if track is not None and probe is not None:
            return self._freeze(track, probe, ended_at=None)
        if self.store is None:
            return None
        try:
            return self.store.get(run_id)
        except sqlite3.Error as exc:
            log.error("telemetry: could not read the summary of run %s: %s", run_id, exc)
            return None

    # ------------------------------------------------------------- delivery (event loop)

    def deliver(self, batch: list[tuple[str, Sample]]) -> None:
        """One tick's samples: into each run's window and summary, then to the tripwires (one
        that fails loses nothing here: the windows, summaries and later samples go on)."""
        for run_id, built in batch:
            track = self._tracks.get(run_id)
            if track is None:
                continue  # the run ended while its sample was on the way
            sample = built
            if track.syscall_attempts != sample.syscall_attempts:
                sample = replace(sample, syscall_attempts=track.syscall_attempts)
            track.window.append(sample)
            track.summary.add(sample)
            if self.tripwires is not None:
                try:
                    self.tripwires(run_id, sample)
                except Exception:
                    self._tripwire_failures += 1
                    if self._tripwire_failures == 1 or self._tripwire_failures % 1000 == 0:
                        log.exception("telemetry's tripwires %r failed (%d times)",
                                      self.tripwires, self._tripwire_failures)

    # ------------------------------------------------------------- the sampler thread

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self.schedule = TickSchedule(self.period, self._clock())
        self._thread = threading.Thread(target=self._main, name="telemetry-sampler",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("telemetry: the sampler thread did not stop within %.0fs", timeout)
                return  # it still owns the open files
            self._thread = None
        if isinstance(self._files, OpenFiles):
            self._files.close()

    def _main(self) -> None:
        run_ticks(self.schedule, self._clock, self._stop.wait, self._tick)

    def _tick(self) -> None:
        try:
            batch = self.sample_once()
        except Exception:  # a bug in here must not end sampling for every run
            log.exception("telemetry: a sampler tick failed")
            return
        if not batch:
            return
        try:
            self.loop.call_soon_threadsafe(self.deliver, batch)
        except RuntimeError:  # the loop is closed: the daemon is going away
            self._stop.set()

    def sample_once(self) -> list[tuple[str, Sample]]:
        """One tick over every registered run (the sampler thread's work; tests call it)."""
        with self._lock:
            probes = list(self._probes.values())
            released, self._released = self._released, []
        for directories in released:
            self._files.release(directories)
        batch = []
        for probe in probes:
            self._give_way()
            try:
                sample = self._sample(probe)
            except Exception:
                probe.skipped += 1
                if not probe.failed:
                    probe.failed = True
                    log.exception("telemetry: sampling run %s failed", probe.run_id)
                continue
            if sample is not None:
                batch.append((probe.run_id, sample))
        self.ticks += 1
        return batch

    def _sample(self, probe: _Probe) -> Sample | None:
        now = self._clock()
        wall_now = self._wall_clock()
        walk = probe.ticks % self.process_every == 0
        probe.ticks += 1
        pids = self._pids(probe, relist=walk)
        if pids is None:
            return None  # the run's cgroup is gone; its end is on the way
        cpu_seconds = cpu_percent = None
        cpu_usec = self._read_value(probe, probe.cpu_file, b"usage_usec")
        if cpu_usec is not None:
            cpu_seconds = cpu_usec / 1e6
            if probe.last_cpu is not None:
                cpu_percent = cpu_percent_between(probe.last_cpu, (now, cpu_usec))
            probe.last_cpu = (now, cpu_usec)
        memory_bytes = oom_kills = None
        if probe.memory_file is not None:
            memory_bytes = self._read_value(probe, probe.memory_file, None)
        if probe.oom_file is not None:
            oom_kills = self._read_value(probe, probe.oom_file, b"oom_kill")
        if walk:
            probe.totals = self._walk(probe, pids)
        network_bytes = network_packets = None
        if probe.network_counter is not None:
            try:
                network_bytes, network_packets = probe.network_counter()
            except OSError:
                probe.skipped += 1
        output_bytes = output_recorded = None
        if probe.output_counter is not None:
            output_bytes, output_recorded = probe.output_counter()
        mcp_calls = mcp_cost = None
        if probe.mcp_counter is not None:
            mcp_calls, mcp_cost = probe.mcp_counter()
        totals = probe.totals
        return Sample(
            ts=wall_now, wall_seconds=max(0.0, wall_now - probe.started_at),
            processes=len(pids), cpu_seconds=cpu_seconds, cpu_percent=cpu_percent,
            memory_bytes=memory_bytes, oom_kills=oom_kills, rss_bytes=totals.rss_bytes,
            threads=totals.threads, open_fds=totals.open_fds, connections=totals.connections,
            io_read_bytes=totals.io_read_bytes, io_write_bytes=totals.io_write_bytes,
            children=totals.children, commands=tuple(probe.commands),
            network_bytes=network_bytes, network_packets=network_packets,
            output_bytes=output_bytes, output_recorded_bytes=output_recorded,
            mcp_calls=mcp_calls, mcp_cost=mcp_cost,
        )

    def _read(self, probe: _Probe, path: str) -> bytes | None:
        try:
            return self._files.read(path)
        except OSError:  # ENOENT or ENODEV (removed under us), EACCES, anything else
            probe.skipped += 1
            return None

    def _read_value(self, probe: _Probe, path: str, key: bytes | None) -> int | None:
        data = self._read(probe, path)
        if data is None:
            return None
        try:
            return int(data) if key is None else value_of(data, key)
        except ValueError:
            probe.skipped += 1
            return None

    def _pids(self, probe: _Probe, relist: bool) -> list[int] | None:
        """Every pid in the run's cgroup and its descendants; None once the cgroup is gone."""
        if relist or not probe.procs_files:
            # Agents cannot normally make sub-cgroups; a process in one is theirs all the same.
            # cgroup.stat says whether there are any, for less than listing the directory.
            descendants = self._read_value(probe, probe.stat_file, b"nr_descendants")
            directories = [probe.cgroup_dir]
            if descendants:
                directories = [d for d, _subdirs, _files in os.walk(probe.cgroup_dir)]
            probe.procs_files = [f"{d}/cgroup.procs" for d in directories or [probe.cgroup_dir]]
        pids: list[int] = []
        for index, path in enumerate(probe.procs_files):
            data = self._read(probe, path)
            if data is None:
                if index == 0:
                    return None
                continue
            pids.extend(int(pid) for pid in data.split())
        return pids

    # ------------------------------------------------------------- the process walk

    def _walk(self, probe: _Probe, pids: list[int]) -> _ProcessTotals:
        if pids:  # the loop's except clauses name psutil's exceptions too
            load_psutil()
        source = self._process_source
        totals = _ProcessTotals(children=0)
        if not pids:
            totals = _ProcessTotals(0, 0, 0, 0, 0, 0, 0)
        members = set(pids)
        sockets: set[str] | None = None
        namespaces: dict[int, bool] = {}  # whether each network namespace has inet sockets
        for pid in pids:
            self._give_way()
            try:
                process = probe.processes.get(pid)
                if process is None:
                    process = (source or ProcStat)(pid)
                    probe.processes[pid] = process
                if not self._read_process(probe, process, members, totals):
                    continue
                fds = self._datum(probe, partial(self._fd_reader, pid, namespaces))
                if fds is not None:
                    totals.open_fds = _plus(totals.open_fds, fds[0])
                    sockets = fds[1] if sockets is None else sockets | fds[1]
            except psutil.NoSuchProcess:  # and ZombieProcess: it exited since the listing
                probe.skipped += 1
                probe.processes.pop(pid, None)
            except (psutil.AccessDenied, OSError):
                probe.skipped += 1
        for gone in [pid for pid in probe.processes if pid not in members]:
            del probe.processes[gone]
        if sockets is not None:
            totals.connections = len(sockets)
        return totals

    def _read_process(self, probe: _Probe, process: ProcessLike, members: set[int],
                      totals: _ProcessTotals) -> bool:
        """Add one process to the totals; False for a zombie, which has nothing to read."""
        with process.oneshot():
            name = self._datum(probe, process.name)
            if name and name not in probe.commands and len(probe.commands) < MAX_COMMANDS:
                probe.commands[name] = None
            if process.status() == psutil.STATUS_ZOMBIE:
                probe.skipped += 1  # exited, not yet reaped
                return False
            if process.ppid() in members:
                totals.children = _plus(totals.children, 1)
            memory = self._datum(probe, process.memory_info)
            totals.rss_bytes = _plus(totals.rss_bytes, memory.rss if memory else None)
            totals.threads = _plus(totals.threads, self._datum(probe, process.num_threads))
            io = self._datum(probe, process.io_counters)
            if io is not None:
                totals.io_read_bytes = _plus(totals.io_read_bytes, io.read_bytes)
                totals.io_write_bytes = _plus(totals.io_write_bytes, io.write_bytes)
        return True

    @staticmethod
    def _datum(probe: _Probe, read: Callable[[], T]) -> T | None:
        """One reading of one process. A vanished process propagates (the caller skips the
        rest of it); a refused or failed reading is skipped and counted."""
        try:
            return read()
        except psutil.NoSuchProcess:
            raise
        except (psutil.AccessDenied, OSError):
            probe.skipped += 1
            return None
