"""The runs' parent cgroup ([sandbox] cgroup_parent) is the supervisor's own: the daemon writes
the runs' budget on it, and break-glass, SIGUSR1, a global halt and the watchdog kill
everything in it. A parent that already holds processes or cgroups of someone else is
refused before any of that happens, and the parent the daemon made or took is marked so a
later daemon knows it. Reads the cgroup trees (any user); marking needs root.

What the supervisor puts in its parent: one cgroup per run, its MCP servers' and the startup
self-test's canary, each named `<name_prefix>-<run id>...` (a docker run's container cgroup
is below the run's). The watchdog's and the gateway worker's are siblings
(`<parent>-watchdog`, `<parent>-gateway`), each holding only its own kind of process (an
earlier daemon's watchdog still at work, a worker left behind), which the start ends: a
sibling holding any other process is refused as the parent is. No process lives in the
parent itself.

The mark is the extended attribute MARK on the parent's directory in the v2 tree (the
unified hierarchy of a hybrid host), holding the parent's path: it goes with the directory,
so a cgroup removed and made again by someone else does not inherit it. It is set on a parent
the daemon made, or one holding only runs' cgroups (a daemon's from before the mark, or on a
kernel that refuses it); an existing empty cgroup may be another tool's and stays unmarked.
The mark never spares the name check: a cgroup put in a marked parent since is judged too.
Processes in the runs' cgroups of an unmarked parent are taken only when a handover names it
or a watchdog of ours runs beside it. A pending handover naming the parent says what is in
its -watchdog sibling is the earlier daemon's.

Nesting: a parent inside another supervisor's parent (marked), or inside the parent whose
runs were handed over to this start, would be killed by that one's halt or watchdog (an old
watchdog cgroup.kills its whole parent when no daemon adopts its runs); a parent holding
another's would kill that one's runs. Both are refused."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from pathlib import Path

from supervisor.sandbox.cgroups import (
    CGROUP_ROOT,
    CgroupMode,
    detect_mode,
    unified_root,
    v1_hierarchies,
)

log = logging.getLogger(__name__)

MARK = "trusted.agent-supervisor"
# A run's cgroup (any name_prefix: a prefix changed between restarts leaves runs of the old
# one to adopt), an MCP server's beside it, the self-test's canary.
_RUN_CGROUP = re.compile(r"^[a-z][a-z0-9\-]{0,15}-(selftest[0-9a-f]{6}|[0-9a-f]{12}(-mcp\d+)?)$")
_SHOWN = 5  # pids and names quoted in a refusal
_WALKED = 4096  # cgroups below a parent looked at for another supervisor's mark
# The siblings and the module each one's processes run (`python -m MODULE`).
WATCHDOG_MODULE = "supervisor.daemon.watchdog"
SIBLINGS = {"-watchdog": WATCHDOG_MODULE, "-gateway": "supervisor.egress.worker"}


def _directories(parent: str, root: Path) -> list[Path]:
    relative = parent.strip("/")
    trees = [unified_root(root), *v1_hierarchies(root)]
    return [tree / relative for tree in trees if (tree / relative).is_dir()]


def is_marked(parent: str, root: Path = CGROUP_ROOT) -> bool:
    try:
        value = os.getxattr(unified_root(root) / parent.strip("/"), MARK)
    except OSError:  # absent, no such attribute, or not root (trusted.* is root's to read)
        return False
    return value.decode(errors="replace") == "/" + parent.strip("/")


def _carries_mark(path: Path) -> bool:
    try:
        os.getxattr(path, MARK)
    except OSError:
        return False
    return True


def nested(one: str, other: str) -> bool:
    """Whether one parent lies inside the other (not the same)."""
    a, b = one.strip("/").split("/"), other.strip("/").split("/")
    return a != b and (a[:len(b)] == b or b[:len(a)] == a)


def why_nested(parent: str, root: Path = CGROUP_ROOT, handed: str | None = None) -> str | None:
    """Why `parent` cannot be the runs' parent for where it lies: inside a cgroup that
    carries the mark (another supervisor's parent, or this one's before a change), inside or
    above `handed` (the parent whose runs a handover left to this start), or above a marked
    cgroup. None when it is clear of all of them."""
    shown = "/" + parent.strip("/")
    if handed is not None and nested(parent, handed):
        return (f"{shown} and {handed}, the runs' parent of the daemon that handed over its "
                f"runs, lie one inside the other: that daemon's watchdog kills all of "
                f"{handed} if no daemon adopts its runs, and a halt of either would kill the "
                f"other's runs")
    unified = unified_root(root)
    parts = parent.strip("/").split("/")
    for depth in range(1, len(parts)):
        above = unified / "/".join(parts[:depth])
        if _carries_mark(above):
            return (f"{shown} lies inside /{'/'.join(parts[:depth])}, the runs' parent of a "
                    f"supervisor ({MARK} is set on it): its global halt, or its watchdog, "
                    f"would kill this daemon's runs")
    top = unified / parent.strip("/")
    if not top.is_dir():
        return None
    seen = 0
    for directory, children, _files in os.walk(top):
        for child in children:
            seen += 1
            path = Path(directory) / child
            if seen > _WALKED:
                return (f"{top} holds more than {_WALKED} cgroups: too many to be sure none "
                        f"is another supervisor's runs' parent")
            if _carries_mark(path):
                return (f"{top} holds {path}, the runs' parent of a supervisor ({MARK} is "
                        f"set on it): this daemon's global halt would kill its runs")
    return None


def why_foreign(parent: str, root: Path = CGROUP_ROOT, handed: str | None = None) -> str | None:
    """Why `parent` is not the supervisor's to take; None when it is (absent: the daemon
    makes it; marked; or holding only runs' cgroups), and it is clear of every other
    supervisor's parent and of the handed-over one (why_nested)."""
    if detect_mode(root) is CgroupMode.NONE:
        return None  # nothing to take; the start refuses a host without cgroups on its own
    if (why := why_nested(parent, root, handed)) is not None:
        return why
    if (why := _sibling_strangers(parent, root, handed)) is not None:
        return why
    directories = _directories(parent, root)
    if not directories:
        return None
    for directory in directories:
        try:
            pids = (directory / "cgroup.procs").read_text().split()
        except OSError as exc:
            return f"cannot read {directory}/cgroup.procs: {exc.strerror}"
        if pids:
            return (f"{directory} already holds {len(pids)} process(es) that are not the "
                    f"supervisor's (pid {', '.join(pids[:_SHOWN])}): the runs' limits would "
                    f"apply to them and a global halt would kill them")
    # Judged by name even when marked: the mark says the parent is ours, not that everything
    # someone put in it since is.
    foreign: set[str] = set()
    for directory in directories:
        with contextlib.suppress(OSError):
            foreign.update(child.name for child in directory.iterdir()
                           if child.is_dir() and not _RUN_CGROUP.match(child.name))
    if foreign:
        shown = ", ".join(sorted(foreign)[:_SHOWN])
        return (f"{directories[0]} already holds cgroups the supervisor did not make ({shown}): "
                f"a global halt would kill what runs in them")
    if is_marked(parent, root) or handed == "/" + parent.strip("/") or _watched(parent, root):
        return None
    # Unmarked, with no watchdog of ours beside it and no handover naming it: processes in a
    # run-named cgroup are nobody's runs this daemon could adopt.
    for directory in directories:
        for child in _children(directory):
            if pids := _pids(child):
                return (f"{child} holds process(es) (pid {', '.join(pids[:_SHOWN])}) with no "
                        f"supervisor's watchdog beside {parent} and no handover naming it: "
                        f"they are not runs the supervisor can adopt, and a halt would kill "
                        f"them")
    return None


def _sibling_strangers(parent: str, root: Path, handed: str | None = None) -> str | None:
    """A process in the watchdog's or the gateway worker's cgroup that is not one: the start
    SIGKILLs what is in the first (an earlier watchdog) and writes the second's cgroup.kill.
    A handover naming the parent says what is in <parent>-watchdog is the earlier daemon's
    (its watchdog, and whatever it left there to end)."""
    for suffix, module in SIBLINGS.items():
        if suffix == "-watchdog" and handed == "/" + parent.strip("/"):
            continue
        for directory in _directories(parent.rstrip("/") + suffix, root):
            try:
                pids = (directory / "cgroup.procs").read_text().split()
            except OSError as exc:
                return f"cannot read {directory}/cgroup.procs: {exc.strerror}"
            # 0: a member in another pid namespace, which nothing here signals.
            strangers = [pid for pid in pids if pid != "0" and not _runs(int(pid), module)]
            if strangers:
                return (f"{directory} already holds {len(strangers)} process(es) that are not "
                        f"the supervisor's (pid {', '.join(strangers[:_SHOWN])}): the start "
                        f"would kill them")
    return None


def _runs(pid: int, module: str) -> bool:
    """Whether `pid` runs `python -m module`. One gone meanwhile is no stranger, nor one with
    no command line yet or any more: a process the daemon just spawned is still inside its
    exec for a moment after Popen returns (the kernel closes the spawner's pipe before it
    sets the new command line), and a zombie has none."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return not cmdline or module.encode() in cmdline.split(b"\0")


def _children(directory: Path) -> list[Path]:
    try:
        return [child for child in directory.iterdir() if child.is_dir()]
    except OSError:
        return []


def _pids(directory: Path) -> list[str]:
    try:
        return (directory / "cgroup.procs").read_text().split()
    except OSError:
        return []


def _watched(parent: str, root: Path) -> bool:
    """A watchdog of the supervisor's runs beside the parent (a running daemon's, or one
    holding handed-over runs), seen by its command line: the parent's runs are ours."""
    for directory in _directories(parent.rstrip("/") + "-watchdog", root):
        for pid in _pids(directory):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if WATCHDOG_MODULE.encode() in argv:
                return True
    return False


def holds_runs(parent: str, root: Path = CGROUP_ROOT) -> bool:
    """Whether the parent holds at least one cgroup and only runs' ones: an earlier
    daemon's, to mark (an existing empty cgroup may be another tool's, waiting for its
    processes: taken, not marked)."""
    children = [child.name for directory in _directories(parent, root)
                for child in _children(directory)]
    return bool(children) and all(_RUN_CGROUP.match(name) for name in children)


def exists(parent: str, root: Path = CGROUP_ROOT) -> bool:
    return bool(_directories(parent, root))


def mark(parent: str, root: Path = CGROUP_ROOT) -> str | None:
    """Mark the parent as the supervisor's (after the check and the budget made it); None,
    or why it could not be (the next start then judges its children by name)."""
    path = unified_root(root) / parent.strip("/")
    try:
        os.setxattr(path, MARK, ("/" + parent.strip("/")).encode())
    except OSError as exc:
        reason = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        log.warning("cannot mark %s as the supervisor's (%s %s): a later start judges its "
                    "cgroups by name", path, reason, exc.strerror)
        return f"{reason}: {exc.strerror}"
    return None
