"""The telemetry hub (supervisor/telemetry/) without root: the drift-free schedule on an injected
clock, the cpu_percent math, the rolling window and the summary, and a sampler that keeps going
through vanished pids, zombies, permission errors and disappearing cgroup files, all behind its
seams (a cgroup directory in tmp, fake processes, a failing file reader)."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from supervisor.daemon.store import connect
from supervisor.models import TelemetryView
from supervisor.sandbox.cgroups import Cgroup
from supervisor.telemetry import METRICS, Sample, procfs
from supervisor.telemetry.procfs import (
    STATUS_ZOMBIE,
    Descriptors,
    OpenFiles,
    ProcStat,
    fd_dir_sized,
    has_inet_sockets,
    read_fds,
    read_file,
    value_of,
)
from supervisor.telemetry.sampler import (
    MAX_COMMANDS,
    TelemetryHub,
    TickSchedule,
    cpu_percent_between,
    run_ticks,
)
from supervisor.telemetry.store import SummaryStore

MIB = 1024 * 1024

# ----------------------------------------------------------------------------- schedule


def test_ticks_fall_on_the_grid_whatever_each_tick_costs() -> None:
    schedule = TickSchedule(0.1, start=100.0)
    dues = []
    for cost in (0.01, 0.07, 0.0, 0.099, 0.03):
        dues.append(schedule.due)
        assert schedule.advance(schedule.due + cost) == 0
    assert dues == pytest.approx([100.0, 100.1, 100.2, 100.3, 100.4])
    assert schedule.due == pytest.approx(100.5)  # no drift: not 100.5 + the costs
    assert schedule.overruns == 0


def test_a_late_tick_skips_ahead_and_counts_the_missed_slots() -> None:
    schedule = TickSchedule(0.1, start=0.0)
    assert schedule.advance(0.35) == 3  # tick 0 ran until 0.35: slots 1, 2 and 3 are missed
    assert schedule.due == pytest.approx(0.4)
    assert schedule.advance(0.4) == 0  # exactly on the next slot: on time
    assert schedule.due == pytest.approx(0.5)
    assert schedule.overruns == 3


class FakeTime:
    """A clock that moves only when the sampler waits or a tick 'works'."""

    def __init__(self, costs: Iterable[float], start: float = 50.0) -> None:
        self.now = start
        self.costs = list(costs)
        self.tick_times: list[float] = []

    def clock(self) -> float:
        return self.now

    def wait(self, timeout: float) -> bool:
        if not self.costs:
            return True  # stop
        self.now += timeout
        return False

    def tick(self) -> None:
        self.tick_times.append(self.now)
        self.now += self.costs.pop(0)


def test_run_ticks_is_drift_free_on_an_injected_clock() -> None:
    fake = FakeTime([0.02, 0.05, 0.26, 0.01, 0.0])
    schedule = TickSchedule(0.1, fake.clock())
    run_ticks(schedule, fake.clock, fake.wait, fake.tick)
    # Tick 2 starts at 50.2 and ends at 50.46: slots 50.3 and 50.4 are skipped.
    assert fake.tick_times == pytest.approx([50.0, 50.1, 50.2, 50.5, 50.6])
    assert schedule.overruns == 2


# ----------------------------------------------------------------------------- cpu math


def test_cpu_percent_is_cpu_time_over_wall_time() -> None:
    assert cpu_percent_between((10.0, 1_000_000), (10.5, 1_250_000)) == pytest.approx(50.0)
    assert cpu_percent_between((0.0, 0), (0.1, 200_000)) == pytest.approx(200.0)  # two cores
    assert cpu_percent_between((0.0, 0), (1.0, 0)) == 0.0
    assert cpu_percent_between((1.0, 0), (1.0, 5)) is None  # no time passed
    assert cpu_percent_between((0.0, 500), (1.0, 100)) is None  # the counter went back


# ----------------------------------------------------------------------------- fakes


@dataclasses.dataclass
class FakeProcess:
    """psutil.Process as the sampler sees it; `fail` maps a method name to what it raises
    ("fds": what reading its fd directory raises)."""

    pid: int
    name_: str = "agent"
    ppid_: int = 1
    status_: str = psutil.STATUS_SLEEPING
    rss: int = 10 * MIB
    threads: int = 1
    fds: int = 4
    read_bytes: int = 100
    write_bytes: int = 10
    fail: dict[str, BaseException] = dataclasses.field(default_factory=dict)

    def _check(self, method: str) -> None:
        if method in self.fail:
            raise self.fail[method]

    def oneshot(self) -> AbstractContextManager[Any]:
        return nullcontext()

    def status(self) -> str:
        self._check("status")
        return self.status_

    def name(self) -> str:
        self._check("name")
        return self.name_

    def ppid(self) -> int:
        self._check("ppid")
        return self.ppid_

    def memory_info(self) -> Any:
        self._check("memory_info")
        return SimpleNamespace(rss=self.rss)

    def num_threads(self) -> int:
        self._check("num_threads")
        return self.threads

    def io_counters(self) -> Any:
        self._check("io_counters")
        return SimpleNamespace(read_bytes=self.read_bytes, write_bytes=self.write_bytes)


class FakeHost:
    """A cgroup directory in tmp with the files the sampler reads, fake processes, and a clock
    that advances 0.1 s per tick."""

    def __init__(self, root: Path, relative: str = "agent-supervisor/as-1") -> None:
        # A hybrid host's trees: the v2 one at unified/, the v1 memory controller at memory/.
        (root / "unified").mkdir(parents=True)
        (root / "unified" / "cgroup.controllers").write_text("")
        self.cgroup = Cgroup(relative, host_root=root)
        self.cgroup.path.mkdir(parents=True)
        self.v1_root = root / "memory"
        self.processes: dict[int, FakeProcess] = {}
        self.sockets: dict[int, set[str]] = {}
        self.now = 1000.0
        self.write(pids=[], cpu_usec=0, memory=0)

    def write(self, pids: list[int] | None = None, cpu_usec: int | None = None,
              memory: int | None = None, oom_kills: int | None = None) -> None:
        directory = self.cgroup.path
        if pids is not None:
            (directory / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
            (directory / "cgroup.stat").write_text("nr_descendants 0\nnr_dying_descendants 0\n")
        if cpu_usec is not None:
            (directory / "cpu.stat").write_text(
                f"usage_usec {cpu_usec}\nuser_usec {cpu_usec}\nsystem_usec 0\n")
        if memory is not None:
            (directory / "memory.current").write_text(f"{memory}\n")
        if oom_kills is not None or not (directory / "memory.events").exists():
            (directory / "memory.events").write_text(
                f"low 0\nhigh 0\nmax 0\noom 0\noom_kill {oom_kills or 0}\n")

    def add(self, process: FakeProcess) -> FakeProcess:
        self.processes[process.pid] = process
        return process

    def process_source(self, pid: int) -> FakeProcess:
        try:
            return self.processes[pid]
        except KeyError:
            raise psutil.NoSuchProcess(pid) from None

    def read_fds(self, pid: int, _namespaces: dict[int, bool]) -> tuple[int, set[str]]:
        process = self.processes[pid]
        process._check("fds")
        return process.fds, self.sockets.get(pid, set())

    def clock(self) -> float:
        return self.now

    def hub(self, loop: asyncio.AbstractEventLoop, *, process_every: int = 1,
            window: int = 600, store: SummaryStore | None = None,
            reader: Any = None) -> TelemetryHub:
        return TelemetryHub(10.0, process_every, window, loop, store=store,
                            cgroup_reader=reader or PlainReader(),
                            process_source=self.process_source,
                            fd_reader=self.read_fds, clock=self.clock,
                            wall_clock=self.clock)

    def tick(self, hub: TelemetryHub) -> list[tuple[str, Sample]]:
        """One sampler tick, delivered as the event loop would."""
        batch = hub.sample_once()
        hub.deliver(batch)
        self.now += 0.1
        return batch


class PlainReader:
    """The reader seam: plain reads, with failures injected per file name."""

    def __init__(self) -> None:
        self.fail: dict[str, OSError] = {}

    def read(self, path: str) -> bytes:
        name = Path(path).name
        if name in self.fail:
            raise self.fail[name]
        return read_file(path)

    def release(self, directories: Iterable[str]) -> None:
        pass


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


# ----------------------------------------------------------------------------- samples


def test_a_sample_carries_the_cgroup_and_the_process_numbers(
        host: FakeHost, loop: asyncio.AbstractEventLoop) -> None:
    host.add(FakeProcess(10, name_="python3", ppid_=1, rss=30 * MIB, threads=3, fds=8))
    host.add(FakeProcess(11, name_="sh", ppid_=10, rss=2 * MIB, fds=3, read_bytes=5))
    host.add(FakeProcess(12, name_="sleep", ppid_=11, rss=1 * MIB, write_bytes=7))
    # 11 inherited socket 1001 from 10: one socket, counted once.
    host.sockets = {10: {"1001", "1002"}, 11: {"1001"}, 12: {"1003"}}
    host.write(pids=[10, 11, 12], cpu_usec=2_000_000, memory=64 * MIB, oom_kills=1)
    hub = host.hub(loop)
    hub.register("r1", host.cgroup, started_at=host.now - 5.0)
    [(run_id, first)] = host.tick(hub)
    assert run_id == "r1"
    assert first.processes == 3 and first.memory_bytes == 64 * MIB and first.oom_kills == 1
    assert first.cpu_seconds == pytest.approx(2.0) and first.cpu_percent is None
    assert first.wall_seconds == pytest.approx(5.0)
    assert (first.rss_bytes, first.threads, first.open_fds) == (33 * MIB, 5, 15)
    assert (first.io_read_bytes, first.io_write_bytes) == (205, 27)
    assert first.children == 2  # 11 and 12 have a parent in the cgroup; 10's is outside
    assert first.connections == 3
    assert first.commands == ("python3", "sh", "sleep")
    assert first.network_bytes is None and first.syscall_attempts == 0

    host.write(cpu_usec=2_050_000)  # 0.05 s of CPU over the 0.1 s tick
    [(_, second)] = host.tick(hub)
    assert second.cpu_percent == pytest.approx(50.0)
    assert hub.latest("r1") == second


def test_processes_are_walked_every_nth_tick_and_carried_between(
        host: FakeHost, loop: asyncio.AbstractEventLoop) -> None:
    process = host.add(FakeProcess(10, rss=10 * MIB))
    host.write(pids=[10])
    hub = host.hub(loop, process_every=3)
    hub.register("r1", host.cgroup, started_at=host.now)
    rss = []
    for step in range(7):
        process.rss = (step + 1) * MIB
        host.write(memory=(step + 1) * MIB)
        [(_, sample)] = host.tick(hub)
        rss.append(sample.rss_bytes)
        assert sample.memory_bytes == (step + 1) * MIB  # the cgroup: every tick
    assert rss == [1 * MIB, 1 * MIB, 1 * MIB, 4 * MIB, 4 * MIB, 4 * MIB, 7 * MIB]


def test_processes_in_a_descendant_cgroup_count(host: FakeHost,
                                                loop: asyncio.AbstractEventLoop) -> None:
    inner = host.cgroup.path / "inner"
    inner.mkdir()
    (inner / "cgroup.procs").write_text("20\n21\n")
    host.add(FakeProcess(10))
    host.add(FakeProcess(20, ppid_=10))
    host.add(FakeProcess(21, ppid_=20))
    host.write(pids=[10])
    (host.cgroup.path / "cgroup.stat").write_text("nr_descendants 1\nnr_dying_descendants 0\n")
    hub = host.hub(loop, process_every=2)
    hub.register("r1", host.cgroup, started_at=host.now)
    samples = [host.tick(hub)[0][1] for _ in range(3)]
    assert [s.processes for s in samples] == [3, 3, 3]
    assert samples[0].children == 2 and skipped(hub) == 0


def test_an_empty_cgroup_samples_zeroes(host: FakeHost,
                                        loop: asyncio.AbstractEventLoop) -> None:
    hub = host.hub(loop)
    hub.register("r1", host.cgroup, started_at=host.now)
    [(_, sample)] = host.tick(hub)
    assert sample.processes == 0
    assert (sample.rss_bytes, sample.threads, sample.open_fds, sample.children) == (0, 0, 0, 0)


def test_memory_from_the_v1_controller_on_hybrid_hosts(
        host: FakeHost, loop: asyncio.AbstractEventLoop) -> None:
    (host.cgroup.path / "memory.current").unlink()
    (host.cgroup.path / "memory.events").unlink()
    v1 = host.v1_root / host.cgroup.relative
    v1.mkdir(parents=True)
    (v1 / "memory.usage_in_bytes").write_text(f"{48 * MIB}\n")
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    hub = host.hub(loop)
    hub.register("r1", host.cgroup, started_at=host.now)
    [(_, sample)] = host.tick(hub)
    assert (sample.memory_bytes, sample.oom_kills) == (48 * MIB, 2)


def test_no_memory_files_at_all_means_not_measured(
        host: FakeHost, loop: asyncio.AbstractEventLoop) -> None:
    (host.cgroup.path / "memory.current").unlink()
    hub = host.hub(loop)
    hub.register("r1", host.cgroup, started_at=host.now)
    [(_, sample)] = host.tick(hub)
    assert (sample.memory_bytes, sample.oom_kills) == (None, None)
    assert hub.summary("r1").skipped == 0  # type: ignore[union-attr]  # absent, not failed


def test_commands_are_capped(host: FakeHost, loop: asyncio.AbstractEventLoop) -> None:
    pids = list(range(100, 100 + MAX_COMMANDS + 8))
    for pid in pids:
        host.add(FakeProcess(pid, name_=f"cmd{pid}"))
    host.write(pids=pids)
    hub = host.hub(loop)
    hub.register("r1", host.cgroup, started_at=host.now)
    [(_, sample)] = host.tick(hub)
    assert len(sample.commands) == MAX_COMMANDS
    assert sample.commands[0] == "cmd100"


# ----------------------------------------------------------------------------- robustness


def skipped(hub: TelemetryHub, run_id: str = "r1") -> int:
    summary = hub.summary(run_id)
    assert summary is not None
    return summary.skipped


def test_a_pid_that_vanished_before_it_was_read_is_skipped(
        host: FakeHost, loop: asyncio.AbstractEventLoop) -> None:
    host.add(FakeProcess(10, rss=5 * MIB))
    host.write(pids=[10, 11])  # 11 is listed but gone: the source raises NoSuchProcess
    hub = host.hub(loop)
    hub.register("r1", host.cgroup, started_at=host.now)
    [(_, sample)] = host.tick(hub)
    assert sample.processes == 2 and sample.rss_bytes == 5 * MIB
    assert skipped(hub) == 1


def test_a_pid_that_vanishes_while_it_is_read_is_skipped(
        host: FakeHost, loop: asyncio.AbstractEventLoop) -> None:
    host.add(FakeProcess(10, rss=5 * MIB, threads=2))
    host.add(FakeProcess(11, fail={"num_threads": psutil.NoSuchProcess(11)}))
    host.write(pids=[10, 11])
    hub = host.hub(loop)
    hub.register("r1", host.cgroup, started_at=host.now)
    [(_, sample)] = host.tick(hub)
    assert sample.threads == 2  # 11 contributed nothing after it vanished
    assert skipped(hub) == 1


@pytest.mark.parametrize("how", ["status", "exception"])
def test_a_zombie_is_skipped(how: str, host: FakeHost,
                             loop: asyncio.AbstractEventLoop) -> None:
    host.add(FakeProcess(10, rss=5 * MIB))
    if how == "status":
        host.add(FakeProcess(11, name_="defunct", status_=psutil.STATUS_ZOMBIE, rss=99 * MIB))
    else:
        host.add(FakeProcess(11, fail={"memory_info": psutil.ZombieProcess(11)}))
    host.write(pids=[10, 11])
    hub = host.hub(loop)
    hub.register("r1", host.cgroup, started_at=host.now)
    [(_, sample)] = host.tick(hub)
    assert sample.rss_bytes == 5 * MIB
    assert skipped(hub) == 1


def test_a_permission_error_skips_only_that_datum(
        host: FakeHost, loop: asyncio.AbstractEventLoop) -> None:
    host.add(FakeProcess(10, fds=4, fail={"io_counters": psutil.AccessDenied(10)}))
    host.add(FakeProcess(11, fds=6, fail={"fds": PermissionError(13, "Permission denied")}))
    host.add(FakeProcess(12, fds=1, fail={"memory_info": psutil.AccessDenied(12)}))
    host.sockets = {10: {"1001"}, 11: {"1002"}}
    host.write(pids=[10, 11, 12])
    hub = host.hub(loop)
    hub.register("r1", host.cgroup, started_at=host.now)
    [(_, sample)] = host.tick(hub)
    assert sample.open_fds == 5  # 11's fd directory refused; 10's and 12's counted
    assert sample.connections == 1  # 11's sockets are behind the same refusal
    assert sample.io_read_bytes == 200  # 10's I/O refused; 11's and 12's counted
    assert sample.rss_bytes == 20 * MIB  # 12's refused
    assert sample.threads == 3
    assert skipped(hub) == 3


def test_a_datum_every_process_refuses_is_not_measured(
        host: FakeHost, loop: asyncio.AbstractEventLoop) -> None:
    host.add(FakeProcess(10, fail={"fds": PermissionError(13, "Permission denied")}))
    host.write(pids=[10])
    hub = host.hub(loop)
    hub.register("r1", host.cgroup, started_at=host.now)
    [(_, sample)] = host.tick(hub)
    assert (sample.open_fds, sample.connections) == (None, None)
    assert sample.threads == 1


@pytest.mark.parametrize("error", [FileNotFoundError(errno.ENOENT, "gone"),
                                   OSError(errno.ENODEV, "No such device")],
                         ids=["ENOENT", "ENODEV"])
def test_a_cgroup_file_that_disappeared_skips_that_datum(
        error: OSError, host: FakeHost, loop: asyncio.AbstractEventLoop) -> None:
    host.write(pids=[], cpu_usec=1000, memory=MIB)
    reader = PlainReader()
    hub = host.hub(loop, reader=reader)
    hub.register("r1", host.cgroup, started_at=host.now)
    reader.fail["memory.current"] = error
    reader.fail["cpu.stat"] = error
    [(_, sample)] = host.tick(hub)
    assert sample.memory_bytes is None and sample.cpu_seconds is None
    assert sample.oom_kills == 0
    assert skipped(hub) == 2
    reader.fail.clear()
    [(_, sample)] = host.tick(hub)
    assert sample.memory_bytes == MIB


def test_a_removed_cgroup_yields_no_sample_and_the_others_go_on(
        tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    gone, alive = FakeHost(tmp_path / "a"), FakeHost(tmp_path / "b")
    reader = PlainReader()
    hub = alive.hub(loop, reader=reader)
    hub.register("gone", gone.cgroup, started_at=alive.now)
    hub.register("alive", alive.cgroup, started_at=alive.now)
    reader.fail["cgroup.procs"] = OSError(errno.ENODEV, "No such device")
    assert alive.tick(hub) == []
    reader.fail.clear()
    for path in sorted(gone.cgroup.path.iterdir()):
        path.unlink()
    gone.cgroup.path.rmdir()
    batch = alive.tick(hub)
    assert [run_id for run_id, _ in batch] == ["alive"]
    assert skipped(hub, "gone") >= 2


def test_a_bug_in_one_run_does_not_stop_the_others(
        tmp_path: Path, loop: asyncio.AbstractEventLoop,
        caplog: pytest.LogCaptureFixture) -> None:
    bad, good = FakeHost(tmp_path / "a"), FakeHost(tmp_path / "b")
    bad.write(pids=[10])  # pid 10 is listed only in bad's cgroup
    good.add(FakeProcess(10, fail={"status": RuntimeError("a bug")}))
    hub = good.hub(loop)
    hub.register("bad", bad.cgroup, started_at=good.now)
    hub.register("good", good.cgroup, started_at=good.now)
    with caplog.at_level(logging.ERROR, logger="supervisor.telemetry.sampler"):
        for _ in range(3):
            assert [run_id for run_id, _ in good.tick(hub)] == ["good"]
    assert len([r for r in caplog.records if "sampling run bad failed" in r.message]) == 1
    assert skipped(hub, "bad") == 3


def test_network_counter_hook(host: FakeHost, loop: asyncio.AbstractEventLoop) -> None:
    counters: Iterator[tuple[int, int] | OSError] = iter(
        [(1500, 3), OSError(errno.ENODEV, "veth gone")])

    def network() -> tuple[int, int]:
        value = next(counters)
        if isinstance(value, OSError):
            raise value
        return value

    hub = host.hub(loop)
    hub.register("r1", host.cgroup, started_at=host.now, network_counter=network)
    [(_, first)] = host.tick(hub)
    [(_, second)] = host.tick(hub)
    assert (first.network_bytes, first.network_packets) == (1500, 3)
    assert (second.network_bytes, second.network_packets) == (None, None)
    assert skipped(hub) == 1


def test_output_counter_hook(host: FakeHost, loop: asyncio.AbstractEventLoop) -> None:
    """Samples carry the run's output counters; the summary takes the final ones at the end,
    even when the last sample is a tick behind."""
    counts = [(100, 100)]
    hub = host.hub(loop)
    hub.register("r1", host.cgroup, started_at=host.now, output_counter=lambda: counts[-1])
    [(_, first)] = host.tick(hub)
    hub.deliver([("r1", first)])
    assert (first.output_bytes, first.output_recorded_bytes) == (100, 100)
    counts.append((5000, 1024))
    summary = hub.unregister("r1")
    assert summary is not None
    assert (summary.output_bytes, summary.output_recorded_bytes) == (5000, 1024)


# ----------------------------------------------------------------------------- window, summary


def test_the_window_keeps_the_most_recent_samples(
        host: FakeHost, loop: asyncio.AbstractEventLoop) -> None:
    hub = host.hub(loop, window=10)
    hub.register("r1", host.cgroup, started_at=host.now)
    for step in range(25):
        host.write(memory=step)
        host.tick(hub)
    assert [s.memory_bytes for s in hub.samples("r1", 100)] == list(range(15, 25))
    assert [s.memory_bytes for s in hub.samples("r1", 3)] == [22, 23, 24]
    assert hub.samples("r1", 0) == [] and hub.samples("nope", 5) == []
    assert hub.latest("r1").memory_bytes == 24  # type: ignore[union-attr]
    assert hub.summary("r1").samples == 25  # type: ignore[union-attr]  # all, not the window


def test_the_summary_is_kept_up_to_date_and_stored_when_the_run_ends(
        host: FakeHost, loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    db = connect(tmp_path / "state.db")
    try:
        store = SummaryStore(db)
        hub = host.hub(loop, store=store)
        process = host.add(FakeProcess(10, name_="python3", threads=2, fds=5))
        hub.add_syscall_attempt("r1")  # before the run is registered: kept for it
        hub.register("r1", host.cgroup, started_at=host.now)
        steps = [(10, 1_000_000, 100), (40, 1_030_000, 300), (20, 1_040_000, 200)]
        for memory_mib, cpu_usec, pid_count in steps:
            host.write(pids=list(range(10, 10 + pid_count // 100)), cpu_usec=cpu_usec,
                       memory=memory_mib * MIB)
            for pid in range(11, 10 + pid_count // 100):
                host.processes.setdefault(pid, FakeProcess(pid, name_="sh", ppid_=10))
            process.fds = pid_count // 10
            host.tick(hub)
        hub.add_syscall_attempt("r1")
        hub.add_syscall_attempt("r1")
        host.tick(hub)
        assert hub.latest("r1").syscall_attempts == 3  # type: ignore[union-attr]

        live = hub.summary("r1")
        assert live is not None and live.ended_at is None
        assert live.peak_memory_bytes == 40 * MIB and live.peak_processes == 3
        assert live.cpu_seconds == pytest.approx(1.04)
        assert live.max_cpu_percent == pytest.approx(30.0)
        assert live.peak_open_fds == 30 + 2 * 4 and live.peak_threads == 4
        assert live.commands == ["python3", "sh"]
        assert live.syscall_attempts == 3 and live.samples == 4

        ended = hub.unregister("r1")
        assert ended is not None and ended.ended_at == pytest.approx(host.now)
        assert ended.model_dump(exclude={"ended_at"}) == live.model_dump(exclude={"ended_at"})
        assert not hub.tracking("r1")
        assert hub.summary("r1") == ended  # now from SQLite
        assert SummaryStore(db).get("r1") == ended  # a restarted daemon reads it too
        assert hub.unregister("r1") is None
        assert hub.sample_once() == []
    finally:
        db.close()


def test_samples_of_a_run_that_ended_meanwhile_are_dropped(
        host: FakeHost, loop: asyncio.AbstractEventLoop) -> None:
    hub = host.hub(loop)
    seen: list[str] = []
    hub.tripwires = lambda run_id, sample: seen.append(run_id)
    hub.register("r1", host.cgroup, started_at=host.now)
    batch = hub.sample_once()
    hub.unregister("r1")
    hub.deliver(batch)
    assert seen == [] and hub.samples("r1", 10) == []


def test_the_tripwires_get_every_sample_and_a_failing_one_is_contained(
        host: FakeHost, loop: asyncio.AbstractEventLoop,
        caplog: pytest.LogCaptureFixture) -> None:
    hub = host.hub(loop)
    seen: list[tuple[str, int]] = []
    hub.tripwires = lambda run_id, sample: seen.append((run_id, sample.processes))
    hub.register("r1", host.cgroup, started_at=host.now)
    for _ in range(3):
        host.tick(hub)
    assert seen == [("r1", 0)] * 3

    def broken(run_id: str, sample: Sample) -> None:
        raise ValueError("tripwire bug")

    hub.tripwires = broken
    with caplog.at_level(logging.ERROR, logger="supervisor.telemetry.sampler"):
        for _ in range(3):
            host.tick(hub)
    # Every sample still went into the window and the summary; one log line, not one each.
    assert len(hub.samples("r1", 10)) == 6
    summary = hub.summary("r1")
    assert summary is not None and summary.samples == 6
    assert len([r for r in caplog.records if "tripwires" in r.message]) == 1


def test_early_syscall_attempts_are_bounded(host: FakeHost,
                                            loop: asyncio.AbstractEventLoop) -> None:
    hub = host.hub(loop)
    for index in range(5000):
        hub.add_syscall_attempt(f"never-registered-{index}")
    assert len(hub._early_attempts) <= 1024


# ----------------------------------------------------------------------------- the thread


def test_the_sampler_thread_delivers_in_the_event_loop(host: FakeHost) -> None:
    host.add(FakeProcess(10))
    host.write(pids=[10])

    async def scenario() -> tuple[list[int], int, int]:
        loop = asyncio.get_running_loop()
        hub = TelemetryHub(100.0, 2, 600, loop, cgroup_reader=PlainReader(),
                           process_source=host.process_source,
                           fd_reader=host.read_fds)
        threads: list[int] = []
        enough = asyncio.Event()

        def subscriber(run_id: str, sample: Sample) -> None:
            threads.append(threading.get_ident())
            if len(threads) >= 5:
                enough.set()

        hub.tripwires = subscriber
        hub.register("r1", host.cgroup, started_at=0.0)
        hub.start()
        try:
            await asyncio.wait_for(enough.wait(), 10)
        finally:
            hub.stop()
        return threads, threading.get_ident(), hub.ticks

    threads, loop_thread, ticks = asyncio.run(scenario())
    assert set(threads) == {loop_thread}
    assert ticks >= 5


def test_stop_without_start_and_twice(host: FakeHost, loop: asyncio.AbstractEventLoop) -> None:
    hub = TelemetryHub(10.0, 5, 600, loop)
    hub.stop()
    hub.stop()


# ----------------------------------------------------------------------------- kernel reads


def test_open_files_reread_with_pread_and_release(tmp_path: Path) -> None:
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    stat = cgroup / "cpu.stat"
    stat.write_text("usage_usec 5\n")
    files = OpenFiles(max_open=1)
    assert value_of(files.read(str(stat)), b"usage_usec") == 5
    stat.write_text("usage_usec 7\n")  # same inode, as cgroupfs regenerates in place
    assert value_of(files.read(str(stat)), b"usage_usec") == 7
    other = tmp_path / "other"
    other.write_bytes(b"x" * 200_000)  # over max_open and over one pread chunk
    assert files.read(str(other)) == b"x" * 200_000
    assert len(files) == 1
    files.release([str(cgroup)])
    assert len(files) == 0
    with pytest.raises(FileNotFoundError):
        files.read(str(cgroup / "memory.current"))
    big = tmp_path / "big"
    big.write_bytes(b"y" * 150_000)
    files.read(str(big))
    assert files.read(str(big)) == b"y" * 150_000  # cached and read in chunks
    files.close()
    assert len(files) == 0


def test_connections_are_counted_in_the_process_own_network_namespace(tmp_path: Path) -> None:
    """A fake /proc: fds pointing at sockets, and the pid's own net tables."""
    proc = tmp_path / "proc"
    fd_dir = proc / "42" / "fd"
    fd_dir.mkdir(parents=True)
    for fd, target in enumerate(["/dev/null", "socket:[1001]", "socket:[1002]",
                                 "socket:[1003]", "pipe:[7]"]):
        (fd_dir / str(fd)).symlink_to(target)
    net = proc / "42" / "net"
    net.mkdir()
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid" \
             "  timeout inode\n"

    def row(inode: int) -> str:
        return f"   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 " \
               f"00000000  1000        0 {inode} 1 0000000000000000 100 0 0 10 0\n"

    (net / "tcp").write_text(header + row(1001) + row(5555))
    (net / "udp6").write_text(header + row(1003))
    (net / "udp").write_text(header)
    # tcp6 absent, as with IPv6 disabled; 1002 is a unix socket, in no inet table
    assert read_fds(42, proc) == (5, {"1001", "1003"})
    empty = proc / "43" / "fd"
    empty.mkdir(parents=True)
    assert read_fds(43, proc) == (0, set())
    with pytest.raises(FileNotFoundError):
        read_fds(44, proc)




def test_a_namespace_has_inet_sockets_when_its_counts_say_so(tmp_path: Path) -> None:
    """sockstat's and sockstat6's "inuse" of TCP and UDP (not RAW, not UDPLITE)."""
    for pid, v4, v6 in [(1, "0", "0"), (2, "3", "0"), (3, "0", None), (4, "0", "1")]:
        net = tmp_path / str(pid) / "net"
        net.mkdir(parents=True)
        (net / "sockstat").write_text(
            f"sockets: used 9\nTCP: inuse 0 orphan 0 tw 4 alloc 9 mem 1\nUDP: inuse {v4} mem 0\n"
            "UDPLITE: inuse 5\nRAW: inuse 5\nFRAG: inuse 0 memory 0\n")
        if v6 is not None:  # absent with IPv6 disabled
            (net / "sockstat6").write_text(f"TCP6: inuse {v6}\nUDP6: inuse 0\nRAW6: inuse 2\n")
    assert [has_inet_sockets(pid, tmp_path) for pid in (1, 2, 3, 4)] == [
        False, True, False, True]


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A sleep whose name (`comm`, 15 characters at most) is cut, holding 16 more fds."""
    program = tmp_path / "a-sleeper-with-a-long-name"
    program.symlink_to("/bin/sleep")
    pipes = [os.pipe() for _ in range(8)]
    held = [fd for pair in pipes for fd in pair]
    proc = subprocess.Popen([str(program), "600"], stdin=subprocess.DEVNULL, pass_fds=held)
    for fd in held:
        os.close(fd)
    wait_until = time.monotonic() + 30
    while psutil.Process(proc.pid).status() != psutil.STATUS_SLEEPING or \
            psutil.Process(proc.pid).name() != program.name:
        assert time.monotonic() < wait_until, "the sleeper did not start"
        time.sleep(0.01)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_process_reads_as_psutil_reads_it(sleeper: subprocess.Popen[bytes]) -> None:
    """ProcStat's values are psutil's, from /proc/<pid>/stat, /statm and /io alone."""
    ours, theirs = ProcStat(sleeper.pid), psutil.Process(sleeper.pid)
    with ours.oneshot():
        assert ours.name() == theirs.name() == "a-sleeper-with-a-long-name"
        assert ours.status() == theirs.status() == psutil.STATUS_SLEEPING
        assert ours.ppid() == theirs.ppid() == os.getpid()
        assert ours.num_threads() == theirs.num_threads() == 1
        assert ours.memory_info().rss == theirs.memory_info().rss > 0
        io = theirs.io_counters()
        assert (ours.io_counters().read_bytes, ours.io_counters().write_bytes) == (
            io.read_bytes, io.write_bytes)
    mine = ProcStat(os.getpid())
    assert mine.name() == psutil.Process().name() and mine.num_threads() >= 1


def test_a_process_that_died_reads_as_zombie_then_as_gone(
        sleeper: subprocess.Popen[bytes]) -> None:
    process = ProcStat(sleeper.pid)
    sleeper.send_signal(signal.SIGKILL)
    wait_until = time.monotonic() + 30
    while process.status() != STATUS_ZOMBIE:  # not reaped yet
        assert time.monotonic() < wait_until, "no zombie"
        time.sleep(0.01)
    assert psutil.Process(sleeper.pid).status() == psutil.STATUS_ZOMBIE
    sleeper.wait()
    for read in (process.name, process.status, process.ppid, process.num_threads,
                 process.memory_info, process.io_counters):
        with pytest.raises(psutil.NoSuchProcess):
            read()


def test_a_refused_reading_is_access_denied(monkeypatch: pytest.MonkeyPatch) -> None:
    """As psutil: EACCES is AccessDenied (skipped and counted by the walk), other errors
    are the OSError they are."""
    failure: OSError = PermissionError(errno.EACCES, "Permission denied")

    def refused(path: str) -> bytes:
        raise failure

    monkeypatch.setattr(procfs, "read_file", refused)
    process = ProcStat(os.getpid())
    with pytest.raises(psutil.AccessDenied):
        process.io_counters()
    failure = OSError(errno.EIO, "Input/output error")
    with pytest.raises(OSError) as failed:
        process.status()
    assert failed.value.errno == errno.EIO and not isinstance(failed.value, psutil.Error)


def test_fds_counted_as_listed_and_sockets_found_in_the_process_namespace(
        sleeper: subprocess.Popen[bytes]) -> None:
    """The default reader's count (the fd directory's size where the kernel gives it) is the
    listing's, and its sockets are what the listing finds in the process's own tables."""
    listed = len(os.listdir(f"/proc/{sleeper.pid}/fd"))
    assert listed >= 3 + 16
    reader, namespaces = Descriptors(), {}
    assert reader(sleeper.pid, namespaces) == read_fds(sleeper.pid) == (listed, set())
    assert reader.sized == fd_dir_sized()
    with socket.socket(type=socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        inode = str(os.fstat(udp.fileno()).st_ino)
        count, found = Descriptors()(os.getpid(), {})
        assert inode in found and found == read_fds(os.getpid())[1]
        assert count >= 1


def test_without_the_kernels_help_the_descriptors_are_listed(
        sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """Before Linux 6.11 (no PIDFD_GET_NET_NAMESPACE: ENOTTY) the namespace is not asked
    again and each process's descriptors are listed; before 6.2 the count is the listing's."""
    asked = []

    def no_such_ioctl(fd: int, request: int, *args: object) -> int:
        asked.append(request)
        raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")

    monkeypatch.setattr(procfs.fcntl, "ioctl", no_such_ioctl)
    listed = read_fds(sleeper.pid)
    reader = Descriptors(sized=True)
    assert reader(sleeper.pid, {}) == listed and reader(sleeper.pid, {}) == listed
    assert len(asked) == 1 and not reader.by_namespace and reader.listings == 2
    old = Descriptors(sized=False)
    assert old(sleeper.pid, {}) == listed and old.listings == 1


# ----------------------------------------------------------------------------- wire form


def test_the_wire_sample_is_the_shared_sample() -> None:
    """One definition: the API sends the sampler's Sample as it is, and it reads back equal."""
    fields = [f.name for f in dataclasses.fields(Sample)]
    sample = Sample(ts=1.0, wall_seconds=2.0, processes=3, commands=("a", "b"),
                    memory_bytes=5)
    view = TelemetryView(run="r", agent="a", state="running", live=True, samples=[sample],
                         summary=None)
    wire = view.model_dump(mode="json")["samples"][0]
    assert list(wire) == fields
    assert wire == sample.as_dict()
    assert TelemetryView.model_validate(view.model_dump(mode="json")).samples == [sample]
    assert set(METRICS) <= set(fields)


# ----------------------------------------------------------------------------- kills first


def test_the_sampler_stands_aside_while_a_kill_runs(host: FakeHost,
                                                     loop: asyncio.AbstractEventLoop) -> None:
    """Inside stand_aside the sampler thread reads no process until the kill is over; then
    its tick completes as usual. Kills nest: the last one out lets it go on."""
    read: list[int] = []

    def source(pid: int) -> FakeProcess:
        read.append(pid)
        return host.process_source(pid)

    host.add(FakeProcess(10))
    host.add(FakeProcess(11))
    host.write(pids=[10, 11])
    hub = TelemetryHub(10.0, 1, 600, loop, cgroup_reader=PlainReader(), process_source=source,
                       fd_reader=host.read_fds, clock=host.clock, wall_clock=host.clock)
    hub.register("r1", host.cgroup, started_at=host.now)
    batches: list[list[tuple[str, Sample]]] = []
    with hub.stand_aside():
        with hub.stand_aside():
            sampler = threading.Thread(target=lambda: batches.append(hub.sample_once()))
            sampler.start()
            deadline = time.monotonic() + 10.0
            while hub.stood_aside == 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            assert hub.stood_aside == 1
        assert sampler.is_alive() and read == [] and batches == []  # the outer kill runs on
    sampler.join(10.0)
    assert not sampler.is_alive()
    [[(run_id, sample)]] = batches
    assert run_id == "r1" and sample.processes == 2 and read == [10, 11]
    assert hub.sample_once() and hub.stood_aside == 1  # no kill: no wait


def test_an_adopted_run_goes_on_from_what_the_previous_daemon_carried(
        host: FakeHost, loop: asyncio.AbstractEventLoop) -> None:
    """Issue 13: the counts, the summary and the CPU baseline go from one daemon's hub to the
    next one's (daemon/handover.py), so the first sample after the adoption has a cpu_percent
    over the gap and the counters do not start again at zero."""
    host.add(FakeProcess(10, name_="python3", ppid_=1, rss=30 * MIB))
    host.write(pids=[10], cpu_usec=1_000_000, memory=64 * MIB)
    old = host.hub(loop)
    old.register("r1", host.cgroup, started_at=host.now)
    host.tick(old)
    old.add_syscall_attempt("r1", 3)
    host.write(cpu_usec=1_050_000, memory=96 * MIB)
    host.tick(old)
    carried = old.carry("r1")
    assert carried is not None and carried["syscall_attempts"] == 3
    assert old.carry("unknown") is None

    host.now += 0.9  # no daemon for a second; the agent used 0.5 s of CPU meanwhile
    host.write(cpu_usec=1_550_000, memory=32 * MIB)
    new = host.hub(loop)
    new.expect("r1", carried)
    new.register("r1", host.cgroup, started_at=host.now)
    [(_, first)] = host.tick(new)
    latest = new.latest("r1")
    assert latest is not None and latest.syscall_attempts == 3  # as delivered
    assert first.cpu_percent == pytest.approx(50.0)  # 0.5 s over the 1 s since the last one
    summary = new.summary("r1")
    assert summary is not None
    assert (summary.samples, summary.syscall_attempts) == (3, 3)
    assert summary.peak_memory_bytes == 96 * MIB  # the peak before the restart stays


def test_the_window_goes_with_an_adopted_run_newest_first_within_its_bytes(
        host: FakeHost, loop: asyncio.AbstractEventLoop) -> None:
    """Issue 13: `agentctl telemetry` after an adoption shows the samples from before the
    restart: the newest that fit the run's share of the handover record."""
    host.add(FakeProcess(10, name_="python3", ppid_=1, rss=30 * MIB))
    host.write(pids=[10], cpu_usec=1_000_000, memory=64 * MIB)
    old = host.hub(loop)
    old.register("r1", host.cgroup, started_at=host.now)
    for _ in range(20):
        host.tick(old)
    window = old.samples("r1", 100)
    carried = old.carry("r1")
    assert carried is not None and len(carried["window"]) == 20
    small = old.carry("r1", window_bytes=len(json.dumps(carried["window"])) // 4)
    assert small is not None and 0 < len(small["window"]) < 20

    new = host.hub(loop)
    new.expect("r1", json.loads(json.dumps(small)))  # as the record carries it
    new.register("r1", host.cgroup, started_at=host.now)
    kept = new.samples("r1", 100)
    assert kept == window[-len(small["window"]):]  # the newest, whole, oldest first
    host.tick(new)
    assert new.samples("r1", 100)[:-1] == kept and len(new.samples("r1", 100)) == len(kept) + 1


@pytest.mark.parametrize("window", [
    "rows", [[1.0]], [["x"] * 22], [[None] * 22],
])
def test_a_carried_window_not_of_its_form_starts_empty(
        host: FakeHost, loop: asyncio.AbstractEventLoop, window: Any) -> None:
    host.write(pids=[], cpu_usec=1_000_000)
    old = host.hub(loop)
    old.register("r1", host.cgroup, started_at=host.now)
    host.tick(old)
    carried = old.carry("r1")
    assert carried is not None
    new = host.hub(loop)
    new.expect("r1", {**carried, "window": window})
    new.register("r1", host.cgroup, started_at=host.now)
    assert new.samples("r1", 100) == []
    summary = new.summary("r1")
    assert summary is not None and summary.samples == 1  # the rest was taken


def test_a_carried_part_not_of_its_form_is_left_at_its_start(
        host: FakeHost, loop: asyncio.AbstractEventLoop) -> None:
    host.write(pids=[], cpu_usec=1_000_000)
    hub = host.hub(loop)
    hub.expect("r1", {"syscall_attempts": "3", "summary": {"run_id": "r2", "started_at": 0},
                      "last_cpu": ["x", 1]})
    hub.register("r1", host.cgroup, started_at=host.now)
    [(_, first)] = host.tick(hub)
    latest = hub.latest("r1")
    assert latest is not None and (latest.syscall_attempts, first.cpu_percent) == (0, None)
    summary = hub.summary("r1")
    assert summary is not None and summary.samples == 1


_LAZY_PSUTIL = """
import asyncio, os, sys
from pathlib import Path
from supervisor.sandbox.cgroups import Cgroup
from supervisor.telemetry.procfs import read_file
from supervisor.telemetry.sampler import TelemetryHub
root = Path(sys.argv[1])
(root / "unified").mkdir(parents=True)
(root / "unified" / "cgroup.controllers").write_text("")
cgroup = Cgroup("agent-supervisor/as-1", host_root=root)
cgroup.path.mkdir(parents=True)
for name, text in {"cpu.stat": "usage_usec 0\\n", "memory.current": "0\\n",
                   "memory.events": "oom_kill 0\\n", "cgroup.stat": "nr_descendants 0\\n",
                   "cgroup.procs": ""}.items():
    (cgroup.path / name).write_text(text)
class Reader:
    def read(self, path): return read_file(path)
    def release(self, directories): pass
hub = TelemetryHub(10.0, 1, 600, asyncio.new_event_loop(), cgroup_reader=Reader(),
                   fd_reader=lambda pid, _ns: (0, set()))
hub.register("r1", cgroup, started_at=0.0)
hub.sample_once()  # a run with no process: no walk of any
before = "psutil" in sys.modules
(cgroup.path / "cgroup.procs").write_text(f"{os.getpid()}\\n")
[(_, sample)] = hub.sample_once()  # the default source raises psutil's errors: loaded now
print(before, "psutil" in sys.modules, sample.threads is not None and sample.threads >= 1)
"""


def test_psutil_loads_with_the_first_process_walk(tmp_path: Path) -> None:
    """The sampler imports psutil only to walk a run's processes (an embedded run of a quick
    command never does); with the default process source the walk then reads real
    processes (here this interpreter's own)."""
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _LAZY_PSUTIL, str(tmp_path)], cwd=repo,
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True", "True"]
