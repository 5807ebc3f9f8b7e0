"""Syscall telemetry through seccomp user notification (seccomp_unotify(2)). Needs root.

Protocol. The seccomp profile marks the escape-class syscalls `SCMP_ACT_NOTIFY` and the bundle
sets `linux.seccomp.listenerPath` to this listener's socket. When runc 1.1 installs the filter
it gets a notification fd from the kernel, connects to `listenerPath` and sends, in a single
message, the JSON `specs.ContainerProcessState` (`{"ociVersion", "fds": ["seccompFd"], "pid",
"metadata", "state": {"id": <container id>, ...}}`) with the fd attached by SCM_RIGHTS; the
fd's position in `fds` names it. From then on every notified syscall of any process under the
filter blocks in the kernel until this daemon answers it:

- the fd polls readable (POLLIN) while a notification waits, and hangs up (POLLHUP) once no
  task uses the filter any more (every process of the container is gone);
- `SECCOMP_IOCTL_NOTIF_RECV` fills a zeroed `struct seccomp_notif` (id, pid, flags, and
  `struct seccomp_data`: nr, arch, instruction pointer, six args); it blocks when nothing is
  pending, so it is only called after poll(2) reported POLLIN;
- `SECCOMP_IOCTL_NOTIF_SEND` with `struct seccomp_notif_resp {id, val=0, error=-EPERM, flags=0}`
  makes the syscall fail with EPERM; ENOENT means the caller died (or was killed) meanwhile.

Threads. Receiving and answering run on the listener's own thread, never on the event loop, so
a notify storm from an agent cannot queue in front of a kill. Every notification is answered
first and counted after; the thread hands the loop coalesced records (one per container and
syscall, with a count and the latest attempt's details) through a dict the size of the
containers times the notified names, and asks for at most one flush at a time: the hand-over
is bounded whatever the attempt rate. A container's first attempt is handed over alone, ahead
of the coalesced ones, so a tripwire on `syscall_attempts` fires on that very attempt however
long the loop took to flush (one record per container, so still bounded). Subscribers
(tripwires, counters) run on the loop; an exception in one is logged, never raised.

Notify is telemetry, not enforcement. The daemon only ever answers EPERM and never lets a
syscall proceed (no SECCOMP_USER_NOTIF_FLAG_CONTINUE), so the kernel filter stays the
enforcement: if this daemon dies or closes the fd, the kernel fails pending and future notified
syscalls with ENOSYS, still denied. A daemon without a listener renders the same entries as
plain `SCMP_ACT_ERRNO` EPERM (see bundle.py). Never use notify to *allow* anything: the
arguments the daemon would inspect live in the agent's memory and can change under it (TOCTOU).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from supervisor.errors import EnforcementError
from supervisor.sandbox.fdpass import peer_credentials, unix_rights
from supervisor.sandbox.seccomp_kills import SeccompKillReader, audit_session
from supervisor.telemetry import SyscallAttempt

log = logging.getLogger(__name__)

SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100  # _IOWR('!', 0, struct seccomp_notif)
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101  # _IOWR('!', 1, struct seccomp_notif_resp)
# struct seccomp_notif: u64 id, u32 pid, u32 flags, then struct seccomp_data: s32 nr,
# u32 arch, u64 instruction_pointer, u64 args[6].
_NOTIF = struct.Struct("=QIIiIQ6Q")
# struct seccomp_notif_resp: u64 id, s64 val, s32 error, u32 flags.
_RESP = struct.Struct("=QqiI")

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
_X32_SYSCALL_BIT = 0x40000000  # x32 tasks report AUDIT_ARCH_X86_64 with this bit in nr

# Numbers of the notified syscalls (the escape class of sandbox_profiles/seccomp/default.json),
# as libseccomp 2.5 resolves them; tests/unit/test_seccomp_notify.py checks them against it.
_X86_64 = {
    "acct": 163, "add_key": 248, "adjtimex": 159, "bpf": 321, "chroot": 161,
    "clock_settime": 227, "delete_module": 176, "finit_module": 313, "fsconfig": 431,
    "fsmount": 432, "fsopen": 430, "fspick": 433, "init_module": 175, "io_uring_enter": 426,
    "io_uring_register": 427, "io_uring_setup": 425, "ioperm": 173, "iopl": 172,
    "kexec_file_load": 320, "kexec_load": 246, "keyctl": 250, "lookup_dcookie": 212,
    "mount": 165, "mount_setattr": 442, "move_mount": 429, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "open_tree": 428, "perf_event_open": 298, "pivot_root": 155,
    "process_vm_readv": 310, "process_vm_writev": 311, "ptrace": 101, "quotactl": 179,
    "reboot": 169, "request_key": 249, "setns": 308, "settimeofday": 164, "socket": 41,
    "socketpair": 53, "swapoff": 168, "swapon": 167, "syslog": 103, "umount2": 166,
    "unshare": 272, "userfaultfd": 323, "vhangup": 153,
}
# x32 shares the x86_64 numbers except where it has its own compat entry point (512 and up).
_X32 = {**_X86_64, "kexec_load": 528, "process_vm_readv": 539, "process_vm_writev": 540,
        "ptrace": 521}
_I386 = {
    "acct": 51, "add_key": 286, "adjtimex": 124, "bpf": 357, "chroot": 61,
    "clock_settime": 264, "delete_module": 129, "finit_module": 350, "fsconfig": 431,
    "fsmount": 432, "fsopen": 430, "fspick": 433, "init_module": 128, "io_uring_enter": 426,
    "io_uring_register": 427, "io_uring_setup": 425, "ioperm": 101, "iopl": 110,
    "kexec_load": 283, "keyctl": 288, "lookup_dcookie": 253, "mount": 21,
    "mount_setattr": 442, "move_mount": 429, "name_to_handle_at": 341,
    "open_by_handle_at": 342, "open_tree": 428, "perf_event_open": 336, "pivot_root": 217,
    "process_vm_readv": 347, "process_vm_writev": 348, "ptrace": 26, "quotactl": 131,
    "reboot": 88, "request_key": 287, "setns": 346, "settimeofday": 79, "swapoff": 115,
    "swapon": 87, "syslog": 103, "umount": 22, "umount2": 52, "unshare": 310,
    "userfaultfd": 374, "vhangup": 111,
}
_NAMES: dict[tuple[int, int], str] = {
    **{(AUDIT_ARCH_X86_64, nr): name for name, nr in _X86_64.items()},
    **{(AUDIT_ARCH_X86_64, nr | _X32_SYSCALL_BIT): name for name, nr in _X32.items()},
    **{(AUDIT_ARCH_I386, nr): name for name, nr in _I386.items()},
}

_SECCOMP_FD_NAME = "seccompFd"  # specs.SeccompFdName
_MAX_STATE = 1 << 20  # runc's state JSON is a few KiB; anything near this is not runc
_RECV_CHUNK = 1 << 16
_ACCEPT_RETRY = 0.05
_MAX_FDS = 16
_HANDSHAKE_TIMEOUT = 10.0
# Notifications answered per readable fd before the others get a turn: a storm from one agent
# must not starve the other agents' fds.
_BATCH = 64
# Coalesced records waiting for the loop, one per (container, syscall); past this many keys
# (more containers than any host runs) the rest fold into one record, so the hand-over stays
# bounded whatever an agent does.
_MAX_PENDING = 4096
_OVERFLOW = ("unknown", "overflow")
_MIN_KERNEL = (5, 8)
_HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL


def unsupported_reason(release: str | None = None) -> str | None:
    """Why this kernel cannot serve runc's notify fds, or None. runc 1.1 takes the fd from the
    container's init with pidfd_getfd (5.6); the fd hangs up when the last task under the
    filter is gone from 5.8, which is how the listener knows a run's fd can be closed."""
    release = release or os.uname().release
    try:
        major, minor = (int(part) for part in release.split("-")[0].split(".")[:2])
    except ValueError:
        return f"cannot read the kernel version from {release!r}"
    if (major, minor) < _MIN_KERNEL:
        return f"kernel {major}.{minor} is older than {_MIN_KERNEL[0]}.{_MIN_KERNEL[1]}"
    return None


def syscall_name(arch: int, nr: int) -> str:
    """The name of a notified syscall, or "nr N" for one outside the table."""
    return _NAMES.get((arch, nr), f"nr {nr}")


@dataclass
class _Filter:
    """One notification fd: one seccomp filter, shared by every process of a container."""

    fd: int
    container_id: str
    metadata: str
    poller: Any = field(repr=False)  # select.poll, registered for POLLIN
    attempts: int = 0
    broken: bool = False  # receive failed for a reason other than a vanished caller


@dataclass
class _Handshake:
    """A connection from runc, until its state message and fd have arrived."""

    conn: socket.socket
    deadline: float
    data: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)


class AttemptTally:
    """What an observer keeps of attempts: counts per container and syscall, and the most
    recent attempts in a ring. Its size depends on how many containers and notified syscall
    names there are, never on how many attempts an agent makes."""

    def __init__(self, recent: int = 32, containers: int = 256) -> None:
        self.recent: deque[SyscallAttempt] = deque(maxlen=recent)
        self._containers = containers
        self._counts: dict[str, Counter[str]] = {}

    def add(self, attempt: SyscallAttempt) -> None:
        counts = self._counts.get(attempt.container_id)
        if counts is None:
            if len(self._counts) >= self._containers:
                self._counts.pop(next(iter(self._counts)))  # the oldest container
            counts = self._counts[attempt.container_id] = Counter()
        counts[attempt.syscall] += attempt.count
        self.recent.append(attempt)

    def count(self, container_id: str) -> int:
        return sum(self._counts.get(container_id, Counter()).values())

    def by_syscall(self, container_id: str) -> dict[str, int]:
        return dict(self._counts.get(container_id, Counter()))

    def size(self) -> int:
        """Entries held (containers, syscall keys, recent attempts): what memory follows."""
        return (len(self._counts) + sum(len(c) for c in self._counts.values())
                + len(self.recent))


AttemptObserver = Callable[[SyscallAttempt], None]


@dataclass
class AttemptObservers:
    """Who hears of notified syscalls, by name: each is called in the event loop with coalesced
    records (SyscallAttempt.count attempts of one syscall by one container, the most recent
    one's details) and must not block. One that fails is logged and never stops the others;
    the attempts were answered EPERM on the listener's thread before any of them heard."""

    tripwires: AttemptObserver | None = None  # daemon/containment.py: syscall_attempts rules
    metrics: AttemptObserver | None = None  # supervisor/metrics.py, while it serves
    ci: AttemptObserver | None = None  # an embedded CI run's count (supervisor/ci/runner.py)

    def notify(self, record: SyscallAttempt) -> None:
        for name, observer in (("tripwires", self.tripwires), ("metrics", self.metrics),
                               ("ci", self.ci)):
            if observer is None:
                continue
            try:
                observer(record)
            except Exception:
                log.exception("seccomp attempt observer %s (%r) failed", name, observer)


class SeccompListener:
    """The daemon's `listenerPath`: receives each container's notification fd from runc and
    answers every notified syscall with EPERM on a thread of its own, then tells its
    `observers` on the event loop, coalesced."""

    def __init__(self, path: Path, observers: AttemptObservers | None = None) -> None:
        self.path = path
        self.observers = observers if observers is not None else AttemptObservers()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: socket.socket | None = None
        self._wake_read, self._wake_write = -1, -1
        self._stopping = False
        # Shared between the thread and the loop, under the lock: bounded by construction.
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], SyscallAttempt] = {}
        self._firsts: list[SyscallAttempt] = []  # at most one per container with an open fd
        self._flush_scheduled = False
        self._forget: list[tuple[str, threading.Event]] = []
        # Containers a kill is about to end (`hush`), a request at a time.
        self._hush: list[tuple[tuple[str, ...], threading.Event]] = []
        self._counts: dict[str, int] = {}  # per container with an open fd
        self._total = 0
        # The thread's own.
        self._poller: Any = None
        self._handshakes: dict[int, _Handshake] = {}
        self._filters: dict[int, _Filter] = {}
        self._by_container: dict[str, set[int]] = {}
        self._hushed: set[int] = set()  # filters' fds open but no longer polled
        self._accept_paused_until: float | None = None
        # Handover (stop(keep=...)) and adoption (adopt()): container ids whose fds are kept,
        # the kept duplicates, and fds handed over to be served.
        self._keep: set[str] = set()
        self._kept: dict[str, list[int]] = {}
        self._adopting: list[tuple[str, int, int]] = []  # container, fd, init pid
        # Calls the filter kills instead of notifying (compat ABIs), from the kernel's audit
        # records: counted here like notified ones (seccomp_kills.py).
        self.kills = SeccompKillReader(self._killed)

    @property
    def attempts_total(self) -> int:
        with self._lock:
            return self._total

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = _bind(self.path)
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller = select.poll()
        self._poller.register(self._server.fileno(), select.POLLIN)
        self._poller.register(self._wake_read, select.POLLIN)
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="seccomp-notify", daemon=True)
        self._thread.start()
        self.kills.start()
        log.info("seccomp notify listener on %s", self.path)

    async def stop(self, keep: Collection[str] = ()) -> dict[str, list[int]]:
        """Answer what is pending, close every fd, and hand the last counts to the observers.
        The fds of the containers in `keep` (runs handed over to the next daemon) are
        duplicated first and returned, so their filters stay answered by whoever takes them."""
        thread = self._thread
        if thread is None:
            return {}
        self._keep = set(keep)
        await asyncio.to_thread(self.kills.stop)
        self._stopping = True
        self._wake()
        await asyncio.to_thread(thread.join)
        self._thread = None
        for fd in (self._wake_read, self._wake_write):
            _close_quietly(fd)
        self._wake_read, self._wake_write = -1, -1
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._flush()
        self._loop = None
        kept, self._kept = self._kept, {}
        return kept

    def adopt(self, container_id: str, fd: int, init_pid: int) -> None:
        """Serve a notify fd the previous daemon handed over (daemon/handover.py); takes `fd`.
        Served on the listener's thread from its next turn. `init_pid` (the run's init, on
        the host) names the run's audit session, so the calls the kernel kills (compat ABIs)
        count again too."""
        if not _is_notify_fd(fd):
            _close_quietly(fd)
            raise ValueError(f"the fd handed over for {container_id} is not a seccomp "
                             f"notify fd")
        with self._lock:
            self._adopting.append((container_id, fd, init_pid))
        self._wake()

    def forget(self, container_id: str, done: threading.Event | None = None) -> None:
        """Close the container's fds (its run ended), on the listener's thread: what is pending
        is answered first; a process still alive gets ENOSYS from the kernel from then on,
        still denied. Returns at once; `done` is set once the fds are closed."""
        done = done or threading.Event()
        self.kills.unwatch(container_id)
        if self._thread is None:
            done.set()
            return
        with self._lock:
            # One wake while requests wait: a scoped kill forgets a hundred containers, and a
            # wake each had the listener's thread take the GIL from the kill's loop each time.
            wake = not self._forget
            self._forget.append((container_id, done))
        if wake:
            self._wake()

    def hush(self, container_ids: Collection[str], done: threading.Event | None = None
             ) -> None:
        """A kill is about to end these containers' processes: stop polling their fds, which
        stay open until `forget` (after the kill's answer). Each fd hangs up once its filter's
        last process is gone; a scoped halt's hundred hang-ups woke this thread a hundred
        times, to close fds and free filters on the CPU the dying processes needed
        (docs/benchmarks.md run 12). A process killed in a notified call needs no answer.
        Returns at once, one request and one wake for all (a wake each handed the GIL to this
        thread a hundred times in front of the SIGKILL); `done` is set once the thread no
        longer polls them."""
        done = done or threading.Event()
        if self._thread is None:
            done.set()
            return
        with self._lock:
            wake = not self._hush
            self._hush.append((tuple(container_ids), done))
        if wake:
            self._wake()

    def attempts_by_container(self) -> dict[str, int]:
        """Attempts so far per container whose fd is open."""
        with self._lock:
            return dict(self._counts)

    def _killed(self, container_id: str, attempt: SyscallAttempt) -> None:
        """On the kill reader's thread: a call the kernel killed counts as one attempt."""
        self._count(container_id, [attempt])
        self._publish()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_write, b"\0")

    # --- the listener's thread

    def _serve(self) -> None:
        try:
            while not self._stopping:
                for fd, events in self._poller.poll(self._poll_timeout_ms()):
                    self._dispatch(fd, events)
                self._expire_handshakes()
                self._serve_requests()
                self._publish()
        except Exception:
            # A bug here must not leave agents blocked: closing every fd below makes the kernel
            # answer ENOSYS (still denied) to whatever they try next.
            log.exception("seccomp notify listener failed; closing its fds")
        finally:
            self._shut_down()

    def _poll_timeout_ms(self) -> int:
        deadlines = [h.deadline for h in self._handshakes.values()]
        if self._accept_paused_until is not None:
            deadlines.append(self._accept_paused_until)
        if not deadlines:
            return -1
        return max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1)

    def _dispatch(self, fd: int, events: int) -> None:
        if fd == self._wake_read:
            with contextlib.suppress(BlockingIOError, OSError):
                while os.read(self._wake_read, 4096):
                    pass
        elif self._server is not None and fd == self._server.fileno():
            self._accept()
        elif (handshake := self._handshakes.get(fd)) is not None:
            self._receive(handshake)
        elif (flt := self._filters.get(fd)) is not None:
            self._answer_batch(flt)
            if flt.broken or _events(flt) & _HANGUP:
                self._close(flt, drain=False)

    def _serve_requests(self) -> None:
        with self._lock:
            requests, self._forget = self._forget, []
            adopting, self._adopting = self._adopting, []
            hush, self._hush = self._hush, []
        for container_ids, hushed in hush:
            for container_id in container_ids:
                for fd in self._by_container.get(container_id, ()):
                    if fd in self._filters and fd not in self._hushed:
                        with contextlib.suppress(KeyError, ValueError):
                            self._poller.unregister(fd)
                        self._hushed.add(fd)
            hushed.set()
        for container_id, fd, init_pid in adopting:
            self._adopt({"state": {"id": container_id}, "fds": [_SECCOMP_FD_NAME],
                         "pid": init_pid}, [fd])
        for container_id, done in requests:
            for fd in sorted(self._by_container.get(container_id, ())):
                flt = self._filters.get(fd)
                if flt is not None:
                    self._close(flt, drain=True)
            done.set()

    def _shut_down(self) -> None:
        for handshake in list(self._handshakes.values()):
            self._end_handshake(handshake, close_fds=True)
        with self._lock:
            adopting, self._adopting = self._adopting, []
        for _container_id, fd, _init_pid in adopting:
            _close_quietly(fd)
        for flt in list(self._filters.values()):
            if flt.container_id in self._keep and not flt.broken:
                with contextlib.suppress(OSError):
                    self._kept.setdefault(flt.container_id, []).append(os.dup(flt.fd))
            self._close(flt, drain=True)
        if self._server is not None:
            self._server.close()
            self._server = None
        with self._lock:
            requests, self._forget = self._forget, []
            hush, self._hush = self._hush, []
        for _container, done in [*requests, *hush]:
            done.set()
        self._publish()

    # --- runc's connections

    def _accept(self) -> None:
        assert self._server is not None
        while True:
            try:
                conn, _address = self._server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: the connection (and the fd it carries) stays queued, so
                # the agent's notified calls wait; try again shortly rather than spin.
                log.error("seccomp listener cannot accept on %s: %s", self.path, exc.strerror)
                self._poller.unregister(self._server.fileno())
                self._accept_paused_until = time.monotonic() + _ACCEPT_RETRY
                return
            conn.setblocking(False)
            if peer_credentials(conn)[1] != 0:
                log.warning("seccomp listener: refused a connection from a non-root peer")
                conn.close()
                continue
            handshake = _Handshake(conn, time.monotonic() + _HANDSHAKE_TIMEOUT)
            self._handshakes[conn.fileno()] = handshake
            self._poller.register(conn.fileno(), select.POLLIN)

    def _receive(self, handshake: _Handshake) -> None:
        try:
            data, ancdata, flags, _address = handshake.conn.recvmsg(
                _RECV_CHUNK, socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.error("seccomp listener: receiving from runc failed: %s", exc.strerror)
            self._end_handshake(handshake, close_fds=True)
            return
        handshake.fds.extend(unix_rights(ancdata))
        if flags & socket.MSG_CTRUNC:
            log.error("seccomp listener: runc sent more than %d fds; extra ones were lost",
                      _MAX_FDS)
        handshake.data += data
        state: Any = None
        if len(handshake.data) > _MAX_STATE:
            log.error("seccomp listener: state message over %d bytes", _MAX_STATE)
        else:
            try:
                state = json.loads(handshake.data)
            except ValueError:
                if data:
                    return  # a partial message: wait for the rest
        self._end_handshake(handshake, close_fds=False)
        self._adopt(state, handshake.fds)

    def _expire_handshakes(self) -> None:
        now = time.monotonic()
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            if self._server is not None:
                self._poller.register(self._server.fileno(), select.POLLIN)
        for handshake in [h for h in self._handshakes.values() if h.deadline <= now]:
            log.error("seccomp listener: no complete state message from runc within %gs",
                      _HANDSHAKE_TIMEOUT)
            self._end_handshake(handshake, close_fds=False)
            self._adopt(None, handshake.fds)

    def _end_handshake(self, handshake: _Handshake, *, close_fds: bool) -> None:
        fileno = handshake.conn.fileno()
        if fileno >= 0 and self._handshakes.pop(fileno, None) is not None:
            self._poller.unregister(fileno)
        handshake.conn.close()
        if close_fds:
            for fd in handshake.fds:
                _close_quietly(fd)
            handshake.fds.clear()

    def _adopt(self, state: Any, fds: list[int]) -> None:
        """Serve the seccomp fd among `fds` (closing the others); the state names it."""
        container_id, metadata, index, init_pid = "unknown", "", None, 0
        if isinstance(state, dict):
            if isinstance(state.get("pid"), int):
                init_pid = state["pid"]
            names = state.get("fds")
            if isinstance(names, list) and names.count(_SECCOMP_FD_NAME) == 1:
                index = names.index(_SECCOMP_FD_NAME)
            inner = state.get("state")
            if isinstance(inner, dict) and isinstance(inner.get("id"), str):
                container_id = inner["id"]
            if isinstance(state.get("metadata"), str):
                metadata = state["metadata"]
        if index is None and len(fds) == 1:
            index = 0  # a state we cannot read still gets its fd answered, never ignored
        chosen = fds[index] if index is not None and index < len(fds) else None
        for fd in fds:
            if fd != chosen:
                _close_quietly(fd)
        if chosen is None:
            log.error("seccomp listener: no seccomp fd from runc for %s (%d fds)",
                      container_id, len(fds))
            return
        if not _is_notify_fd(chosen):
            log.error("seccomp listener: fd from runc for %s is not a seccomp notify fd",
                      container_id)
            _close_quietly(chosen)
            return
        poller = select.poll()
        poller.register(chosen, select.POLLIN)
        flt = _Filter(chosen, container_id, metadata, poller)
        self._filters[chosen] = flt
        self._by_container.setdefault(container_id, set()).add(chosen)
        with self._lock:
            self._counts.setdefault(container_id, 0)
        self._poller.register(chosen, select.POLLIN)
        # The run's own audit session (runc create starts one): its seccomp kills are its own.
        session = audit_session(init_pid) if init_pid > 0 else None
        if session is not None and session != audit_session():
            self.kills.watch(session, container_id)
        log.debug("seccomp notify fd for %s (%s) adopted", container_id, metadata or "-")

    # --- notifications

    def _answer_batch(self, flt: _Filter) -> None:
        """Answer what is pending (at most one batch), then count it."""
        answered: list[SyscallAttempt] = []
        for _ in range(_BATCH):
            if flt.broken or not _events(flt) & select.POLLIN:
                break
            attempt = self._answer(flt)
            if attempt is not None:
                answered.append(attempt)
        if answered:
            self._count(flt.container_id, answered)

    def _answer(self, flt: _Filter) -> SyscallAttempt | None:
        notif = bytearray(_NOTIF.size)  # the kernel refuses a buffer that is not zeroed
        while True:
            try:
                fcntl.ioctl(flt.fd, SECCOMP_IOCTL_NOTIF_RECV, notif, True)
                break
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return None  # the caller was killed between poll and receive
                # Anything else is a broken fd: closing it makes the kernel answer ENOSYS
                # (still denied) instead of leaving the agent blocked or the thread spinning.
                log.error("seccomp notify receive for %s failed: %s; closing its fd",
                          flt.container_id, exc.strerror)
                flt.broken = True
                return None
        notif_id, pid, _flags, nr, arch, _ip, *args = _NOTIF.unpack(notif)
        response = _RESP.pack(notif_id, 0, -errno.EPERM, 0)
        while True:
            try:
                fcntl.ioctl(flt.fd, SECCOMP_IOCTL_NOTIF_SEND, response)
                break
            except InterruptedError:
                continue
            except OSError as exc:
                # ENOENT: the caller died (killed, e.g. by a tripwire) before the answer; the
                # attempt still happened and is counted.
                if exc.errno != errno.ENOENT:
                    log.error("seccomp notify answer for %s failed: %s", flt.container_id,
                              exc.strerror)
                break
        flt.attempts += 1
        return SyscallAttempt(ts=time.time(), container_id=flt.container_id, pid=pid,
                              syscall=syscall_name(arch, nr), number=nr, args=tuple(args))

    def _count(self, container_id: str, answered: list[SyscallAttempt]) -> None:
        """Fold answered attempts into the pending records: one per (container, syscall),
        carrying the count and the most recent attempt's details."""
        with self._lock:
            self._total += len(answered)
            first = self._counts.get(container_id) == 0
            if container_id in self._counts:
                self._counts[container_id] += len(answered)
            if first and len(self._firsts) < _MAX_PENDING:
                # Not folded into the attempts that follow it, even when the loop is slow to
                # flush: the run's tripwires see a count of exactly one first.
                self._firsts.append(answered[0])
                answered = answered[1:]
            for attempt in answered:
                key = (attempt.container_id, attempt.syscall)
                if key not in self._pending and len(self._pending) >= _MAX_PENDING:
                    key = _OVERFLOW
                    attempt = replace(attempt, container_id=key[0], syscall=key[1])
                held = self._pending.get(key)
                self._pending[key] = (attempt if held is None
                                      else replace(attempt, count=held.count + attempt.count))

    def _publish(self) -> None:
        """Ask the loop for one flush, unless one is already asked for."""
        loop = self._loop
        with self._lock:
            if not (self._pending or self._firsts) or self._flush_scheduled or loop is None:
                return
            self._flush_scheduled = True
        try:
            loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop closed: stop() flushes what is left
            with self._lock:
                self._flush_scheduled = False

    def _flush(self) -> None:
        """On the loop: hand the coalesced records to the observers."""
        with self._lock:
            records = [*self._firsts, *self._pending.values()]
            self._firsts, self._pending = [], {}
            self._flush_scheduled = False
        debug = log.isEnabledFor(logging.DEBUG)
        for record in records:
            if debug:
                log.debug("seccomp notify: %s pid %d %s(%s) answered EPERM x%d",
                          record.container_id, record.pid, record.syscall,
                          ", ".join(hex(a) for a in record.args), record.count)
            self.observers.notify(record)

    def _close(self, flt: _Filter, *, drain: bool) -> None:
        if self._filters.pop(flt.fd, None) is None:
            return
        if drain:
            self._answer_batch(flt)
        fds = self._by_container.get(flt.container_id)
        if fds is not None:
            fds.discard(flt.fd)
            if not fds:
                del self._by_container[flt.container_id]
                with self._lock:
                    self._counts.pop(flt.container_id, None)
        if flt.fd in self._hushed:
            self._hushed.discard(flt.fd)
        else:
            with contextlib.suppress(KeyError, ValueError):
                self._poller.unregister(flt.fd)
        _close_quietly(flt.fd)
        log.log(logging.INFO if flt.attempts else logging.DEBUG,
                "seccomp notify fd for %s closed after %d attempts", flt.container_id,
                flt.attempts)


def _events(flt: _Filter) -> int:
    """The fd's poll(2) events now, without waiting."""
    events = 0
    for _fd, revents in flt.poller.poll(0):
        events |= revents
    return events


def _bind(path: Path) -> socket.socket:
    """A listening socket at `path`, root's only (0600): bound under a temporary name with its
    mode, then renamed into place over any stale one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(tmp))
        finally:
            os.umask(old_umask)
        os.chown(tmp, 0, 0)
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise EnforcementError(
            f"cannot create the seccomp listener socket {path}: {exc.strerror or exc}",
            path=str(path),
        ) from exc
    return sock


def _is_notify_fd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:seccomp notify"
    except OSError:
        return False


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
