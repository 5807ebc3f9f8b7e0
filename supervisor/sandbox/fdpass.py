"""Descriptors passed over unix sockets (SCM_RIGHTS) and the peer's credentials, for every
receiver in the supervisor: the seccomp listener (runc's notify fds), the watchdog and the
next daemon (a restart's handover) and the gateway worker (stdio MCP servers' pipes).
Descriptors are always received close-on-exec, so no process a receiver spawns inherits one.
No privilege of its own."""

from __future__ import annotations

import array
import socket
import struct

_INT = array.array("i").itemsize


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """The pid and uid of the process at the other end of a unix socket (struct ucred:
    pid, uid, gid)."""
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def unix_rights(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors in a recvmsg's ancillary data."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            rights = array.array("i")
            rights.frombytes(data[: len(data) - len(data) % rights.itemsize])
            fds.extend(rights)
    return fds


def recv_fds(sock: socket.socket, bufsize: int, maxfds: int, flags: int = 0
             ) -> tuple[bytes, list[int]]:
    """One message and up to `maxfds` descriptors, received close-on-exec
    (MSG_CMSG_CLOEXEC). Not socket.recv_fds: in Python 3.11 it drops its flags argument."""
    data, ancdata, _flags, _addr = sock.recvmsg(
        bufsize, socket.CMSG_SPACE(maxfds * _INT), flags | socket.MSG_CMSG_CLOEXEC)
    return data, unix_rights(ancdata)
