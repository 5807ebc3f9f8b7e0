"""Observation: per-run telemetry samples (cgroup + psutil, in `sampler.py`) and syscall
attempts reported by seccomp user notification (`supervisor/sandbox/seccomp_notify.py`).
This module holds the shared model only; no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from supervisor.models.telemetry import Sample
from supervisor.models.tripwire import METRICS

__all__ = ["METRICS", "Sample", "SyscallAttempt"]


@dataclass(frozen=True)
class SyscallAttempt:
    """A notified syscall: answered EPERM by the daemon, recorded, a tripwire input. The
    listener coalesces a burst: `count` attempts of this syscall by this container, of which
    this is the most recent."""

    ts: float
    container_id: str
    pid: int  # in the daemon's pid namespace (as the kernel reports it to the listener)
    syscall: str
    number: int
    args: tuple[int, ...] = field(default_factory=tuple)
    count: int = 1
