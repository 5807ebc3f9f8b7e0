"""Exit statuses of processes that are not this daemon's children: the kernel's proc connector
(NETLINK_CONNECTOR, CN_IDX_PROC) multicasts PROC_EVENT_EXIT with the exit code of every
process that exits on the host. Needs CAP_NET_ADMIN in the initial user and pid namespaces
(the kernel sends these events to no other listener).

Why. At a restart the runs go to the next daemon (daemon/handover.py), but a run's init stays
the child of the daemon that launched it; once that daemon exits the init is reparented to
PID 1 (or the nearest subreaper), which reaps it, and waitpid in the next daemon finds no
child. The daemon that hands over opens one of these sockets before it stops watching its
runs, hands it to the watchdog with the runs, and the next daemon reads it: an exit between
the handover and the adoption waits in the socket's buffer.

The socket carries a classic BPF filter that passes only exits of whole processes (pid ==
tgid: a thread's exit is not the process's) among the pids being watched (up to
FILTERED_PIDS; every whole-process exit past that), and a forced receive buffer. So the buffer
holds nothing else: an agent that forks and exits as fast as it can neither fills it nor costs
the daemon's reader thread (and the GIL it shares with the kill path) a thing.

Only the kernel's messages count (sender port 0): a process with CAP_NET_ADMIN could send one
of its own to this socket's port, and the socket is connected to the kernel so that it cannot
(ECONNREFUSED); one handed over by an earlier version is not, and the sender is checked all the
same. What is not read in time is lost: the kernel then answers ENOBUFS once, and an exit not
found after that is reported unknown with that reason, never guessed.

Where the kernel refuses the connector (a daemon outside the initial network, user or pid
namespace: a container, as the systemd tier's machine is), or it lost the event, the init's
pidfd still tells (`pidfd_exit`): since Linux 6.15 the kernel keeps a reaped process's exit
status for whoever holds a pidfd of it (PIDFD_GET_INFO with PIDFD_INFO_EXIT), whichever
process reaped it (PID 1 or a subreaper, once the daemon that launched it is gone)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass

log = logging.getLogger(__name__)

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_EXIT = 0x80000000
NLMSG_DONE = 3
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
RECEIVE_BUFFER = 8 << 20  # charged only while used: ~20,000 queued exits (bench/proc_exits.py)
# The event's layout: nlmsghdr (16), cn_msg (20), then proc_event: what, cpu, timestamp_ns,
# and for an exit: process_pid, process_tgid, exit_code, exit_signal.
_NLMSG = struct.Struct("=IHHII")
_CN_MSG = struct.Struct("=IIIIHH")
_WHAT_AT = _NLMSG.size + _CN_MSG.size
_EXIT = struct.Struct("=iiII")
_EXIT_AT = _WHAT_AT + 16
_EVENT_SIZE = _EXIT_AT + _EXIT.size
LATE_EVENT = 1.0  # the event follows the pidfd's wake-up (exit_notify, then the connector)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


# A classic BPF program holds at most 4,096 instructions (BPF_MAXINSNS): 2 per pid below.
FILTERED_PIDS = 2000


def _be(value: int) -> int:
    """A host-order field as BPF's absolute loads (big-endian) see it."""
    return int(struct.unpack(">I", struct.pack("=I", value & 0xFFFFFFFF))[0])


def _exits_only(pids: Collection[int] | None = None) -> bytes:
    """The filter: the event is an exit, of a thread group's leader, and (with `pids`, at most
    FILTERED_PIDS of them) of one of `pids`. Every test jumps at most one instruction, so the
    program has no long jumps however many pids it checks."""
    ld_abs, jeq_k, jeq_x, tax, ret = 0x20, 0x15, 0x1D, 0x07, 0x06
    accept, drop = (ret, 0, 0, 0xFFFFFFFF), (ret, 0, 0, 0)
    program = [
        (ld_abs, 0, 0, _WHAT_AT),
        (jeq_k, 1, 0, _be(PROC_EVENT_EXIT)),
        drop,                           # not an exit
        (ld_abs, 0, 0, _EXIT_AT),       # process_pid
        (tax, 0, 0, 0),
        (ld_abs, 0, 0, _EXIT_AT + 4),   # process_tgid (== process_pid from here on)
        (jeq_x, 1, 0, 0),
        drop,                           # a thread, not the process
    ]
    if pids is None or len(pids) > FILTERED_PIDS:
        program.append(accept)
    else:
        for pid in sorted(pids):
            program += [(jeq_k, 0, 1, _be(pid)), accept]
        program.append(drop)
    return b"".join(struct.pack("=HBBI", *insn) for insn in program)


def _attach_filter(sock: socket.socket, pids: Collection[int] | None = None) -> None:
    code = _exits_only(pids)
    count = len(code) // ctypes.sizeof(_SockFilter)
    insns = (_SockFilter * count).from_buffer_copy(code)
    prog = _SockFprog(count, ctypes.cast(insns, ctypes.POINTER(_SockFilter)))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(
        ctypes.string_at(ctypes.addressof(prog), ctypes.sizeof(prog))))


def open_socket(pids: Collection[int] | None = None) -> socket.socket:
    """A connector socket subscribed to process exits (of `pids` only, when given), filtered,
    non-blocking, close-on-exec. OSError (EPERM without CAP_NET_ADMIN) if the kernel refuses
    any step."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                         NETLINK_CONNECTOR)
    try:
        _attach_filter(sock, pids)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.bind((0, CN_IDX_PROC))
        # Connected to the kernel (port 0): the kernel then refuses any other socket's
        # unicast to this one (ECONNREFUSED), so nothing but the kernel's multicast fills
        # its buffer; the multicast itself is not affected.
        sock.connect((0, 0))
        op = struct.pack("=I", PROC_CN_MCAST_LISTEN)
        cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(op), 0)
        body = cn + op
        sock.send(_NLMSG.pack(_NLMSG.size + len(body), NLMSG_DONE, 0, 0, os.getpid()) + body)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# PIDFD_GET_INFO = _IOWR(0xFF, 11, struct pidfd_info), with the struct's first version (64
# bytes: mask, cgroupid, pid, tgid, ppid, eight ids, exit_code); exit_code is at byte 60.
_PIDFD_INFO_SIZE = 64
PIDFD_GET_INFO = (3 << 30) | (_PIDFD_INFO_SIZE << 16) | (0xFF << 8) | 11
PIDFD_INFO_EXIT = 1 << 3
_PIDFD_EXIT_CODE_AT = 60
REAP_WAIT = 2.0  # how long the reaper (PID 1, a subreaper) may take before the status is kept
_REAP_POLL = 0.02


def pidfd_exit_status(pidfd: int) -> int | None:
    """The raw wait status of the exited, reaped process `pidfd` refers to, or None while it
    is not reaped yet. OSError where the kernel has no PIDFD_INFO_EXIT (before Linux 6.15)."""
    info = bytearray(_PIDFD_INFO_SIZE)
    struct.pack_into("=Q", info, 0, PIDFD_INFO_EXIT)
    try:
        fcntl.ioctl(pidfd, PIDFD_GET_INFO, info)
    except ProcessLookupError:
        return None  # gone without a status kept, or not reaped: asked again
    (mask,) = struct.unpack_from("=Q", info, 0)
    if not mask & PIDFD_INFO_EXIT:
        return None
    (status,) = struct.unpack_from("=i", info, _PIDFD_EXIT_CODE_AT)
    return int(status)


def pidfd_exit(pidfd: int, wait: float = REAP_WAIT) -> Exit:
    """The Docker-like exit status of a process that has exited (its pidfd said so) and is
    not this process's child, from its pidfd; waits up to `wait` for its reaper. Blocking:
    call it off the event loop."""
    deadline = time.monotonic() + wait
    while True:
        try:
            status = pidfd_exit_status(pidfd)
        except OSError as exc:
            return Exit(None, f"the kernel keeps no exit status for a pidfd (PIDFD_INFO_EXIT, "
                              f"Linux 6.15+: {exc.strerror or exc})")
        if status is not None:
            return Exit(docker_status(status))
        if time.monotonic() >= deadline:
            return Exit(None, f"its init was not reaped within {wait:g}s of its exit")
        time.sleep(_REAP_POLL)


def docker_status(wait_status: int) -> int:
    """The event's exit_code is the raw wait status: the code as exit(3) gave it, or 128 plus
    the signal that ended it (137 SIGKILL, 143 SIGTERM), as Docker reports them."""
    code = os.waitstatus_to_exitcode(wait_status & 0xFFFF)
    return 128 - code if code < 0 else code


@dataclass(frozen=True)
class Exit:
    """How a process ended: its exit code, or why it is unknown."""
    code: int | None
    why: str = ""  # why the code is unknown; "" when it is known


class ExitEvents:
    """Reads exits from a socket of `open_socket` on a thread of its own and keeps those of the
    pids it is asked to watch (bounded by them); the socket's filter follows the watched set
    (re-attached before the next read once it changes), and whatever else was queued before is
    dropped as it is read. Closes itself when the last watched pid is
    forgotten."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._lock = threading.Lock()
        self._watched: set[int] = set()
        # What the attached filter passes, if this object attached it (None: every pid; a
        # socket handed over is taken to pass none until the first watch attaches one).
        self._filtered: frozenset[int] | None = frozenset()
        self._refilter = False  # forgotten pids: narrow the filter before the next read
        self._exits: dict[int, int] = {}
        self.lost: str | None = None  # the kernel dropped events (ENOBUFS): when
        self._thread: threading.Thread | None = None
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    @classmethod
    def from_fd(cls, fd: int) -> ExitEvents:
        """Take a socket handed over (daemon/handover.py); ValueError if it is not one."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            raise
        if sock.family != socket.AF_NETLINK or sock.proto != NETLINK_CONNECTOR:
            sock.close()
            raise ValueError("the descriptor handed over for exits is not a connector socket")
        return cls(sock)

    def watch(self, *pids: int) -> None:
        """Keep the exits of `pids`. The filter widens before this returns (an exit a moment
        later must pass it); it narrows lazily, at the next read after a `forget`."""
        with self._lock:
            self._watched.update(pids)
            if self._filtered is not None and not self._watched <= self._filtered:
                self._attach()

    def _attach(self) -> None:
        """The filter for the watched set now (under the lock); on failure the old one stays,
        and a wider filter (every whole-process exit) is tried before giving up: a filter too
        narrow would lose a watched exit."""
        if self._sock is None:
            return
        wanted = frozenset(self._watched)
        try:
            _attach_filter(self._sock, wanted)
            self._filtered = wanted if len(wanted) <= FILTERED_PIDS else None
        except OSError as exc:
            log.error("setting the process exit socket's filter failed: %s", exc)
            with contextlib.suppress(OSError):
                _attach_filter(self._sock, None)
                self._filtered = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._read_on, name="proc-exits", daemon=True)
        self._thread.start()

    def _read_on(self) -> None:
        while True:
            with self._lock:
                sock = self._sock
            if sock is None:
                return
            with contextlib.suppress(InterruptedError, OSError, ValueError):
                select.select([sock.fileno(), self._wake_read], [], [], 1.0)
            self._drain()

    def _drain(self) -> None:
        """Read everything queued now, keeping the watched pids' exits."""
        with self._lock:
            sock = self._sock
            if sock is None:
                return
            while True:
                try:
                    data, (sender, _groups) = sock.recvfrom(4096)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:
                        self.lost = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                        log.error("process exit events were dropped by the kernel (ENOBUFS): "
                                  "an adopted run's exit status may be unknown")
                        continue
                    log.error("the process exit socket failed: %s", exc)
                    self.lost = f"the socket failed: {exc}"
                    return
                if sender != 0 or len(data) < _EVENT_SIZE:
                    continue  # only the kernel (port 0) says a process exited
                (what,) = struct.unpack_from("=I", data, _WHAT_AT)
                pid, tgid, exit_code, _signal = _EXIT.unpack_from(data, _EXIT_AT)
                if what == PROC_EVENT_EXIT and pid == tgid and pid in self._watched:
                    self._exits.setdefault(pid, exit_code)  # the init's: a reused pid exits later

    def status(self, pid: int, wait: float = LATE_EVENT) -> Exit:
        """The Docker-like exit status of `pid`, which has exited (its pidfd said so); waits
        up to `wait` for its event, which the kernel sends just after that. Forgets `pid`.
        Blocking: call it off the event loop."""
        deadline = time.monotonic() + wait
        try:
            while True:
                self._drain()
                with self._lock:
                    if pid in self._exits:
                        return Exit(docker_status(self._exits[pid]))
                    sock = self._sock
                left = deadline - time.monotonic()
                if sock is None or left <= 0:
                    break
                with contextlib.suppress(InterruptedError, OSError, ValueError):
                    select.select([sock], [], [], left)
            if self.lost is not None:
                return Exit(None, f"the kernel dropped process exit events (ENOBUFS, at "
                                  f"{self.lost}) before this daemon read them")
            return Exit(None, "no exit event for its init arrived")
        finally:
            self.forget(pid)

    def exited(self, pid: int) -> Exit | None:
        """The status of `pid` if its exit has been read (non-blocking), else None."""
        self._drain()
        with self._lock:
            if pid in self._exits:
                return Exit(docker_status(self._exits[pid]))
        return None

    def forget(self, pid: int) -> None:
        with self._lock:
            self._watched.discard(pid)
            self._exits.pop(pid, None)
            self._refilter = True
            last = not self._watched
        if last:
            self.close()

    def close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            with contextlib.suppress(OSError):
                os.write(self._wake_write, b"x")
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
        for fd in (self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_read = self._wake_write = -1
