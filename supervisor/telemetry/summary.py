"""A run's telemetry summary, kept up to date sample by sample (peaks, last cumulative values),
so ending a run or answering `inspect` costs nothing. No I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from supervisor.models import TelemetrySummary
from supervisor.telemetry import Sample

Number = TypeVar("Number", int, float)


def _peak(current: Number | None, value: Number | None) -> Number | None:
    if value is None:
        return current
    if current is None:
        return value
    return max(current, value)


@dataclass
class SummaryBuilder:
    run_id: str
    started_at: float
    samples: int = 0
    wall_seconds: float = 0.0
    cpu_seconds: float | None = None
    max_cpu_percent: float | None = None
    peak_memory_bytes: int | None = None
    peak_rss_bytes: int | None = None
    peak_processes: int = 0
    peak_threads: int | None = None
    peak_open_fds: int | None = None
    peak_connections: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None
    network_bytes: int | None = None
    oom_kills: int | None = None
    commands: tuple[str, ...] = ()

    def add(self, sample: Sample) -> None:
        self.samples += 1
        self.wall_seconds = sample.wall_seconds
        self.max_cpu_percent = _peak(self.max_cpu_percent, sample.cpu_percent)
        self.peak_memory_bytes = _peak(self.peak_memory_bytes, sample.memory_bytes)
        self.peak_rss_bytes = _peak(self.peak_rss_bytes, sample.rss_bytes)
        self.peak_processes = max(self.peak_processes, sample.processes)
        self.peak_threads = _peak(self.peak_threads, sample.threads)
        self.peak_open_fds = _peak(self.peak_open_fds, sample.open_fds)
        self.peak_connections = _peak(self.peak_connections, sample.connections)
        # Cumulative counters: the largest reading is the last one measured. (I/O sums over
        # the processes alive at the walk, so it can dip when one exits; keep the high mark.)
        self.cpu_seconds = _peak(self.cpu_seconds, sample.cpu_seconds)
        self.io_read_bytes = _peak(self.io_read_bytes, sample.io_read_bytes)
        self.io_write_bytes = _peak(self.io_write_bytes, sample.io_write_bytes)
        self.network_bytes = _peak(self.network_bytes, sample.network_bytes)
        self.oom_kills = _peak(self.oom_kills, sample.oom_kills)
        if len(sample.commands) > len(self.commands):  # the sampler's list only grows
            self.commands = sample.commands

    def freeze(self, *, ended_at: float | None, syscall_attempts: int, overruns: int,
               skipped: int) -> TelemetrySummary:
        return TelemetrySummary(
            run_id=self.run_id, started_at=self.started_at, ended_at=ended_at,
            samples=self.samples, wall_seconds=round(self.wall_seconds, 3),
            cpu_seconds=self.cpu_seconds, max_cpu_percent=self.max_cpu_percent,
            peak_memory_bytes=self.peak_memory_bytes, peak_rss_bytes=self.peak_rss_bytes,
            peak_processes=self.peak_processes, peak_threads=self.peak_threads,
            peak_open_fds=self.peak_open_fds, peak_connections=self.peak_connections,
            io_read_bytes=self.io_read_bytes, io_write_bytes=self.io_write_bytes,
            network_bytes=self.network_bytes, syscall_attempts=syscall_attempts,
            oom_kills=self.oom_kills, commands=list(self.commands), overruns=overruns,
            skipped=skipped,
        )
