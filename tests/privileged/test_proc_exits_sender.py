"""Only the kernel says a process exited (issue 13, review): the exit events an adopted run's
status comes from (supervisor/sandbox/proc_exits.py) arrive on a netlink socket whose port any
process with CAP_NET_ADMIN in the host's network namespace can send to. A forged
PROC_EVENT_EXIT for a watched init that is still running was taken as its exit (status 0: a
killed agent recorded as having succeeded, or its real status replaced). The socket is now
connected to the kernel, which refuses other senders, and a message from any port but the
kernel's (0) is dropped, for a socket handed over by an earlier version too. Real sockets on
the real kernel; needs root (the forger is root, the strongest local sender)."""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys

import pytest

from supervisor.sandbox import proc_exits
from supervisor.sandbox.proc_exits import Exit, ExitEvents, open_socket


def _forged_exit(pid: int, status: int = 0) -> bytes:
    event = struct.pack("=IIQ", proc_exits.PROC_EVENT_EXIT, 0, 0) \
        + proc_exits._EXIT.pack(pid, pid, status, 17)
    body = proc_exits._CN_MSG.pack(proc_exits.CN_IDX_PROC, proc_exits.CN_VAL_PROC, 0, 0,
                                   len(event), 0) + event
    return proc_exits._NLMSG.pack(proc_exits._NLMSG.size + len(body), proc_exits.NLMSG_DONE,
                                  0, 0, 0) + body


def _forger() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                         proc_exits.NETLINK_CONNECTOR)


def _unconnected_socket() -> socket.socket:
    """A subscribed socket as versions before this fix opened it (not connected)."""
    sock = _forger()
    proc_exits._attach_filter(sock)
    sock.bind((0, proc_exits.CN_IDX_PROC))
    op = struct.pack("=I", proc_exits.PROC_CN_MCAST_LISTEN)
    body = proc_exits._CN_MSG.pack(proc_exits.CN_IDX_PROC, proc_exits.CN_VAL_PROC, 0, 0,
                                   len(op), 0) + op
    sock.send(proc_exits._NLMSG.pack(proc_exits._NLMSG.size + len(body),
                                     proc_exits.NLMSG_DONE, 0, 0, os.getpid()) + body)
    sock.setblocking(False)
    return sock


@pytest.mark.parametrize("opened", ["now", "by an earlier version"])
def test_a_forged_exit_is_not_taken_for_the_inits(opened: str) -> None:
    sock = open_socket() if opened == "now" else _unconnected_socket()
    port = sock.getsockname()[0]
    events = ExitEvents(sock)
    victim = subprocess.Popen(["/bin/sleep", "600"])
    events.watch(victim.pid)
    events.start()
    try:
        with _forger() as forger:
            if opened == "now":
                with pytest.raises(ConnectionRefusedError):
                    forger.sendto(_forged_exit(victim.pid), (port, 0))
            else:  # delivered: the reader must tell it from the kernel's
                forger.sendto(_forged_exit(victim.pid), (port, 0))
        # Whatever reached the socket has been read once the kernel's own event for a later
        # exit is: the events of one socket arrive in order.
        marker = subprocess.Popen(["/bin/cat"], stdin=subprocess.PIPE)
        events.watch(marker.pid)  # before it exits: an exit not watched is dropped as read
        assert marker.stdin is not None
        marker.stdin.close()
        marker.wait()
        assert events.status(marker.pid, wait=10.0) == Exit(0)
        assert victim.poll() is None
        assert events.exited(victim.pid) is None  # still running: no exit taken
        victim.kill()
        victim.wait()
        assert events.status(victim.pid, wait=10.0) == Exit(137)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        events.close()


def test_a_sender_without_cap_net_admin_is_refused_by_the_kernel() -> None:
    """What the check above adds to: an unprivileged local user cannot send to the socket at
    all (the connector allows no non-root sender)."""
    sock = open_socket()
    try:
        code = (f"import socket, sys\n"
                f"s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, "
                f"{proc_exits.NETLINK_CONNECTOR})\n"
                f"try:\n"
                f"    s.sendto(bytes.fromhex({_forged_exit(1).hex()!r}), "
                f"({sock.getsockname()[0]}, 0))\n"
                f"except OSError as exc:\n"
                f"    sys.exit(exc.errno)\n")
        done = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup",
                               "--clear-groups", sys.executable, "-c", code],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == errno.EPERM, done.stderr
    finally:
        sock.close()
