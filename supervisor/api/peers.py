"""Who is on the other end of a control-socket connection: SO_PEERCRED's uid, gid and pid,
the user's name and the process's groups. Runs in the daemon (root); reads the user and group
databases and /proc/<pid>/status of the peer."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import struct
from pathlib import Path

from supervisor.models import Actor

_PEERCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of a connected AF_UNIX socket's peer: one getsockopt, no lookups."""
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid, gid


def peer_actor_of(sock: socket.socket) -> Actor:
    """The actor behind a connected AF_UNIX socket (OSError if it has no credentials)."""
    return actor_of(*peer_credentials(sock))


def actor_of(pid: int, uid: int, gid: int) -> Actor:
    """The actor for these credentials: the user's name and the process's groups."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = ""
    return Actor(kind="user", uid=uid, gid=gid, pid=pid, name=name,
                 groups=_group_names(_peer_gids(pid, uid, gid, name)))


def _peer_gids(pid: int, uid: int, gid: int, name: str) -> list[int]:
    """The peer's groups as the kernel holds them for its process, else from the user database."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return sorted({gid, *(int(g) for g in line.split()[1:])})
    if name:
        return sorted(set(os.getgrouplist(name, gid)))
    return [gid]


def _group_names(gids: list[int]) -> list[str]:
    names = []
    for gid in gids:
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            names.append(str(gid))
    return names
