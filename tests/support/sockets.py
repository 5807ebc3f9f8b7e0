"""Sockets the tests listen on."""

from __future__ import annotations

import socket


def listening_unix_socket(path: str, backlog: int = 16) -> socket.socket:
    """A non-blocking AF_UNIX stream socket bound at `path` and listening, as the daemon's
    listeners hand their sockets to an acceptor thread."""
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(path)
    listening.listen(backlog)
    listening.setblocking(False)
    return listening
