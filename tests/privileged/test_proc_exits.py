"""Exit statuses of processes that are not the reader's children, from the kernel's proc
connector (supervisor/sandbox/proc_exits.py; issue 13: an adopted run's exit status). Real
processes on the real kernel: the socket is opened by one process, handed to another over
SCM_RIGHTS after the exits happened (as the watchdog hands it to the next daemon), and that one
reads the Docker-like statuses: exit(3) is 3, SIGKILL 137, SIGTERM 143; a thread's exit is not
a thread's event is not taken for its process's. Needs root (CAP_NET_ADMIN)."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading

import pytest

from supervisor.sandbox.fdpass import recv_fds
from supervisor.sandbox.proc_exits import Exit, ExitEvents, docker_status, open_socket


def test_statuses_are_docker_like_and_survive_a_handover_of_the_socket() -> None:
    sock = open_socket()
    # The exits happen while nobody reads: the socket's buffer holds them.
    procs = {
        "exit 3": subprocess.Popen(["/bin/sh", "-c", "exit 3"]),
        "sigkill": subprocess.Popen(["/bin/sleep", "600"]),
        "sigterm": subprocess.Popen(["/bin/sleep", "600"]),
        # A second thread ends the process (exit_group(5) from it): the events of both
        # threads pass the socket's filter only as the process's, with 5.
        "threads": subprocess.Popen([sys.executable, "-c",
                                     "import threading, time, os\n"
                                     "threading.Thread(target=lambda: (time.sleep(0.3), "
                                     "os._exit(5))).start()\n"]),
    }
    procs["sigkill"].send_signal(signal.SIGKILL)
    procs["sigterm"].send_signal(signal.SIGTERM)
    for proc in procs.values():
        proc.wait()
    # Handed to another holder, as the daemon hands it to the watchdog and on.
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        socket.send_fds(left, [b"exits"], [sock.fileno()])
        sock.close()
        _data, [fd] = recv_fds(right, 64, 1)
    events = ExitEvents.from_fd(fd)
    for proc in procs.values():
        events.watch(proc.pid)
    events.start()
    try:
        got = {name: events.status(proc.pid) for name, proc in procs.items()}
    finally:
        events.close()
    assert got == {"exit 3": Exit(3), "sigkill": Exit(137), "sigterm": Exit(143),
                   "threads": Exit(5)}


def test_an_exit_not_watched_is_not_kept_and_one_never_seen_is_unknown() -> None:
    events = ExitEvents(open_socket())
    watched = subprocess.Popen(["/bin/sleep", "600"])
    events.watch(watched.pid)
    events.watch(1)  # never exits: still watched, so the reader stays open
    events.start()
    try:
        others = [subprocess.Popen(["/bin/true"]) for _ in range(20)]
        for proc in others:
            proc.wait()
        watched.kill()
        watched.wait()
        assert events.status(watched.pid) == Exit(137)
        assert events.exited(others[0].pid) is None  # read and dropped: not watched
        unknown = events.status(os.getpid(), wait=0.2)  # alive: no event
        assert unknown.code is None and "no exit event" in unknown.why
    finally:
        events.close()


def test_the_reader_closes_when_its_last_pid_is_forgotten() -> None:
    events = ExitEvents(open_socket())
    proc = subprocess.Popen(["/bin/sh", "-c", "exit 0"])
    events.watch(proc.pid)
    events.start()
    proc.wait()
    assert events.status(proc.pid) == Exit(0)
    assert events._sock is None
    assert not any(t.name == "proc-exits" and t.is_alive() for t in threading.enumerate())


def test_a_descriptor_that_is_not_a_connector_socket_is_refused() -> None:
    read, write = os.pipe()
    os.close(write)
    with pytest.raises(OSError):
        ExitEvents.from_fd(read)  # socket(fileno=) of a pipe: ENOTSOCK
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with pytest.raises(ValueError, match="not a connector socket"):
        ExitEvents.from_fd(other.detach())


@pytest.mark.parametrize(("raw", "code"), [(0, 0), (1 << 8, 1), (255 << 8, 255), (9, 137),
                                           (15, 143), (9 | 0x80, 137), (11 | 0x80, 139)])
def test_raw_wait_statuses_map_to_docker_codes(raw: int, code: int) -> None:
    assert docker_status(raw) == code


def test_the_filter_keeps_only_the_watched_inits_exits_out_of_a_storm() -> None:
    """An agent that forks and exits as fast as it can must not fill the socket (losing the
    status of the init that matters: ENOBUFS) nor make the reader do work: the kernel's filter
    passes the watched pids' exits only, before anything is queued. The socket is opened for
    one pid, as the handover opens it for its runs' inits; a storm of other exits follows, more
    than the buffer would hold unfiltered, while nobody reads; then the watched process exits.
    Exactly one event is queued, and it is the watched one's."""
    watched = subprocess.Popen(["/bin/sleep", "600"])
    sock = open_socket([watched.pid])
    try:
        storm = subprocess.run(["/bin/sh", "-c", "i=0; while [ $i -lt 3000 ]; do /bin/true; "
                                "i=$((i+1)); done"], check=True)
        assert storm.returncode == 0
        watched.kill()
        watched.wait()
        sock.setblocking(True)
        sock.settimeout(2.0)
        first = sock.recv(4096)
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(4096)  # nothing else was queued: not one of the 3,000 other exits
    finally:
        sock.close()
    # nlmsghdr (16), cn_msg (20), proc_event's what, cpu, timestamp (16), then the exit's
    pid, tgid, code, _signal = struct.unpack_from("=iiII", first, 16 + 20 + 16)
    assert (pid, tgid, docker_status(code)) == (watched.pid, watched.pid, 137)


def test_the_filter_follows_the_watched_set() -> None:
    """Watching a pid after the socket was opened widens the filter; forgetting one narrows it:
    an exit of a pid no longer watched is not kept, one newly watched is."""
    first = subprocess.Popen(["/bin/sleep", "600"])
    second = subprocess.Popen(["/bin/sleep", "600"])
    events = ExitEvents(open_socket([first.pid]))
    events.watch(first.pid)
    events.watch(second.pid)
    events.watch(1)  # never exits: keeps the reader open
    events.start()
    try:
        second.kill()
        second.wait()
        assert events.status(second.pid) == Exit(137)
        events.forget(first.pid)
        events.exited(1)  # a read: the narrowed filter is attached before it
        first.kill()
        first.wait()
        assert events.status(first.pid, wait=0.3).code is None
    finally:
        events.close()
