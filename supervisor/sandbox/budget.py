"""The budget of all runs together: pids and memory limits on the parent cgroup every run lives
under, so that runs at their own limits cannot take the host's last pids or memory (eight
default runs of 4096 pids each are every pid of a host with pid_max 32768). Needs root.

Where the limits live depends on the host: on a hybrid host the v1 `pids` and `memory`
hierarchies hold them (the unified tree there has no controllers); on a pure v2 host the
parent's `pids.max` and `memory.max`, with both controllers enabled down to it. Both limits
are hierarchical, so they bound the sum of the runs below, whichever runtime made them."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from supervisor.errors import EnforcementError
from supervisor.sandbox.cgroups import CGROUP_ROOT, Cgroup, CgroupMode, detect_mode

log = logging.getLogger(__name__)

_CONTROLLERS = ("pids", "memory")
# The most a pids.max takes (the kernel's PID_MAX_LIMIT on 64-bit hosts).
PIDS_MAX_LIMIT = 4 * 1024 * 1024


@dataclass(frozen=True)
class RunsBudget:
    """The pids and memory all runs together may use."""
    pids_max: int
    memory_max: int

    @classmethod
    def for_host(cls, runs_pids_max: int | None, host_pids_reserve: int,
                 runs_memory_max: int | None, host_memory_reserve: int) -> RunsBudget:
        """The configured budget, or (None) the host's capacity less its reserve."""
        pids = runs_pids_max or host_pid_limit() - host_pids_reserve
        memory = runs_memory_max or mem_total() - host_memory_reserve
        if pids < 1 or memory < 1 or pids > PIDS_MAX_LIMIT:
            raise EnforcementError(
                "the host's reserve leaves nothing for runs", pids_budget=pids,
                memory_budget=memory, hint="lower [resources] host_pids_reserve or "
                "host_memory_reserve, or set runs_pids_max and runs_memory_max")
        return cls(pids, memory)


def budget_errors(runs_pids_max: int | None, host_pids_reserve: int,
                  runs_memory_max: int | None, host_memory_reserve: int) -> dict[str, str]:
    """Why this host cannot hold the [resources] budget, by key ({}: it can), judged as
    RunsBudget.for_host does at the start."""
    errors: dict[str, str] = {}
    if runs_pids_max is not None and runs_pids_max > PIDS_MAX_LIMIT:
        errors["resources.runs_pids_max"] = (
            f"{runs_pids_max} is above the most pids.max takes ({PIDS_MAX_LIMIT})")
    elif runs_pids_max is None and (limit := host_pid_limit()) - host_pids_reserve < 1:
        errors["resources.host_pids_reserve"] = (
            f"{host_pids_reserve} is all of this host's {limit} pids (the lower of pid_max "
            f"and threads-max): nothing is left for runs; lower it (the default is 4096) or "
            f"set runs_pids_max")
    if runs_memory_max is None and (total := mem_total()) - host_memory_reserve < 1:
        errors["resources.host_memory_reserve"] = (
            f"{host_memory_reserve} bytes is all of this host's {total} bytes of RAM: nothing "
            f"is left for runs; lower it (the default is 1GiB) or set runs_memory_max")
    return errors


def host_pid_limit() -> int:
    """How many tasks the host can have at once: the lower of pid_max and threads-max."""
    return min(int(Path("/proc/sys/kernel/pid_max").read_text()),
               int(Path("/proc/sys/kernel/threads-max").read_text()))


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise EnforcementError("no MemTotal in /proc/meminfo")


def leaves_host_memory(parent: str, budget: RunsBudget, root: Path = CGROUP_ROOT) -> bool:
    """Whether the runs, all at their memory budget, still leave memory to the processes
    outside them: the budget is below the host's RAM and below the memory limit of every
    cgroup above `parent` (a container's, when the supervisor runs in one). Then an OOM the
    runs cause stays within their own cgroups, and the kernel's OOM killer never looks at the
    supervisor or its watchdog on their account."""
    limits = [mem_total()]
    name = ("memory.limit_in_bytes" if detect_mode(root) is CgroupMode.HYBRID
            else "memory.max")
    parts = Path(parent.strip("/")).parts
    for depth in range(len(parts)):  # the root (a container's own, under a cgroup namespace)
        try:  # down to the parent's parent; the true root has no limit file
            value = Cgroup("/".join(parts[:depth]), host_root=root).read(name)
        except OSError:
            continue
        if value.isdigit():  # "max": no limit
            limits.append(int(value))
    return budget.memory_max < min(limits)


def apply(parent: str, budget: RunsBudget, root: Path = CGROUP_ROOT) -> dict[str, str]:
    """Write the budget on `parent` (a path under every hierarchy, e.g. /agent-supervisor) and
    read it back; what was written, by file. Refuses (fail closed) when it does not hold."""
    mode = detect_mode(root)
    if mode is CgroupMode.NONE:
        raise EnforcementError("no cgroup tree to hold the runs' budget", root=str(root))
    cgroup = Cgroup(parent, host_root=root)
    # v1 holds the limits in the pids and memory hierarchies; v2 needs them delegated down.
    memory_file = "memory.limit_in_bytes" if mode is CgroupMode.HYBRID else "memory.max"
    files = {"pids.max": str(budget.pids_max), memory_file: str(budget.memory_max)}
    written: dict[str, str] = {}
    try:
        if mode is CgroupMode.HYBRID:
            cgroup.create(_CONTROLLERS)
        else:
            cgroup.delegate(_CONTROLLERS)
    except OSError as exc:
        raise EnforcementError(f"cannot make the runs' cgroup {parent} with pids and memory: "
                               f"{exc.strerror} ({exc.filename})",
                               path=str(exc.filename or cgroup.path)) from exc
    for name, value in files.items():
        path = cgroup.file(name)
        try:
            cgroup.write(name, value)
            held = cgroup.read(name)
        except OSError as exc:
            raise EnforcementError(f"cannot set the runs' budget in {path}: {exc.strerror}",
                                   path=str(path), value=value) from exc
        # v1 rounds memory limits down to a page.
        if held != value and not (name == "memory.limit_in_bytes"
                                  and abs(int(held) - int(value)) < os.sysconf("SC_PAGE_SIZE")):
            raise EnforcementError(f"the runs' budget did not hold in {path}", path=str(path),
                                   value=value, read=held)
        written[str(path)] = held
    log.debug("runs' budget on %s: %s", parent, written)
    return written
