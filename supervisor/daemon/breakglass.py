"""Break-glass: halt every agent when the control socket, the role config or the daemon's own
event loop is broken. Needs only root on the host, and still audits.

Two triggers, both root-only by construction:
- the HALT file (default <runtime_dir>/HALT, a directory only root can write): create it,
  optionally with a reason inside (`echo "reason" > /run/agent-supervisor/HALT`, or
  `agent-supervisord --halt "reason"`). It is seen at once through inotify (and on a slow
  safety poll, and at startup when it was written while the daemon was down), and renamed to
  HALT.done.<time> once applied (the newest DONE_KEPT of these are kept; the audit log has
  each halt with its reason);
- SIGUSR1 to the daemon (`systemctl kill -s USR1 agent-supervisor`).
Either is a global halt: every agent is killed and new launches are refused until an owner
lifts it with `agentctl reactivate --all --reason ...`.

Neither waits for the event loop. Two threads (HaltSignal's in sigwaitinfo(2), for the
daemon's whole life, and one in poll(2) on an inotify descriptor opened at start) write
`cgroup.kill` on the agents' parent cgroup
through the descriptor the arbiter holds, confirm it empty, and only then hand the halt to the
loop for the audited kill path (which finds the runs dead, finalises and audits them, with
time_to_halt_ms from the trigger). Nothing on that path needs a new descriptor: the HALT
file's directory is held open, and reading the reason borrows a descriptor the thread keeps in
reserve, so a full descriptor table or a stuck loop cannot stop a halt."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import select
import signal
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from supervisor.daemon.arbiter import Arbiter
from supervisor.daemon.watchdog import kill_tree, parent_of
from supervisor.errors import SupervisorError
from supervisor.models import REASON_MAX, ActionRequest, Actor, Scope
from supervisor.sandbox.libc import libc
from supervisor.states import EndCause

log = logging.getLogger(__name__)

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")
_SAFETY_POLL = 5.0
_MAX_FILE = 4096
_LOOP_WAIT = 10.0  # how long a trigger waits for the loop's audited halt before moving on
_RESERVE = 2  # descriptors held to be lent to the reason's read under a full table
# HALT.done.<time>[.rejected] files kept beside the HALT file: one is left per use, and each
# applied halt is in the audit log (break_glass, with its reason), so older ones go.
DONE_KEPT = 20
_libc = libc


def block_halt_signal() -> None:
    """Call first thing in the daemon's main thread, before any other thread exists: every
    thread inherits the mask, so SIGUSR1 reaches only HaltSignal's sigwaitinfo (its default
    action, ending the process, never happens). supervisor/daemon/entry.py does it on the
    daemon's first line."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})


class HaltSignal:
    """SIGUSR1 for the daemon's whole life, on a thread of its own from the first moments of
    its start to its last before the exit: break-glass by signal works at every moment of a
    restart. `block_halt_signal` runs first (supervisor/daemon/entry.py), so the signal is
    never fatal and waits, pending, for this thread's sigwaitinfo(2).

    While break-glass is up (`BreakGlass.start` to `stop`) a signal is its trigger. Before
    (the daemon is starting: reading the config, adopting a handover, reconciling, the
    self-test) and after (it is handing its runs over, or stopping), no audited halt can run,
    so the thread does what the watchdog does: it kills every agent at once through the
    parent's cgroup.kill, then writes the HALT file with why. The HALT file makes it a global
    halt that outlives this process: a watchdog holding handed-over runs kills and records on
    it, and the next break-glass to start (this daemon's, or the next daemon's) applies and
    audits it. `close`, last thing before the exit, takes a signal that came after the
    thread's last wait."""

    def __init__(self, halt_file: Path, parent: Path, confirm_timeout: float) -> None:
        self.halt_file = halt_file
        self.parent = parent
        self.confirm_timeout = confirm_timeout
        self._handler: Callable[[float], None] | None = None
        self._lock = threading.Lock()
        self._acting = threading.Lock()  # held while a signal is acted on
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="halt-signal", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("break-glass by SIGUSR1 armed (pid %d)", os.getpid())

    def attach(self, handler: Callable[[float], None]) -> None:
        with self._lock:
            self._handler = handler

    def detach(self) -> None:
        with self._lock:
            self._handler = None

    def close(self) -> None:
        """Last thing before the exit: what a signal started is finished, and one still
        pending is acted on here (the thread is not waited for: it blocks until a signal, and
        one it takes from now on is acted on as unattended)."""
        self._stop.set()
        self.detach()
        with self._acting:
            pass
        while signal.sigtimedwait({signal.SIGUSR1}, 0) is not None:
            self._dispatch(time.perf_counter())

    def stop_waiting(self) -> None:
        """End the thread's wait (it would otherwise wait for the exit): a signal to this
        thread alone, which `_run` tells from an operator's by its sender (this process)."""
        self._stop.set()
        if self._thread.ident is not None and self._thread.is_alive():
            signal.pthread_kill(self._thread.ident, signal.SIGUSR1)
            self._thread.join()

    def _run(self) -> None:
        # sigwaitinfo(2), not sigtimedwait with a poll: CPython's sigtimedwait, interrupted
        # (EINTR: the daemon stopped by SIGSTOP and continued) once its timeout has passed,
        # returns a siginfo for no signal at all, and a stopped-and-continued daemon halted
        # every agent. sigwaitinfo retries on EINTR and returns only a signal taken.
        while True:
            info = signal.sigwaitinfo({signal.SIGUSR1})
            if self._stop.is_set() and info.si_pid == os.getpid():
                return  # stop_waiting's own (an operator's kill comes from another pid)
            self._dispatch(time.perf_counter())

    def _dispatch(self, arrived: float) -> None:
        with self._acting:
            with self._lock:
                handler = self._handler
            if handler is not None:
                handler(arrived)
            else:
                self.unattended()

    def unattended(self) -> dict[str, object]:
        """No break-glass is up: kill in the kernel, then leave the HALT file."""
        log.critical("BREAK-GLASS: SIGUSR1 while no break-glass thread is up (the daemon is "
                     "starting or stopping): killing every agent through %s", self.parent)
        report = kill_tree(parent_of(self.parent), self.confirm_timeout)
        reason = (f"SIGUSR1 to the daemon (pid {os.getpid()}) while it was starting or "
                  f"stopping; every agent was killed through cgroup.kill "
                  f"(confirmed empty: {report.get('confirmed_empty', 'no agents')})")
        try:
            write_halt_file(self.halt_file, reason)
        except OSError as exc:
            log.critical("break-glass: cannot write %s (%s): the agents are dead, but no "
                         "global halt holds", self.halt_file, exc)
        log.critical("BREAK-GLASS applied in the kernel: %s; %s left for the audited halt",
                     report, self.halt_file)
        return report


@dataclass
class Trigger:
    trigger: str
    reason: str
    actor: Actor
    arrived: float  # perf_counter() when the trigger was read: time_to_halt_ms starts here


class BreakGlass:
    def __init__(self, arbiter: Arbiter, halt_file: Path,
                 signals: HaltSignal | None = None) -> None:
        self.arbiter = arbiter
        self.halt_file = halt_file
        # The daemon's SIGUSR1 thread, for its whole life; None (an embedding caller): a
        # thread of break-glass's own, or the loop, takes the signal while it is up.
        self.signals = signals
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dir_fd: int | None = None
        self._inotify: int | None = None
        self._wake: int | None = None  # an eventfd: `stop` ends the file thread's poll with it
        self._reserve: list[int] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._kill_lock = threading.Lock()
        # The threads use the directory and reserve descriptors that `stop` closes; a thread
        # still waiting for the loop when `stop` gives up joining it finds them gone, not
        # reused under another number.
        self._fd_lock = threading.Lock()
        self._busy = asyncio.Lock()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.halt_file.parent.mkdir(parents=True, exist_ok=True)
        self._dir_fd = os.open(self.halt_file.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._reserve = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
                         for _ in range(_RESERVE)]
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        fd = _libc.inotify_init1(IN_CLOEXEC)
        if fd < 0:
            log.error("inotify unavailable (%s): the HALT file is polled every %gs",
                      os.strerror(ctypes.get_errno()), _SAFETY_POLL)
        elif _libc.inotify_add_watch(fd, str(self.halt_file.parent).encode(),
                                     IN_CLOSE_WRITE | IN_MOVED_TO) < 0:
            log.error("cannot watch %s: %s", self.halt_file.parent,
                      os.strerror(ctypes.get_errno()))
            os.close(fd)
        else:
            self._inotify = fd
        # Written while the daemon was down: applied before the first launch can happen.
        if (found := self._read_file()) is not None:
            await self.halt(found)
            self._rename(f"{self.halt_file.name}.done.{int(time.time())}")
        self._threads = [threading.Thread(target=self._watch_file, name="break-glass-file",
                                          daemon=True)]
        if self.signals is not None:
            self.signals.attach(self._on_signal)
        elif signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, []):
            self._threads.append(threading.Thread(target=self._watch_signal,
                                                  name="break-glass-signal", daemon=True))
        else:  # not blocked process-wide (an embedding caller): the loop takes the signal
            log.warning("SIGUSR1 is not blocked in every thread; break-glass by signal waits "
                        "for the event loop")
            self._loop.add_signal_handler(signal.SIGUSR1, self._on_loop_signal)
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        if self.signals is not None:
            self.signals.detach()  # from now on a SIGUSR1 kills in the kernel (HaltSignal)
        self._stop.set()
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_signal_handler(signal.SIGUSR1)
        for thread in self._threads:
            if thread.name == "break-glass-signal" and thread.ident and thread.is_alive():
                signal.pthread_kill(thread.ident, signal.SIGUSR1)  # its sigwait sees the stop
        if self._wake is not None:  # the file thread's poll sees the stop (not its safety poll)
            with contextlib.suppress(OSError):
                os.eventfd_write(self._wake, 1)
        for thread in self._threads:
            thread.join(timeout=_SAFETY_POLL + 1)
        with self._fd_lock:
            for fd in [self._inotify, self._wake, self._dir_fd, *self._reserve]:
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._inotify = self._wake = self._dir_fd = None
            self._reserve = []

    # ------------------------------------------------------------------ the threads

    def _on_signal(self, arrived: float) -> None:
        """On HaltSignal's thread."""
        self._fire(Trigger("signal", "break-glass: SIGUSR1 to the daemon",
                           Actor(kind="user", uid=0, name="break-glass"), arrived))

    def _watch_signal(self) -> None:
        while not self._stop.is_set():
            signal.sigwait({signal.SIGUSR1})
            if self._stop.is_set():
                return
            self._fire(Trigger("signal", "break-glass: SIGUSR1 to the daemon",
                               Actor(kind="user", uid=0, name="break-glass"),
                               time.perf_counter()))

    def _watch_file(self) -> None:
        poller = select.poll()  # no descriptor of its own
        if self._inotify is not None:
            poller.register(self._inotify, select.POLLIN)
        if self._wake is not None:
            poller.register(self._wake, select.POLLIN)
        wanted = self.halt_file.name.encode()
        while not self._stop.is_set():
            events = poller.poll(_SAFETY_POLL * 1000)
            if self._stop.is_set():
                return
            hit = not events  # the safety poll looks every time it wakes without news
            if events and self._inotify is not None:
                with contextlib.suppress(BlockingIOError, OSError):
                    hit = wanted in _names(os.read(self._inotify, 65536))
            if hit and (found := self._read_file()) is not None:
                self._fire(found)

    def _read_file(self) -> Trigger | None:
        """The HALT file, if it is there and trustworthy (a root-owned regular file); a file
        that is not is renamed aside and ignored. Opens nothing but a borrowed reserve fd."""
        name = self.halt_file.name
        with self._fd_lock:
            if self._dir_fd is None:  # stopped
                return None
            try:
                st = os.lstat(name, dir_fd=self._dir_fd)
            except FileNotFoundError:
                return None
        arrived = time.perf_counter()
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
            log.critical("ignoring %s: not a regular file owned by root", self.halt_file)
            self._rename(f"{name}.done.{int(time.time())}.rejected")
            return None
        text = self._read_reason()
        reason = f"break-glass: {text}" if text else "break-glass: HALT file"
        return Trigger(f"file {self.halt_file}", reason[:REASON_MAX],
                       Actor(kind="user", uid=st.st_uid, name="break-glass"), arrived)

    def _read_reason(self) -> str:
        with self._fd_lock:
            if self._dir_fd is None:  # stopped
                return ""
            return self._read_reason_locked(self._dir_fd)

    def _read_reason_locked(self, dir_fd: int) -> str:
        lent = self._reserve.pop() if self._reserve else None
        if lent is not None:
            os.close(lent)  # its number is what the open below most likely gets
        try:
            fd = os.open(self.halt_file.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            log.critical("cannot read the HALT file's reason (%s); halting without it", exc)
            return ""
        finally:
            with contextlib.suppress(OSError):
                if lent is not None:
                    self._reserve.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        try:
            return os.read(fd, _MAX_FILE).decode("utf-8", errors="replace").strip()
        finally:
            os.close(fd)

    def _rename(self, to: str) -> None:
        with self._fd_lock:
            if self._dir_fd is None:
                # Stopped while this thread waited for the loop: the file stays, and the next
                # start applies it again (a halt is idempotent).
                log.critical("break-glass: stopped before %s could be renamed aside",
                             self.halt_file)
                return
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.halt_file.name, to, src_dir_fd=self._dir_fd,
                          dst_dir_fd=self._dir_fd)
            # After the kill and the rename: listing needs a descriptor, and a full table
            # only leaves more of these behind until the next use.
            with contextlib.suppress(OSError):
                prune_done(self._dir_fd, self.halt_file.name)

    def _fire(self, trigger: Trigger) -> None:
        """In a break-glass thread: kill in the kernel first, then the audited halt."""
        log.critical("BREAK-GLASS global halt (%s): %s", trigger.trigger, trigger.reason)
        # Launches are refused from now on, whatever the loop is doing.
        self.arbiter.global_halt = True
        kernel = self._kill_parent()
        assert self._loop is not None
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def hand_over() -> None:
            task = asyncio.ensure_future(self.halt(trigger, kernel))
            self.arbiter.track(task)
            task.add_done_callback(lambda _t: done.set_result(None))

        try:
            self._loop.call_soon_threadsafe(hand_over)
            done.result(timeout=_LOOP_WAIT)
        except (concurrent.futures.TimeoutError, RuntimeError):
            log.critical("break-glass: the event loop has not audited the halt within %gs; "
                         "the agents are dead (%s), the audit follows when it runs",
                         _LOOP_WAIT, kernel)
        if trigger.trigger.startswith("file"):
            self._rename(f"{self.halt_file.name}.done.{int(time.time())}")

    def _kill_parent(self) -> dict[str, object]:
        parent = self.arbiter.parent
        if parent is None:
            return {"mechanism": "none: no parent cgroup held; the loop kills run by run"}
        started = time.perf_counter()
        with self._kill_lock:
            if parent.stale():
                # Removed and made again since it was held: its files would kill nothing and
                # read empty at once. Held anew (this needs descriptors; with none left, the
                # kill below opens nothing either and the loop kills run by run).
                log.error("break-glass: the held parent cgroup was removed since; holding it "
                          "again")
                parent.release()
                with contextlib.suppress(OSError):
                    parent.hold()
            try:
                mechanism = parent.kill()
            except OSError as exc:
                mechanism = f"{parent.kill_fallback()} (cgroup.kill: {exc})"
            try:
                confirmed = parent.wait_empty(self.arbiter.config.kill.confirm_timeout)
            except OSError:
                confirmed = False
            if not confirmed:
                mechanism += f", then {parent.kill_fallback()}"
                with contextlib.suppress(OSError):
                    confirmed = parent.wait_empty(self.arbiter.config.kill.confirm_timeout)
        return {"mechanism": mechanism, "confirmed_empty": confirmed,
                "kernel_kill_ms": round((time.perf_counter() - started) * 1000, 3)}

    # ------------------------------------------------------------------ in the loop

    def _on_loop_signal(self) -> None:
        trigger = Trigger("signal", "break-glass: SIGUSR1 to the daemon",
                          Actor(kind="user", uid=0, name="break-glass"), time.perf_counter())
        self.arbiter.track(asyncio.ensure_future(self.halt(trigger)))

    async def halt(self, trigger: Trigger, kernel: dict[str, object] | None = None) -> None:
        async with self._busy:
            self.arbiter.audit.append(
                actor=trigger.actor.label(), verb="break_glass", scope="global",
                reason=trigger.reason,
                detail={"trigger": trigger.trigger, **({"kernel": kernel} if kernel else {})})
            try:
                await self.arbiter.act("kill", ActionRequest(scope=Scope(all=True),
                                                             reason=trigger.reason),
                                       trigger.actor, cause=EndCause.BREAK_GLASS,
                                       arrived=trigger.arrived)
            except SupervisorError as exc:
                log.critical("break-glass halt incomplete: %s: %s", exc.code, exc.message)


def _names(data: bytes) -> list[bytes]:
    names, offset = [], 0
    while offset + _EVENT.size <= len(data):
        _wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
        names.append(data[offset + _EVENT.size: offset + _EVENT.size + length].rstrip(b"\0"))
        offset += _EVENT.size + length
    return names


def prune_done(dir_fd: int, halt_name: str, keep: int = DONE_KEPT) -> list[str]:
    """Remove all but the newest `keep` of `<halt_name>.done.<time>[.rejected]` in the
    directory `dir_fd`; the names removed."""
    prefix = f"{halt_name}.done."
    done: list[tuple[int, str]] = []
    for name in os.listdir(dir_fd):
        stamp = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
        if stamp.isdigit():
            done.append((int(stamp), name))
    removed = [name for _stamp, name in sorted(done)[:max(0, len(done) - keep)]]
    for name in removed:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
    return removed


def write_halt_file(halt_file: Path, reason: str) -> None:
    """The HALT file, atomically (a whole file or none), mode 0600."""
    halt_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = halt_file.with_name(f".{halt_file.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(reason[:REASON_MAX] + "\n")
    os.chmod(tmp, 0o600)
    os.rename(tmp, halt_file)


def request_halt(halt_file: Path, reason: str, wait: float = 10.0) -> bool:
    """Write the HALT file atomically (root); True once a running daemon has consumed it."""
    write_halt_file(halt_file, reason)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not halt_file.exists():
            return True
        time.sleep(0.05)
    return False
