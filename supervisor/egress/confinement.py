"""The gateway worker's cgroup: made with its limits before the worker does anything, the
worker placed in it, removed after the worker is gone. Needs root.

Pure v2 hosts get memory.max, pids.max, cpu.weight and cpu.max in one cgroup (the controllers
are enabled down the path). Hybrid hosts keep those controllers in v1 hierarchies, so the
limits go to /sys/fs/cgroup/{memory,pids,cpu}/<path> (memory.limit_in_bytes, pids.max,
cpu.shares, cpu.cfs_quota_us) and the worker is also placed at the same path in the unified
tree, where cgroup.kill works. A limit that cannot be set is an error: the caller refuses to
run the gateway (and so every gateway run) rather than run it unconfined."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from supervisor.sandbox.cgroups import CGROUP_ROOT, CgroupMode, detect_mode, unified_root

_CPU_PERIOD_US = 100_000
_V1_CONTROLLERS = ("memory", "pids", "cpu")


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


class WorkerCgroup:
    """One cgroup at `relative` (e.g. "agent-supervisor-gateway") in every hierarchy that
    carries a limit, plus the unified tree."""

    def __init__(self, relative: str, limits: WorkerLimits, root: Path = CGROUP_ROOT) -> None:
        self.relative = relative.strip("/")
        self.limits = limits
        self.root = root
        self.mode = detect_mode(root)
        self.unified = unified_root(root) / self.relative

    def _dirs(self) -> list[Path]:
        if self.mode is CgroupMode.HYBRID:
            return [self.root / c / self.relative for c in _V1_CONTROLLERS] + [self.unified]
        return [self.unified]

    def create(self) -> None:
        """The directories and their limits; ConfinementFailed naming the file that refused."""
        for directory in self._dirs():
            _mkdir(directory)
        if self.mode is CgroupMode.HYBRID:
            self._limits_v1()
        else:
            self._enable_controllers()
            self._limits_v2()

    def _enable_controllers(self) -> None:
        # Each ancestor below the root must delegate the controllers to its children.
        parts = self.relative.split("/")
        for depth in range(len(parts)):
            parent = self.root.joinpath(*parts[:depth])
            _write(parent / "cgroup.subtree_control", "+memory +pids +cpu")

    def _limits_v2(self) -> None:
        limits, path = self.limits, self.unified
        _write(path / "memory.max", str(limits.memory_max))
        _write(path / "memory.swap.max", "0", optional=True)  # absent without swap accounting
        _write(path / "pids.max", str(limits.pids_max))
        _write(path / "cpu.weight", str(limits.cpu_weight))
        quota = int(limits.cpu_max * _CPU_PERIOD_US)
        _write(path / "cpu.max", f"{quota if quota > 0 else 'max'} {_CPU_PERIOD_US}")

    def _limits_v1(self) -> None:
        limits = self.limits
        memory, pids, cpu = (self.root / c / self.relative for c in _V1_CONTROLLERS)
        _write(memory / "memory.limit_in_bytes", str(limits.memory_max))
        _write(memory / "memory.memsw.limit_in_bytes", str(limits.memory_max), optional=True)
        _write(pids / "pids.max", str(limits.pids_max))
        # cpu.weight 100 ≙ cpu.shares 1024 (the kernel's own conversion, inverted)
        _write(cpu / "cpu.shares", str(max(2, limits.cpu_weight * 1024 // 100)))
        quota = int(limits.cpu_max * _CPU_PERIOD_US)
        _write(cpu / "cpu.cfs_period_us", str(_CPU_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(quota if quota > 0 else -1))

    def place(self, pid: int) -> None:
        for directory in self._dirs():
            _write(directory / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        with contextlib.suppress(OSError):
            return [int(p) for p in (self.unified / "cgroup.procs").read_text().split()]
        return []

    def kill(self) -> None:
        """Whatever is left in it (the worker's threads die with it; this is for strays)."""
        with contextlib.suppress(ConfinementFailed):
            _write(self.unified / "cgroup.kill", "1", optional=True)

    def remove(self) -> None:
        """OSError (EBUSY) while a process is still accounted to it."""
        for directory in self._dirs():
            with contextlib.suppress(FileNotFoundError):
                directory.rmdir()

    def read(self, name: str) -> str:
        """A limit's current value, for tests and `status`: v2 name on v2, v1 file on hybrid."""
        return (self._file(name)).read_text().strip()

    def _file(self, name: str) -> Path:
        if self.mode is not CgroupMode.HYBRID:
            return self.unified / name
        controller = name.split(".")[0]
        return self.root / controller / self.relative / name


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfinementFailed(path, "cannot create cgroup", exc) from exc


def _write(path: Path, value: str, *, optional: bool = False) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        if optional:
            return
        raise ConfinementFailed(path, "cannot open", exc) from exc
    except OSError as exc:
        raise ConfinementFailed(path, "cannot open", exc) from exc
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        if optional:
            return
        raise ConfinementFailed(path, f"cannot write {value!r} to", exc) from exc
    finally:
        os.close(fd)
