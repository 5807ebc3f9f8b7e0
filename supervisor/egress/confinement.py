"""The gateway worker's cgroup limits: set before the worker does anything, through the one
`Cgroup` (supervisor/sandbox/cgroups.py) that also places the worker, kills its strays and
removes the cgroup after it is gone. Needs root.

Pure v2 hosts get memory.max, pids.max, cpu.weight and cpu.max in one cgroup (the controllers
are delegated down the path). Hybrid hosts keep those controllers in v1 hierarchies, so the
limits go to /sys/fs/cgroup/{memory,pids,cpu}/<path> (memory.limit_in_bytes, pids.max,
cpu.shares, cpu.cfs_quota_us) and the worker is placed at the same path in those and in the
unified tree, where cgroup.kill works. A limit that cannot be set is an error: the caller
refuses to run the gateway (and so every gateway run) rather than run it unconfined."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from supervisor.sandbox.cgroups import Cgroup

_CPU_PERIOD_US = 100_000
# The v1 hierarchies that hold the worker's limits on a hybrid host (it is placed in each).
V1_CONTROLLERS = ("memory", "pids", "cpu")


@dataclass(frozen=True)
class WorkerLimits:
    memory_max: int  # bytes
    pids_max: int
    cpu_weight: int  # cgroup v2 scale 1..10000 (100 is a default peer such as the daemon)
    cpu_max: float  # CPUs; 0 for no quota


class ConfinementFailed(Exception):
    def __init__(self, path: Path, what: str, exc: OSError) -> None:
        super().__init__(f"{what} {path}: {exc.strerror or exc}")
        self.path = path


def confine(cgroup: Cgroup, limits: WorkerLimits) -> None:
    """Make `cgroup` in every hierarchy that carries a limit and set the limits;
    ConfinementFailed naming the file that refused."""
    try:
        if cgroup.hybrid:
            cgroup.create(V1_CONTROLLERS)
        else:
            cgroup.delegate(V1_CONTROLLERS)
    except OSError as exc:
        raise ConfinementFailed(Path(exc.filename or cgroup.path), "cannot create cgroup",
                                exc) from exc
    quota = int(limits.cpu_max * _CPU_PERIOD_US)
    if cgroup.hybrid:
        files = [("memory.limit_in_bytes", str(limits.memory_max), False),
                 ("memory.memsw.limit_in_bytes", str(limits.memory_max), True),
                 ("pids.max", str(limits.pids_max), False),
                 # cpu.weight 100 = cpu.shares 1024 (the kernel's own conversion, inverted)
                 ("cpu.shares", str(max(2, limits.cpu_weight * 1024 // 100)), False),
                 ("cpu.cfs_period_us", str(_CPU_PERIOD_US), False),
                 ("cpu.cfs_quota_us", str(quota if quota > 0 else -1), False)]
    else:
        files = [("memory.max", str(limits.memory_max), False),
                 ("memory.swap.max", "0", True),  # absent without swap accounting
                 ("pids.max", str(limits.pids_max), False),
                 ("cpu.weight", str(limits.cpu_weight), False),
                 ("cpu.max", f"{quota if quota > 0 else 'max'} {_CPU_PERIOD_US}", False)]
    for name, value, optional in files:
        try:
            cgroup.write(name, value)
        except OSError as exc:
            if not optional:
                raise ConfinementFailed(cgroup.file(name), f"cannot write {value!r} to",
                                        exc) from exc
