"""Opening workspace paths so that what is checked is what gets bound: `openat2` beneath an
open directory without following any symlink, and opening a caller's workspace with the
caller's own credentials (a thread that takes the caller's uid and groups for one open, so the
kernel walks the path and checks the permissions, ACLs included, exactly as for the caller).
Each returns an fd that pins the inode; nothing later resolves the path again. Needs root for
the credential switch; openat2 needs Linux >= 5.6."""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass

from supervisor.sandbox.libc import libc

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
# Beneath the directory, never through a symlink or a /proc magic link.
STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

# Raw syscall numbers: glibc's set*id wrappers change every thread of the process (the setxid
# broadcast); the raw syscalls change only the calling thread, which is the point here.
_SYSCALLS = {
    "x86_64": {"openat2": 437, "setgroups": 116, "setresuid": 117, "setresgid": 119},
    "aarch64": {"openat2": 437, "setgroups": 159, "setresuid": 147, "setresgid": 149},
}
_NR = _SYSCALLS.get(os.uname().machine, _SYSCALLS["x86_64"])
_KEEP = ctypes.c_uint(0xFFFFFFFF).value  # -1: leave that id unchanged


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int = STRICT, mode: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, resolve)
    fd = libc.syscall(_NR["openat2"], dirfd, os.fsencode(path), ctypes.byref(how),
                      ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


@dataclass(frozen=True)
class Credentials:
    """Who a path is walked as: the caller's uid, primary gid and supplementary gids."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def _become(creds: Credentials) -> None:
    groups = (ctypes.c_uint * max(len(creds.groups), 1))(*creds.groups)
    for name, args in (("setgroups", (len(creds.groups), groups)),
                       ("setresgid", (creds.gid, creds.gid, _KEEP)),
                       ("setresuid", (creds.uid, creds.uid, _KEEP))):
        if libc.syscall(_NR[name], *args) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{name}: {os.strerror(err)}")


def open_directory_as(path: str, creds: Credentials, access: int) -> int:
    """An O_PATH fd of the directory `path` names for `creds`, the path walked with their
    search permissions; raises PermissionError unless they also have `access` (os.R_OK etc.)
    on it. The switch happens in a thread of its own that ends right after, so no other
    thread of the daemon ever runs as the caller."""
    outcome: list[int | BaseException] = []

    def as_caller() -> None:
        fd = -1
        try:
            _become(creds)
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            # access() uses the real ids, which _become set; the magic link is this thread's
            # own fd, so the check is on the inode just opened, not on the path again.
            if not os.access(f"/proc/thread-self/fd/{fd}", access):
                raise PermissionError(13, "permission denied", path)
            outcome.append(fd)
        except BaseException as exc:  # handed to the caller's thread
            if fd >= 0:
                os.close(fd)
            outcome.append(exc)

    worker = threading.Thread(target=as_caller, name="workspace-access", daemon=True)
    worker.start()
    worker.join()
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def fd_path(fd: int) -> str:
    """The path the kernel has for an open fd (its mount-namespace view)."""
    return os.readlink(f"/proc/self/fd/{fd}")
