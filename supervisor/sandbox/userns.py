"""Per-user-namespace kernel limits of a run (`/proc/sys/user/max_*`), and the host's limits for
root that they are charged to. Needs root.

The kernel charges what a task creates (inotify instances and watches, fanotify groups and
marks, namespaces) to its uid in its own user namespace and, level by level, to the owner of
each namespace above it. runc creates a run's user namespace as host root, so everything an
agent holds also counts against host root's per-user limit in the initial namespace: an agent
with 128 inotify instances left host root with none. So every run gets limits of its own in its
namespace, written between `runc create` and `runc start` (the agent has not run yet), and
host root's limits are raised once, at startup, so that `max_runs` runs at their limits still
leave the host its reserve. Namespaces and fanotify are 0: the seccomp filter already refuses
creating them, and a zero makes that hold in the kernel's accounting too.

The values of /proc/sys/user belong to the user namespace of the task that opens them, so the
writer enters the run's namespace (nsenter); a multithreaded daemon cannot setns into a user
namespace itself."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from supervisor.errors import EnforcementError
from supervisor.sandbox.childenv import child_env

log = logging.getLogger(__name__)

USER_SYSCTL = Path("/proc/sys/user")
# Creating any of these inside a run is refused by seccomp; 0 refuses it in the kernel too.
ZERO = ("max_cgroup_namespaces", "max_fanotify_groups", "max_fanotify_marks",
        "max_ipc_namespaces", "max_mnt_namespaces", "max_net_namespaces",
        "max_pid_namespaces", "max_time_namespaces", "max_user_namespaces",
        "max_uts_namespaces")
# Host root's limits in the initial namespace that runs are charged to, by per-run key.
HOST_FILES = {"max_inotify_instances": Path("/proc/sys/fs/inotify/max_user_instances"),
              "max_inotify_watches": Path("/proc/sys/fs/inotify/max_user_watches")}
_NSENTER_TIMEOUT = 10.0
INT_MAX = 2**31 - 1  # what a sysctl of type int takes


@dataclass(frozen=True)
class UsernsLimits:
    """The values written into each run's user namespace."""

    values: dict[str, int]

    @classmethod
    def for_runs(cls, inotify_instances: int, inotify_watches: int) -> UsernsLimits:
        values = {name: 0 for name in ZERO}
        values["max_inotify_instances"] = inotify_instances
        values["max_inotify_watches"] = inotify_watches
        return cls(values)

    def present(self, root: Path = USER_SYSCTL) -> UsernsLimits:
        """Only the keys this kernel has (max_time_namespaces is 5.6+, fanotify 5.13+); a key
        the kernel lacks cannot be charged either."""
        return UsernsLimits({k: v for k, v in self.values.items() if (root / k).exists()})


def host_limit_errors(limits: UsernsLimits, max_runs: int,
                      reserve: dict[str, int]) -> dict[str, str]:
    """Why host root's limits cannot be made to hold `max_runs` runs plus the reserve, by
    per-run key ({}: they can): the files take an int."""
    return {key: (f"{reserve[key]} (host reserve) + {max_runs} runs x {limits.values[key]} "
                  f"= {needed}, above the most {HOST_FILES[key]} takes ({INT_MAX})")
            for key in HOST_FILES if key in limits.values
            and (needed := reserve[key] + max_runs * limits.values[key]) > INT_MAX}


def raise_host_limits(limits: UsernsLimits, max_runs: int, reserve: dict[str, int],
                      host_files: dict[str, Path] | None = None) -> dict[str, dict[str, int]]:
    """Make host root's per-user limits hold `max_runs` runs at their limits plus the host's
    reserve; never lowers one. Returns what changed ({key: {"from", "to"}})."""
    if errors := host_limit_errors(limits, max_runs, reserve):
        raise EnforcementError(f"cannot make host root's limits hold {max_runs} runs: "
                               + "; ".join(errors.values()))
    changed: dict[str, dict[str, int]] = {}
    for key, path in (host_files or HOST_FILES).items():
        if key not in limits.values:
            continue
        needed = reserve[key] + max_runs * limits.values[key]
        try:
            current = int(path.read_text())
            if current < needed:
                path.write_text(str(needed))
                changed[key] = {"from": current, "to": needed}
        except (OSError, ValueError) as exc:
            raise EnforcementError(
                f"cannot make host root's {path} hold {max_runs} runs: {exc}",
                path=str(path), needed=needed) from exc
    if changed:
        log.warning("raised host per-user limits so runs cannot exhaust root's: %s", changed)
    return changed


async def apply(pid: int, limits: UsernsLimits, nsenter: str = "nsenter") -> None:
    """Write `limits` into the user namespace of `pid` (a created, not yet started container
    init) and read them back; any difference refuses the run (fail closed)."""
    names = sorted(limits.values)
    script = " && ".join(
        [f"echo {limits.values[name]} > {USER_SYSCTL / name}" for name in names]
        + [f"cat {' '.join(str(USER_SYSCTL / name) for name in names)}"])
    # Entered as the namespace's root (nsenter's default): the files are writable by a holder
    # of CAP_SYS_RESOURCE there, but not by a uid the namespace does not map (host root).
    argv = [nsenter, f"--user=/proc/{pid}/ns/user", "--", "/bin/sh", "-c", script]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=child_env())
    except OSError as exc:
        raise EnforcementError(f"cannot run {nsenter} to set the run's user namespace "
                               f"limits: {exc.strerror}", pid=pid) from exc
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), _NSENTER_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise EnforcementError("setting the run's user namespace limits timed out",
                               pid=pid) from None
    read_back = stdout.decode(errors="replace").split()
    expected = [str(limits.values[name]) for name in names]
    if proc.returncode != 0 or read_back != expected:
        raise EnforcementError(
            "the run's user namespace limits did not hold",
            pid=pid, status=proc.returncode, expected=dict(zip(names, expected, strict=True)),
            read=read_back, stderr=stderr.decode(errors="replace")[-500:])
