"""A run's telemetry summary, kept up to date sample by sample (peaks, last cumulative values),
so ending a run or answering `inspect` costs nothing. No I/O."""

from __future__ import annotations

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


class SummaryBuilder:
    """Updates one TelemetrySummary in place as samples arrive; `freeze` hands out a copy."""

    def __init__(self, run_id: str, started_at: float) -> None:
        self._summary = TelemetrySummary(run_id=run_id, started_at=started_at)

    @classmethod
    def resumed(cls, summary: TelemetrySummary) -> SummaryBuilder:
        """Go on from a summary built by another daemon (a run adopted at a restart)."""
        builder = cls(summary.run_id, summary.started_at)
        builder._summary = summary.model_copy(deep=True, update={"ended_at": None})
        return builder

    def add(self, sample: Sample) -> None:
        s = self._summary
        s.samples += 1
        s.wall_seconds = round(sample.wall_seconds, 3)
        s.max_cpu_percent = _peak(s.max_cpu_percent, sample.cpu_percent)
        s.peak_memory_bytes = _peak(s.peak_memory_bytes, sample.memory_bytes)
        s.peak_rss_bytes = _peak(s.peak_rss_bytes, sample.rss_bytes)
        s.peak_processes = max(s.peak_processes, sample.processes)
        s.peak_threads = _peak(s.peak_threads, sample.threads)
        s.peak_open_fds = _peak(s.peak_open_fds, sample.open_fds)
        s.peak_connections = _peak(s.peak_connections, sample.connections)
        # Cumulative counters: the largest reading is the last one measured. (I/O sums over
        # the processes alive at the walk, so it can dip when one exits; keep the high mark.)
        s.cpu_seconds = _peak(s.cpu_seconds, sample.cpu_seconds)
        s.io_read_bytes = _peak(s.io_read_bytes, sample.io_read_bytes)
        s.io_write_bytes = _peak(s.io_write_bytes, sample.io_write_bytes)
        s.network_bytes = _peak(s.network_bytes, sample.network_bytes)
        s.output_bytes = _peak(s.output_bytes, sample.output_bytes)
        s.output_recorded_bytes = _peak(s.output_recorded_bytes, sample.output_recorded_bytes)
        s.oom_kills = _peak(s.oom_kills, sample.oom_kills)
        if len(sample.commands) > len(s.commands):  # the sampler's list only grows
            s.commands = list(sample.commands)

    def add_output(self, produced: int, recorded: int) -> None:
        """The output counters at the run's end (the last sample may be a tick behind)."""
        s = self._summary
        s.output_bytes = _peak(s.output_bytes, produced)
        s.output_recorded_bytes = _peak(s.output_recorded_bytes, recorded)

    def freeze(self, *, ended_at: float | None, syscall_attempts: int, overruns: int,
               skipped: int) -> TelemetrySummary:
        return self._summary.model_copy(deep=True, update={
            "ended_at": ended_at, "syscall_attempts": syscall_attempts,
            "overruns": overruns, "skipped": skipped})
