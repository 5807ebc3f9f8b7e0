"""Seccomp kills counted as attempts: a thread that reads the kernel's audit records of seccomp
kills (AUDIT_SECCOMP, type 1326) from the audit netlink multicast group and attributes each to
the run whose audit session it came from. Needs root (CAP_AUDIT_READ) in the host's initial
network namespace (the kernel multicasts audit records there only).

Why. A run's filter admits the native ABI only: a thread that enters the kernel through i386
`int 0x80` (socketcall, ipc, or any other) or through x32 numbers is killed by the kernel at the
filter's architecture check, before any notify listener is asked, so seccomp_notify.py never
sees it. The kernel audits every seccomp kill (`kernel.seccomp.actions_logged` holds
`kill_thread` and `kill_process` by default) with the task's audit session id. `runc create`
runs in a fresh audit session (runc.py writes its loginuid), which every process of the
container inherits and cannot leave (a new session needs CAP_AUDIT_CONTROL in the initial user
namespace), so the session names the run even after the killed process has been reaped.

Whether records arrive at all depends on the host (audit compiled in, the sysctl, the network
namespace): at start the reader kills a child of its own under seccomp strict mode and waits for
that record; `active` says whether it came. Counting is telemetry; the kill itself is the
enforcement and happens either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from supervisor.sandbox.childenv import child_env
from supervisor.telemetry import SyscallAttempt

log = logging.getLogger(__name__)

NETLINK_AUDIT = 9
AUDIT_NLGRP_READLOG = 1  # multicast group: a copy of every audit record
AUDIT_SECCOMP = 1326
_NLMSG = struct.Struct("=IHHII")  # struct nlmsghdr
_SESSION_UNSET = 4294967295
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
_X32_SYSCALL_BIT = 0x40000000
# Names of the compat entry points an agent probes most; any other is "nr N".
_I386_NAMES = {102: "socketcall", 117: "ipc", 359: "socket", 360: "socketpair", 310: "unshare",
               26: "ptrace", 21: "mount", 120: "clone", 11: "execve", 5: "open", 4: "write"}
_X86_64_NAMES = {41: "socket", 53: "socketpair", 272: "unshare", 101: "ptrace", 165: "mount",
                 56: "clone", 59: "execve", 1: "write", 2: "open", 521: "ptrace"}
_FIELD = re.compile(rb"(\w+)=(\"[^\"]*\"|\S+)")
_MAX_SESSIONS = 4096  # runs of one daemon at once, with room; past it the oldest is dropped
_CALIBRATE_TIMEOUT = 3.0
# A child that enters seccomp strict mode and makes a syscall strict mode refuses: the kernel
# kills it and audits the kill like any other seccomp kill.
_CALIBRATION_CHILD = ("import ctypes, os\n"
                      "ctypes.CDLL(None).prctl(22, 1, 0, 0, 0)\n"  # PR_SET_SECCOMP, STRICT
                      "os.getpid()\n")
# The same child in perl, where perl is at hand and prctl's number is known (perl's `syscall`
# takes the raw number): it starts in ~1.4 ms with ~1.6 ms of CPU, a Python interpreter with
# ctypes in ~7.5 ms with as much CPU, which the calibration took from a starting supervisor on
# a 2-CPU host (an embedded CI run's core assembly and `runc create`: docs/benchmarks.md).
_PERL = "/usr/bin/perl"
_PRCTL = {"x86_64": 157, "aarch64": 167}  # asm-generic's number serves aarch64


def calibration_argv(machine: str | None = None, perl: str | None = None) -> list[str]:
    """How the calibration child is started: perl (`perl`, default _PERL; "": none) where it
    can do it, Python otherwise."""
    perl = _PERL if perl is None else perl
    number = _PRCTL.get(machine or os.uname().machine)
    if number is not None and os.access(perl, os.X_OK):
        return [perl, "-e", f"syscall({number}, 22, 1, 0, 0, 0); getppid()"]
    return [sys.executable, "-I", "-S", "-c", _CALIBRATION_CHILD]


def compat_name(arch: int, nr: int) -> str:
    """How a killed call is named in telemetry: the ABI it came through, then the syscall."""
    if arch == AUDIT_ARCH_I386:
        return f"i386:{_I386_NAMES.get(nr, f'nr {nr}')}"
    if arch == AUDIT_ARCH_X86_64 and nr & _X32_SYSCALL_BIT:
        bare = nr & ~_X32_SYSCALL_BIT
        return f"x32:{_X86_64_NAMES.get(bare, f'nr {bare}')}"
    if arch == AUDIT_ARCH_X86_64:
        return _X86_64_NAMES.get(nr, f"nr {nr}")
    return f"arch {arch:#x}:nr {nr}"


def parse_record(payload: bytes) -> dict[str, str] | None:
    """The fields of one AUDIT_SECCOMP record's text (`audit(...): auid=... ses=... pid=...
    sig=31 arch=40000003 syscall=102 compat=1 ...`), or None if it is not one."""
    head, sep, body = payload.partition(b"): ")
    if not sep or not head.startswith(b"audit("):
        return None
    fields = {key.decode(): value.strip(b'"').decode(errors="replace")
              for key, value in _FIELD.findall(body)}
    if not {"ses", "pid", "sig", "arch", "syscall"} <= fields.keys():
        return None
    return fields


def audit_session(pid: int | str = "self") -> int | None:
    """The audit session of a process, or None when it has none."""
    try:
        with open(f"/proc/{pid}/sessionid", "rb") as f:
            session = int(f.read().strip() or b"0")
    except (OSError, ValueError):
        return None
    return None if session in (0, _SESSION_UNSET) else session


class SeccompKillReader:
    """Counts seccomp kills per container on a thread of its own; `on_kill(container, attempt)`
    is called on that thread (it must be thread-safe and must not block)."""

    def __init__(self, on_kill: Callable[[str, SyscallAttempt], None]) -> None:
        self._on_kill = on_kill
        self._lock = threading.Lock()
        self._sessions: dict[int, str] = {}
        self._counts: dict[str, int] = {}
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_read, self._wake_write = -1, -1
        self._stopping = False
        self._calibration_pid = 0
        self._calibrated = threading.Event()
        self.active = False
        self.why_inactive = "not started"
        self.lost = 0  # records the kernel dropped because this socket's buffer was full

    def start(self) -> None:
        """Join the audit multicast group and calibrate in the background; never raises: a
        host that gives no records leaves the reader inactive (logged)."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 NETLINK_AUDIT)
        except OSError as exc:
            self._inactive(f"no audit netlink socket: {exc.strerror or exc}")
            return
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, AUDIT_NLGRP_READLOG))
        except OSError as exc:
            sock.close()
            self._inactive(f"cannot read audit records: {exc.strerror or exc}")
            return
        self._sock = sock
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="seccomp-kills", daemon=True)
        self._thread.start()

    def wait_calibrated(self, timeout: float = _CALIBRATE_TIMEOUT + 1.0) -> bool:
        """Block until calibration ended (or `timeout`); returns `active`."""
        self._calibrated.wait(timeout)
        return self.active

    def stop(self) -> None:
        thread = self._thread
        if thread is not None:
            self._stopping = True
            with contextlib.suppress(OSError):
                os.write(self._wake_write, b"\0")
            thread.join()
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in (self._wake_read, self._wake_write):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_read, self._wake_write = -1, -1

    def watch(self, session: int, container_id: str) -> None:
        """Kills in audit `session` are `container_id`'s from now on."""
        with self._lock:
            if session not in self._sessions and len(self._sessions) >= _MAX_SESSIONS:
                self._counts.pop(self._sessions.pop(next(iter(self._sessions))), None)
            self._sessions[session] = container_id
            self._counts.setdefault(container_id, 0)

    def unwatch(self, container_id: str) -> None:
        with self._lock:
            for session in [s for s, c in self._sessions.items() if c == container_id]:
                del self._sessions[session]
            self._counts.pop(container_id, None)

    def counted(self, container_id: str) -> int:
        with self._lock:
            return self._counts.get(container_id, 0)

    def _inactive(self, why: str) -> None:
        self.active = False
        self.why_inactive = why
        self._calibrated.set()
        log.warning("seccomp kills (compat ABIs) will not be counted as attempts: %s; they are "
                    "still refused by the kernel", why)

    # --- the reader's thread

    def _serve(self) -> None:
        assert self._sock is not None
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        calibrate_until = self._calibrate()
        try:
            while not self._stopping:
                timeout = -1
                if not self._calibrated.is_set():
                    timeout = max(0, int((calibrate_until - time.monotonic()) * 1000) + 1)
                for fd, _events in poller.poll(timeout):
                    if fd == self._sock.fileno():
                        self._receive()
                if not self._calibrated.is_set() and time.monotonic() >= calibrate_until:
                    self._inactive("the kernel sent no audit record of a seccomp kill "
                                   "(audit off, kill logging off, or not the initial network "
                                   "namespace)")
        except Exception:
            log.exception("seccomp kill reader failed; kills are no longer counted")
            self.active = False
            self.why_inactive = "the reader failed"
            self._calibrated.set()

    def _calibrate(self) -> float:
        argv = calibration_argv()
        try:
            status = self._calibration_child(argv)
            if status is not None and status >= 0 and argv[0] != sys.executable:
                # perl ended by itself: its syscall() did not reach prctl (a perl built for
                # another ABI than the kernel's machine, a 32-bit one on a 64-bit kernel, numbers
                # the calls otherwise). The Python child calls prctl by name, in its own ABI.
                log.info("the perl calibration child exited %d instead of being killed; "
                         "calibrating with Python", status)
                self._calibration_child(calibration_argv(perl=""))
        except OSError as exc:
            self._inactive(f"cannot start the calibration child: {exc}")
            return 0.0
        return time.monotonic() + _CALIBRATE_TIMEOUT

    def _calibration_child(self, argv: list[str]) -> int | None:
        """Start `argv` as the calibration child and wait for it (bounded); its status (None:
        it did not end in time and was killed)."""
        # The minimal host environment (sandbox/childenv.py), never the daemon's own.
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=child_env())
        self._calibration_pid = child.pid
        try:
            return child.wait(timeout=_CALIBRATE_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            return None

    def _receive(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == 105:  # ENOBUFS: the kernel dropped records for us
                    self.lost += 1
                    continue
                raise
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, _flags, _seq, _port = _NLMSG.unpack_from(data, offset)
                if length < _NLMSG.size:
                    break
                if kind == AUDIT_SECCOMP:
                    payload = data[offset + _NLMSG.size:offset + length].rstrip(b"\0")
                    fields = parse_record(payload)
                    if fields is not None:
                        self._record(fields)
                offset += (length + 3) & ~3

    def _record(self, fields: dict[str, str]) -> None:
        try:
            session, pid = int(fields["ses"]), int(fields["pid"])
            signal_number = int(fields["sig"])
            arch, nr = int(fields["arch"], 16), int(fields["syscall"])
        except ValueError:
            return
        if signal_number == 0:
            return  # logged but not killed (SECCOMP_RET_LOG and kin): not ours
        if pid == self._calibration_pid and not self._calibrated.is_set():
            self.active, self.why_inactive = True, ""
            self._calibrated.set()
            log.info("seccomp kills (compat ABIs) are counted from the kernel's audit records")
            return
        with self._lock:
            container_id = self._sessions.get(session)
            if container_id is None:
                return
            self._counts[container_id] = self._counts.get(container_id, 0) + 1
        self._on_kill(container_id, SyscallAttempt(
            ts=time.time(), container_id=container_id, pid=pid, syscall=compat_name(arch, nr),
            number=nr))
