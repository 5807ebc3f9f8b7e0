"""Per-run network namespaces, bind-mounted under /run/netns as iproute2 does. Needs root.

The daemon creates the namespace before runc starts the container, so the namespace belongs to
the host's user namespace: the agent, root only inside its own user namespace, holds no
CAP_NET_ADMIN over it and cannot change its interfaces, routes or firewall. Default-deny is this
namespace with nothing in it but loopback.

Nothing here forks. pyroute2's `netns.create` and `NetNS` fork a helper and SIGTERM it
afterwards; a fork of the daemon inherits asyncio's signal wakeup fd, so that helper's SIGTERM
arrives in the daemon's event loop as if the daemon itself had been told to stop. Instead a
short-lived thread unshares its own network namespace (namespaces are per thread), binds it,
brings loopback up from inside and switches back; the thread then ends either way. Plain
syscalls and one ioctl, no pyroute2: a run without the gateway (network mode "none") never
imports it (its package import is most of an embedded CI run's import time)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import threading
from pathlib import Path

from supervisor.sandbox.libc import libc

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MS_REC = 16384
_MS_SHARED = 1 << 20
_MNT_DETACH = 2
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_libc = libc


def _mount(source: bytes, target: bytes, flags: int) -> int:
    return int(_libc.mount(source, target, b"none", flags, None))


def _share_directory() -> None:
    """/run/netns as a shared mount (a bind of itself first if it is not a mount yet), as
    iproute2 makes it: a namespace bound in it shows in every mount namespace that sees it."""
    NETNS_DIR.mkdir(mode=0o755, exist_ok=True)
    directory = str(NETNS_DIR).encode()
    if _mount(b"", directory, _MS_SHARED | _MS_REC) == 0:
        return
    if _mount(directory, directory, _MS_BIND | _MS_REC) != 0 or \
            _mount(b"", directory, _MS_SHARED | _MS_REC) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"making {NETNS_DIR} a shared mount: {os.strerror(err)}")


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, _SIOCGIFFLAGS, request + b"\0" * 22
                                                  )[:18])[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_UP)
                    + b"\0" * 22)


def path_of(name: str) -> Path:
    return NETNS_DIR / name


def _build(name: str) -> None:
    """Runs in its own thread: unshare, bind, loopback up, switch back."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET) for {name}: {os.strerror(err)}")
        try:
            _share_directory()
            path = path_of(name)
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
            source = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
            if _mount(source, str(path).encode(), _MS_BIND) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"bind {source.decode()} onto {path}: {os.strerror(err)}",
                              str(path))
            _loopback_up()
        finally:
            if _libc.setns(original, CLONE_NEWNET) != 0:
                # This thread is about to end; nothing else ever runs in it.
                err = ctypes.get_errno()
                raise OSError(err, f"setns back to the host namespace: {os.strerror(err)}")
    finally:
        os.close(original)


def create(name: str) -> Path:
    """A new namespace with loopback up; removed again if any step fails."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            _build(name)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=target, name=f"netns-{name}")
    worker.start()
    worker.join()
    if errors:
        if path_of(name).exists():
            remove(name)
        raise errors[0]
    return path_of(name)


def adopt(name: str, pid: int) -> Path:
    """Name the network namespace of `pid` (a container the engine made) under /run/netns,
    so it is torn down, listed and reaped like the ones `create` makes. A bind mount only."""
    path = path_of(name)
    NETNS_DIR.mkdir(mode=0o755, exist_ok=True)
    path.touch(mode=0o444, exist_ok=False)
    source = f"/proc/{pid}/ns/net".encode()
    if _libc.mount(source, str(path).encode(), None, _MS_BIND, None) != 0:
        err = ctypes.get_errno()
        path.unlink()
        raise OSError(err, f"bind {source.decode()} onto {path}: {os.strerror(err)}", str(path))
    return path


def remove(name: str) -> bool:
    """Unmount and delete the namespace; False when it did not exist."""
    path = path_of(name)
    if not path.exists():
        return False
    if _libc.umount2(str(path).encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err != errno.EINVAL:  # EINVAL: not a mount (a create that failed half-way)
            raise OSError(err, f"unmount {path}: {os.strerror(err)}", str(path))
    path.unlink()
    return True


def exists(name: str) -> bool:
    return path_of(name).exists()


def list_with_prefix(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))
