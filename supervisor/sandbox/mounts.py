"""Host-side bind mounts the daemon makes for a run (root, host mount namespace).

A workspace such as /home/alice/repo sits behind 0700 directories that the sandbox's root (an
unprivileged host uid) cannot traverse, and runc resolves bind sources as that user. So the
daemon, as host root, binds the workspace to <runtime_dir>/workspaces/<run>, a path the
sandbox can traverse, and runc binds that. Removal unmounts and then only ever rmdirs: a
directory that still holds files is a mount that did not go away, never something to delete."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from supervisor.sandbox.libc import libc

MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
_libc = libc


def _check(result: int, what: str, path: Path) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} {path}: {os.strerror(err)}", str(path))


def bind(source: Path, target: Path) -> None:
    target.mkdir(mode=0o700, parents=False, exist_ok=False)
    try:
        _check(_libc.mount(str(source).encode(), str(target).encode(), None, MS_BIND, None),
               "bind mount onto", target)
        _check(_libc.mount(None, str(target).encode(), None, MS_PRIVATE, None),
               "make private", target)
    except OSError:
        unbind(target)
        raise


def is_mountpoint(path: Path) -> bool:
    """From the kernel's mount table: os.path.ismount misses a bind mount whose source is on
    the same file system (same st_dev), which is exactly the workspace case."""
    wanted = os.path.realpath(path)
    with open("/proc/self/mountinfo") as table:
        for line in table:
            mount_point = line.split(" ", 5)[4]
            decoded = mount_point.encode().decode("unicode_escape")  # \040 for spaces etc.
            if decoded == wanted:
                return True
    return False


def readonly_sources(workspace: Path, relative_paths: list[str]) -> tuple[str, ...]:
    """The profile's read-only workspace paths that exist, checked so that runc's bind source
    cannot leave the workspace: no component may be a symlink (a checkout whose .git/hooks
    points at /root would otherwise expose /root to the agent). Absent paths are skipped."""
    present: list[str] = []
    for relative in relative_paths:
        path = workspace
        for part in relative.split("/"):
            path = path / part
            if path.is_symlink():
                raise OSError(errno.ELOOP, f"{path} is a symlink; a read-only workspace path "
                                           f"must be a real file or directory", str(path))
        if path.exists():
            present.append(relative)
    return tuple(present)


def unbind(target: Path) -> None:
    """Detach the mount (if any) and remove the now empty mountpoint."""
    if not target.exists():
        return
    if is_mountpoint(target):
        _check(_libc.umount2(str(target).encode(), MNT_DETACH), "unmount", target)
    target.rmdir()  # raises if not empty: never recurse into what may be a workspace
