"""supervisor/sandbox/fdpass.py: every receiver of passed descriptors (seccomp listener,
watchdog handover, gateway worker) gets them close-on-exec, and reads the peer's identity."""

from __future__ import annotations

import os
import socket

from supervisor.sandbox.fdpass import peer_credentials, recv_fds


def test_received_descriptors_are_close_on_exec_and_the_message_intact() -> None:
    read_end, write_end = os.pipe()
    os.set_inheritable(read_end, True)  # as a sender may hold it: the receiver must not
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        socket.send_fds(left, [b"stdio-0"], [read_end, write_end])
        data, fds = recv_fds(right, 256, 4)
        try:
            assert data == b"stdio-0" and len(fds) == 2
            assert not any(os.get_inheritable(fd) for fd in fds)
            os.write(fds[1], b"x")  # the same pipe came through
            assert os.read(read_end, 1) == b"x"
        finally:
            for fd in (*fds, read_end, write_end):
                os.close(fd)


def test_the_peer_is_this_process() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert peer_credentials(right) == (os.getpid(), os.geteuid())
