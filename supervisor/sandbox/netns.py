"""Per-run network namespaces, bind-mounted under /run/netns with pyroute2. Needs root.

The daemon creates the namespace before runc starts the container, so the namespace belongs to
the host's user namespace: the agent, root only inside its own user namespace, holds no
CAP_NET_ADMIN over it and cannot change its interfaces, routes or firewall. Default-deny is this
namespace with nothing in it but loopback.

Nothing here forks. pyroute2's `netns.create` and `NetNS` fork a helper and SIGTERM it
afterwards; a fork of the daemon inherits asyncio's signal wakeup fd, so that helper's SIGTERM
arrives in the daemon's event loop as if the daemon itself had been told to stop. Instead a
short-lived thread unshares its own network namespace (namespaces are per thread), binds it,
brings loopback up from inside and switches back; the thread then ends either way."""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

from pyroute2 import IPRoute, netns

from supervisor.sandbox.libc import libc

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_libc = libc


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
            netns.attach(name, f"self/task/{threading.get_native_id()}", libc=_libc)
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
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
    if not path_of(name).exists():
        return False
    netns.remove(name, libc=_libc)
    return True


def exists(name: str) -> bool:
    return path_of(name).exists()


def list_with_prefix(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))
