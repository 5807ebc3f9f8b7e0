"""One telemetry sample of a run: the sampler builds it, tripwires read it, the API sends it
as it is (pydantic serializes the dataclass). No I/O."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Sample:
    # No docstring: the API's schema (a telemetry view's samples) would carry it.
    ts: float  # time.time() when taken
    wall_seconds: float  # since the run started
    processes: int
    cpu_seconds: float | None = None
    cpu_percent: float | None = None  # over the previous interval; 100 = one full core
    memory_bytes: int | None = None
    oom_kills: int | None = None
    # From psutil over the run's pids (refreshed every few samples; see [telemetry]).
    rss_bytes: int | None = None
    threads: int | None = None
    open_fds: int | None = None
    connections: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None
    children: int | None = None
    commands: tuple[str, ...] = ()
    # From the run's veth, when it has one (network mode "gateway").
    network_bytes: int | None = None
    network_packets: int | None = None
    # Cumulative syscall attempts reported by seccomp user notification.
    syscall_attempts: int = 0
    # Bytes the run wrote to its stdout and stderr so far (recorded or, past the run's output
    # cap, discarded) and the part of them in its log file.
    output_bytes: int | None = None
    output_recorded_bytes: int | None = None
    # MCP tool calls the gateway let through for the run so far and their cost (the tools'
    # `cost` in the profile); gateway runs only.
    mcp_calls: int | None = None
    mcp_cost: float | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["commands"] = list(self.commands)
        return data
