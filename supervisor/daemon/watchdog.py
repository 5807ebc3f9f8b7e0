"""The dead-man's switch: a separate process that holds one end of a socketpair (its channel)
from the daemon. When the channel closes without the daemon's "done" message (the daemon was
SIGKILLed or crashed), it SIGKILLs every agent by writing `cgroup.kill` on the agents' parent
cgroup, waits for the kernel to report it empty and records what it did for the next daemon to
audit. Needs root.

It holds the parent cgroup's files open from its start (supervisor.sandbox.cgroups.Cgroup, the
same object the kill path uses), so the kill needs no new descriptor. Standard library only
and small, so it is running before any agent starts and does nothing but wait until then.

`Watchdog` is the daemon's side: it spawns the process, respawns it if it dies, and tells it
to stand down only once no agent process is left under the parent.

The process lives in a cgroup of its own, `<agents' parent>-watchdog`, not in the daemon's (in
the v2 tree and, on a hybrid host, in systemd's name=systemd hierarchy, `TRACKING`): whatever
kills the daemon's whole cgroup (`systemctl kill -s KILL`, a control-group stop, an OOM kill
of the service) leaves the switch standing, so it is the watchdog that kills the agents at once
rather than the next start that reaps them. A new
daemon waits for any previous instance's watchdog to finish (and ends one that does not)
before it looks at what is left, so an old switch never acts on the new daemon's agents."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supervisor.sandbox.cgroups import Cgroup, sigkill, unified_root
from supervisor.sandbox.childenv import child_env
from supervisor.sandbox.fdpass import peer_credentials, recv_fds

if TYPE_CHECKING:  # the watchdog process itself never runs an event loop: not imported there
    import asyncio

DONE = b"done\n"
ADOPTED = b"adopted\n"
FD_CHUNK = 250  # descriptors per message (the kernel's SCM_MAX_FD is 253)
# A handover's record goes in parts of PART_SIZE bytes, each one datagram tagged PART_TAG
# (every other message is a JSON object), then an "end" message: one datagram of a
# SOCK_SEQPACKET socket holds at most its send buffer (~208 KiB by default), which the record
# of a few hundred runs exceeds. RECORD_MAX bounds the whole record on both sides (about 7,000
# runs with the most tripwires a run may carry).
PART_TAG = b"\x00"
PART_SIZE = 1 << 16
RECORD_MAX = 64 << 20
DATAGRAM_MAX = 1 << 18  # a receive buffer: a part, or a whole record as versions before sent
GIVE_TIMEOUT = 10.0  # a new daemon that connects must take everything within this long
# Besides the v2 tree, where a hybrid host's systemd tracks and signals a unit's processes (not
# the v1 controller hierarchies: systemd does not kill by them, and it needs no limit of its own).
TRACKING = ("systemd",)
log = logging.getLogger(__name__)
OOM_SCORE_ADJ_MIN = -1000  # the OOM killer never picks a process at this
CAP_SYS_RESOURCE = 24  # what lowering an oom_score_adj takes
# The command line of a watchdog started before its arguments are known (start_early): they
# come as the channel's first message, a JSON list of strings.
ARGUMENTS_ON_CHANNEL = "--arguments-on-channel"
# The process start_early started and its channel, until the first Watchdog takes them.
_early: tuple[subprocess.Popen[bytes], socket.socket] | None = None


def has_capability(cap: int, status: str | None = None) -> bool:
    """Whether this process holds `cap` in its effective set (`status`: the text of
    /proc/self/status, read when None)."""
    text = status if status is not None else Path("/proc/self/status").read_text()
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def in_initial_user_namespace(uid_map: str | None = None) -> bool:
    """Whether this process is in the host's own user namespace, where its capabilities are
    the host's (elsewhere, as in a rootless or user-namespaced container, they only count
    inside): the whole uid range mapped onto itself."""
    text = uid_map if uid_map is not None else Path("/proc/self/uid_map").read_text()
    return text.split() == ["0", "0", "4294967295"]


def oom_exposure(exc: OSError, *, capable: bool, runs_leave_host_memory: bool
                 ) -> dict[str, Any]:
    """What a failure to put the watchdog out of the OOM killer's reach means, for the log and
    the run report. Expected where the process lacks the host's CAP_SYS_RESOURCE (`capable`
    False: a container, where the write is refused with EACCES) and the runs' memory budget
    leaves the rest of the host memory of its own: the agents cannot bring the OOM killer to
    the watchdog, so it is not news.
    `weakens_containment` otherwise: an unexplained refusal (the capability held, another
    errno), or runs that may fill the memory the watchdog lives in, where the OOM killer could
    take the switch before an agent."""
    expected = exc.errno in (errno.EACCES, errno.EPERM) and not capable
    if not expected:
        why = f"cannot set its oom_score_adj to {OOM_SCORE_ADJ_MIN}: {exc.strerror}"
    else:
        why = (f"its oom_score_adj stays where it was: {OOM_SCORE_ADJ_MIN} needs the host's "
               "CAP_SYS_RESOURCE, which this process lacks (a container)")
        if not runs_leave_host_memory:
            why += (", and the runs' memory budget ([resources] runs_memory_max, "
                    "host_memory_reserve) leaves no memory outside the runs (the host's RAM "
                    "or a limit above the runs' cgroup, a container's): agents that fill it "
                    "can make the OOM killer take the kill switch")
    return {"oom_protected": False, "why": why,
            "weakens_containment": not expected or not runs_leave_host_memory}


def parent_of(path: Path) -> Cgroup:
    """The agents' parent cgroup, given its absolute path on the v2 tree."""
    return Cgroup(path.name, root=path.parent)


def kill_tree(parent: Cgroup, timeout: float) -> dict[str, object]:
    report: dict[str, object] = {"ts": time.time(), "cgroup": str(parent.path)}
    with contextlib.suppress(OSError):
        report["runs"] = sorted(p.name for p in parent.path.iterdir() if p.is_dir())
    if not parent.held and not parent.exists():
        report["note"] = "no agent cgroups"
        return report
    started = time.monotonic()
    try:
        report["mechanism"] = parent.kill()
    except OSError as exc:
        report["kill_error"] = str(exc)
        report["mechanism"] = parent.kill_fallback()
    if parent.kill_error:
        report.setdefault("kill_error", parent.kill_error)
    confirmed = parent.wait_empty(timeout)
    if not confirmed:
        report["escalated"] = parent.kill_fallback()
        confirmed = parent.wait_empty(timeout)
    report["confirmed_empty"] = confirmed
    report["time_to_halt_ms"] = round((time.monotonic() - started) * 1000, 3)
    return report


def _write_record(path: Path, report: dict[str, object], what: str) -> None:
    line = json.dumps(report, sort_keys=True)
    print(f"<2>agent-supervisor watchdog: {what}: {line}", file=sys.stderr, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(line + "\n")


_break_glass: list[int] = []  # SIGUSR1 arrived (the handler appends; a list, no global stmt)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def _send_fds(sock: socket.socket, message: dict[str, object], fds: list[int]) -> None:
    """One message (SOCK_SEQPACKET) per FD_CHUNK descriptors, then `message` in parts of
    PART_SIZE and an "end" message with its size. OSError (EMSGSIZE) before anything is sent
    when `message` is larger than RECORD_MAX."""
    body = json.dumps(message).encode()
    if len(body) > RECORD_MAX:
        raise OSError(errno.EMSGSIZE, f"the handover record is {len(body)} bytes, more than "
                      f"{RECORD_MAX}")
    for start in range(0, len(fds), FD_CHUNK):
        chunk = fds[start:start + FD_CHUNK]
        socket.send_fds(sock, [json.dumps({"kind": "fds", "count": len(chunk)}).encode()],
                        chunk)
    for start in range(0, len(body), PART_SIZE):
        sock.sendmsg([PART_TAG + body[start:start + PART_SIZE]])
    sock.sendmsg([json.dumps({"kind": "end", "size": len(body)}).encode()])


def receive_fds(sock: socket.socket, last_kind: str, within: float | None = None
                ) -> tuple[dict[str, Any], list[int]]:
    """What `_send_fds` sent: the final message (of kind `last_kind`) and every descriptor in
    order, each close-on-exec. OSError or ValueError when the stream ends early or is not of
    that form, TimeoutError (an OSError) when it has not all come `within` seconds; the
    descriptors received so far are closed then."""
    fds: list[int] = []
    body = bytearray()
    deadline = None if within is None else time.monotonic() + within
    try:
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the handover did not all arrive within {within:g} s")
                sock.settimeout(left)
            data, got = recv_fds(sock, DATAGRAM_MAX, FD_CHUNK)
            fds += got
            if not data:
                raise ValueError("the channel closed before the handover was complete")
            if data[:1] == PART_TAG:
                body += data[1:]
                if len(body) > RECORD_MAX:
                    raise ValueError(f"the handover record is larger than {RECORD_MAX} bytes")
                continue
            message = json.loads(data)
            if not isinstance(message, dict):
                raise ValueError("a handover message is not an object")
            if message.get("kind") == "fds":
                if message.get("count") != len(got):
                    raise ValueError("descriptors were lost on the way (MSG_CTRUNC)")
                continue
            if message.get("kind") == "end":
                if message.get("size") != len(body):
                    raise ValueError(f"the handover record has {len(body)} bytes, its end "
                                     f"says {message.get('size')!r}")
                message = json.loads(body)
                if not isinstance(message, dict):
                    raise ValueError("a handover message is not an object")
            # (Else a whole message in one datagram, as versions before 2026-12-02 sent it:
            # the watchdog of a daemon from before an upgrade gives that way.)
            if message.get("kind") != last_kind:
                raise ValueError(f"unexpected handover message {message.get('kind')!r}")
            return message, fds
    except BaseException:
        _close_all(fds)
        raise


def _give(conn: socket.socket, handover: dict[str, Any], fds: list[int]) -> bool:
    """Hand everything to a new daemon on `conn`; True once it said it adopted them."""
    try:
        # The next daemon runs as this watchdog's own user: root in service (a peer of any
        # other uid gets nothing); the unit tier runs both as one unprivileged user.
        _pid, uid = peer_credentials(conn)
        if uid != os.geteuid():
            return False
        conn.settimeout(GIVE_TIMEOUT)
        _send_fds(conn, {"kind": "record", "record": handover}, fds)
        return conn.recv(64) == ADOPTED
    except (OSError, ValueError):
        return False
    finally:
        conn.close()


GIVES_MAX = 4  # gives in flight at once; further peers wait in the listener's backlog


class _Giving:
    """One give on a thread of its own, so that a peer that connects and stalls holds up
    neither the watchdog's checks (break-glass, the window) nor another peer's give. It is
    cut (shutdown) at its deadline, GIVE_TIMEOUT after the accept, and when the watchdog
    ends. The cut goes through a descriptor of its own (`_handle`, a dup of the connection,
    closed only once the thread has ended), so it never reaches a number the thread's close
    may have freed for reuse."""

    def __init__(self, conn: socket.socket, handover: dict[str, Any], fds: list[int],
                 done: int) -> None:
        self._handle = conn.dup()
        self._done = done  # written to when the give ends: the watchdog's loop wakes at once
        self.deadline = time.monotonic() + GIVE_TIMEOUT
        self.adopted = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(conn, handover, fds),
                                       name="give", daemon=True)
        self.thread.start()

    def _run(self, conn: socket.socket, handover: dict[str, Any], fds: list[int]) -> None:
        try:
            self.adopted = _give(conn, handover, fds)  # closes conn
        except BaseException as exc:  # re-raised by the watchdog's loop: it kills then
            self.error = exc
            conn.close()
        finally:
            with contextlib.suppress(OSError):
                os.write(self._done, b"\0")

    def cut(self) -> None:
        with contextlib.suppress(OSError):
            self._handle.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """After the thread has ended."""
        self._handle.close()


def await_adoption(parent: Cgroup, record: Path, timeout: float, handover: dict[str, Any],
                   listener_fd: int, fds: list[int]) -> int:
    """The daemon handed its runs over and exited: hold what it left (output pipes, seccomp
    fds), keep the agents killable (SIGUSR1, the HALT file) and give it all to the next
    daemon that connects, or kill every agent once the window has passed. Break-glass that
    arrives while a give is under way still kills (the new daemon then finds its runs dead),
    and so does any way out of here other than a completed give (fail closed). Gives run on
    threads of their own (at most GIVES_MAX), so these checks run every 0.1 s whatever a
    peer does."""
    listener = socket.socket(fileno=listener_fd)
    trigger: str | None = "the watchdog failed while it held the handed-over runs"
    given = False
    giving: list[_Giving] = []
    done_r, done_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)  # a give ended
    try:
        window = float(handover.get("window", 0))
        deadline = time.monotonic() + window
        halt_file = Path(str(handover.get("halt_file", "/nonexistent/HALT")))
        while True:
            for give in [g for g in giving if not g.thread.is_alive()]:
                giving.remove(give)
                give.close()
                if give.error is not None:
                    raise give.error
                given = given or give.adopted
            now = time.monotonic()
            for give in giving:
                if now >= give.deadline:
                    give.cut()
            if _break_glass:
                trigger = "break-glass: SIGUSR1 to the watchdog while no daemon held the agents"
            elif halt_file.exists():
                trigger = f"break-glass: {halt_file} while no daemon held the agents"
            elif given:
                trigger = None
            elif now >= deadline:
                trigger = (f"no daemon adopted the handed-over runs within [daemon] "
                           f"adopt_window ({window:g} s)")
            else:
                with contextlib.suppress(InterruptedError):
                    wanted: list[Any] = [done_r]
                    if len(giving) < GIVES_MAX:
                        wanted.append(listener)
                    ready, _, _ = select.select(wanted, [], [], 0.1)
                    if done_r in ready:
                        with contextlib.suppress(BlockingIOError):
                            os.read(done_r, 64)
                    if listener in ready:
                        conn, _ = listener.accept()
                        giving.append(_Giving(conn, handover, fds, done_w))
                continue
            return 0
    finally:
        listener.close()
        if trigger is not None:
            report = kill_tree(parent, timeout)
            report["trigger"] = trigger
            runs = handover.get("runs")
            report["handed_over"] = [r.get("run_id") for r in runs if isinstance(r, dict)
                                     ] if isinstance(runs, list) else []
            if not given:
                with contextlib.suppress(OSError):
                    os.unlink(str(handover.get("socket", "")))
            _write_record(record, report, "killed the handed-over agents")
        # No peer keeps a give going once the watchdog ends, and no descriptor of the runs
        # is closed under a give that still sends it.
        for give in giving:
            give.cut()
        for give in giving:
            give.thread.join()
            give.close()
        _close_all(fds)
        _close_all([done_r, done_w])


def _stood_down() -> None:
    """The daemon's "done": leave at once. Nothing is written or held that needs closing
    (records are written only when it kills; its prints are flushed), and the interpreter's
    teardown took ~7 ms that an embedded CI run's teardown, reaping this process, waited for."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(0)


def start_early() -> None:
    """Start the watchdog's interpreter now, before its arguments are known: an embedded CI
    run's runner does it at its entry, so that the interpreter's start and imports (~30 ms of
    CPU) run on the other CPU beside the runner's own imports instead of beside its `runc
    create`. The first Watchdog this process makes takes the process and sends it its
    arguments as the channel's first message (a process that has died by then is replaced by
    a new one). A process that never makes one leaves it waiting; its channel closing with no
    arguments sent, it exits holding nothing: no agent can have started."""
    global _early
    if _early is None:
        _early = _start(command(ARGUMENTS_ON_CHANNEL))


def command(*options: str) -> list[str]:
    """The watchdog's command line. Isolated (-I) when its starter is: a root process that
    imports nothing from the current directory or $PYTHONPATH (an embedded CI run's runner,
    `python -I -m supervisor.ci`, started in the job's checkout, which the agent and the
    checkout's owner can write) starts a root watchdog that does not either; `-m` alone would
    put the current directory first on its path."""
    isolated = ["-I"] if sys.flags.isolated else []
    return [sys.executable, *isolated, "-m", "supervisor.daemon.watchdog", *options]


def _start(args: list[str]) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """The watchdog's process, with its channel's other end as its stdin; the channel."""
    # A socket, not a pipe: a handover passes descriptors over it (SCM_RIGHTS). Its
    # closing is the trigger, as a pipe's was.
    channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        # It runs this same package: where an interpreter finds it (a checkout under test)
        # is the one variable it needs from the daemon, unless the daemon ignores it too
        # (isolated: command()). Made absolute, as the watchdog runs in "/", no directory of
        # its starter's.
        env = child_env()
        if "PYTHONPATH" in os.environ and not sys.flags.isolated:
            env["PYTHONPATH"] = os.pathsep.join(
                os.path.abspath(entry) for entry in os.environ["PYTHONPATH"].split(os.pathsep)
                if entry)
        proc = subprocess.Popen(args, stdin=theirs.fileno(), start_new_session=True,
                                close_fds=True, env=env, cwd="/")
    except BaseException:
        channel.close()
        raise
    finally:
        theirs.close()
    return proc, channel


def _take_early(args: list[str]) -> tuple[subprocess.Popen[bytes], socket.socket] | None:
    """start_early's process, given `args` (None: none was started, or it has died)."""
    global _early
    if _early is None:
        return None
    proc, channel = _early
    _early = None
    try:
        channel.send(json.dumps(args).encode())
    except OSError:  # it has died: reaped, and a new one started in its place
        channel.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        return None
    return proc, channel


def _arguments_on_channel(channel: socket.socket) -> list[str] | None:
    """The arguments of a watchdog started early (start_early); None: its channel closed
    before they came (the process that started it made no Watchdog)."""
    data = channel.recv(DATAGRAM_MAX)
    if not data:
        return None
    args = json.loads(data)
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        raise ValueError("the arguments on the channel are not a list of strings")
    return args


def main(argv: list[str] | None = None) -> int:
    # The daemon's death is the only trigger: stray signals must not take the switch away.
    # Ignored before the mask below is cleared, so one that is pending then is dropped.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    # Break-glass while no daemon holds handed-over agents (ignored while a daemon lives: it
    # has break-glass of its own).
    signal.signal(signal.SIGUSR1, lambda _s, _f: _break_glass.append(1))
    # The daemon blocks SIGUSR1 in every thread for break-glass (and the stop signals while it
    # starts), and a mask survives fork and exec; clear it here, since subprocess cannot set a
    # child's mask without a preexec_fn (Python between fork and exec in a threaded daemon,
    # which can deadlock).
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    channel = socket.socket(fileno=0)  # SOCK_SEQPACKET: one message per send
    if (sys.argv[1:] if argv is None else argv) == [ARGUMENTS_ON_CHANNEL]:
        argv = _arguments_on_channel(channel)  # started early (start_early)
        if argv is None:
            return 0
    import argparse  # only the watchdog's own process parses; its parent needs the class above

    parser = argparse.ArgumentParser(prog="agent-supervisor-watchdog")
    parser.add_argument("--cgroup", required=True, type=Path, help="agents' parent cgroup (v2)")
    parser.add_argument("--record", required=True, type=Path, help="JSON-lines file to append to")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    # Its oom_score_adj is set by its spawner (Watchdog._exclude_from_oom_killer), which knows
    # whether a failure to set it matters and logs it as loudly as it does.
    parent = parent_of(args.cgroup)
    with contextlib.suppress(OSError):  # not there yet: opened when needed
        parent.hold()
    adopting = False
    try:
        while True:
            data = channel.recv(DATAGRAM_MAX, socket.MSG_PEEK)
            if data == DONE:
                _stood_down()
            if not data:
                break
            try:
                handover, fds = receive_fds(channel, "handover")
            except (OSError, ValueError) as exc:
                print(f"<3>agent-supervisor watchdog: a bad handover: {exc}", file=sys.stderr,
                      flush=True)
                break
            listener_fd = fds.pop(0) if fds else -1
            if listener_fd < 0:
                break
            channel.close()
            adopting = True  # it kills on any way out but a completed give
            return await_adoption(parent, args.record, args.timeout, handover, listener_fd,
                                  fds)
    except Exception as exc:  # whatever failed, the agents are killed below
        if adopting:
            raise  # await_adoption has killed them already
        print(f"<3>agent-supervisor watchdog: {exc!r}", file=sys.stderr, flush=True)
    report = kill_tree(parent, args.timeout)
    report["trigger"] = "the daemon's channel closed without an orderly shutdown"
    _write_record(args.record, report, "daemon gone, killed agents")
    return 0


class Watchdog:
    """Spawns the dead-man's-switch process and holds the daemon's end of its channel. If the
    watchdog itself dies, the daemon audits it and spawns a new one at once: agents are never
    left without a switch while the daemon lives. It is never disarmed while an agent process
    is alive under the parent: then the daemon's exit is what makes it kill them."""

    def __init__(self, parent_cgroup: Path, record: Path, timeout: float, *,
                 runs_leave_host_memory: bool = True, settle: bool = True) -> None:
        """`settle=False`: return while the process is still being moved into its cgroup
        (settle() waits for it); the caller does other work meanwhile and settles before any
        agent starts."""
        self.options = ["--cgroup", str(parent_cgroup), "--record", os.path.abspath(record),
                        "--timeout", str(timeout)]
        self.args = command(*self.options)
        self.parent = parent_of(parent_cgroup)
        self.record = record
        self.timeout = timeout
        relative = parent_cgroup.relative_to(unified_root())
        self.cgroup = Cgroup(f"{relative}-watchdog")
        # Why the process could not leave the daemon's cgroup (None: it did).
        self.escape_error: str | None = None
        self.disarmed = False
        self.handed_over = False
        # Told of a death once a new watchdog is running (its exit code), or that none could
        # be started (the exit code and why): then nothing kills the agents if the process
        # that holds this object dies, and it is the caller's to fail closed.
        self.on_death: Callable[[int | None], None] | None = None
        self.on_lost: Callable[[int | None, Exception], None] | None = None
        self.respawned = 0  # watchdogs started in place of one that died
        self._pidfd: int | None = None
        # Whether the runs' memory budget leaves memory outside the runs (budget.py's
        # leaves_host_memory): decides how loudly a watchdog within the OOM killer's reach is
        # logged, and what `oom` says.
        self.runs_leave_host_memory = runs_leave_host_memory
        # Where the watchdog stands with the OOM killer (oom_exposure's form, or protected).
        self.oom: dict[str, Any] = {"oom_protected": True}
        self._placing: threading.Thread | None = None
        self._spawn(settle=settle)

    def _spawn(self, settle: bool = True) -> None:
        # The process start_early started, if there is one (the first Watchdog only).
        self.proc, self.channel = _take_early(self.options) or _start(self.args)
        self._exclude_from_oom_killer()
        # The first move between cgroups in a while waits out an RCU grace period in the
        # kernel (4-16 ms, a sleep): on a thread, so a starting supervisor (an embedded CI run
        # above all) goes on meanwhile; settle() before any agent starts (an embedded CI run:
        # just before its agent's command starts, daemon/core.py `settle_at_start`).
        self._placing = threading.Thread(target=self._place, name="watchdog-place",
                                         daemon=True)
        self._placing.start()
        if settle:
            self.settle()

    def _place(self) -> None:
        try:
            self.cgroup.place(self.proc.pid, TRACKING)
            self.escape_error = None
        except OSError as exc:
            # It still works from the daemon's cgroup, except against a kill of that whole
            # cgroup; then the next start reaps the agents instead (and audits it).
            self.escape_error = str(exc)
            log.critical("the watchdog stays in the daemon's cgroup: %s", exc)

    def settle(self) -> None:
        """Wait until the process has been moved into its cgroup (or failed to be:
        `escape_error`). Idempotent."""
        if self._placing is not None:
            self._placing.join()
            self._placing = None

    async def settled(self) -> None:
        """settle() without holding the event loop while the move goes on."""
        if self._placing is not None and self._placing.is_alive():
            import asyncio  # the daemon's side only: the watchdog process never loads it

            await asyncio.to_thread(self._placing.join)
        self.settle()

    def _exclude_from_oom_killer(self) -> None:
        """The OOM killer must not take the switch. Set from here, on the child (not
        inherited: the watchdog is no ancestor of runc or of any agent), so the refusal is
        known at once and logged as loudly as it matters: at debug where it is expected,
        as a warning where it weakens containment (oom_exposure)."""
        try:
            Path(f"/proc/{self.proc.pid}/oom_score_adj").write_text(str(OOM_SCORE_ADJ_MIN))
        except OSError as exc:
            capable = has_capability(CAP_SYS_RESOURCE) and in_initial_user_namespace()
            self.oom = oom_exposure(exc, capable=capable,
                                    runs_leave_host_memory=self.runs_leave_host_memory)
            log.log(logging.WARNING if self.oom["weakens_containment"] else logging.DEBUG,
                    "the watchdog (pid %d) is within the OOM killer's reach: %s",
                    self.proc.pid, self.oom["why"])
        else:
            self.oom = {"oom_protected": True}

    def cannot_hold(self) -> str | None:
        """Why this watchdog cannot be left holding handed-over runs (None: it can). Outside
        its own cgroup it would die with the daemon's unit (systemd's KillMode=mixed kills
        what is left in the cgroup once the main process has exited), leaving the agents with
        no killer."""
        if self.escape_error is not None:
            return f"the watchdog stayed in the daemon's cgroup: {self.escape_error}"
        if self.proc.pid not in self.cgroup.pids():
            return (f"the watchdog (pid {self.proc.pid}) is not in its cgroup "
                    f"{self.cgroup.path}")
        return None

    def previous(self) -> list[int]:
        """Watchdogs of an earlier daemon with the same agents' parent, still at work. A member
        the kernel shows as pid 0 lives in another pid namespace (another daemon's container
        sharing this cgroup tree): not this host's earlier watchdog, and not one to end."""
        return [pid for pid in self.cgroup.pids() if pid not in (0, self.proc.pid)]

    async def await_previous(self) -> dict[str, object]:
        """Before this daemon looks at what an earlier one left: let that one's watchdog finish
        its kill and its record, then end it if it has not within its own time to do so
        (kill, confirm, escalate, confirm). {} when there was none."""
        import asyncio  # the daemon's side only: the watchdog process never loads it

        found = self.previous()
        if not found:
            return {}
        started = time.monotonic()
        deadline = started + 2 * self.timeout + 2
        while (left := self.previous()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for pid in left:
            sigkill(pid)
        report: dict[str, object] = {"pids": found, "waited_ms": round(
            (time.monotonic() - started) * 1000)}
        if left:
            report["killed"] = left
            log.critical("ended the previous daemon's watchdog(s) %s: still running after "
                         "%.0f s", left, deadline - started)
        return report

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Notice the process's death on `loop` (its pidfd, one more reader of the loop's
        selector: nothing polls) and replace it at once (`_died`)."""
        self._pidfd = os.pidfd_open(self.proc.pid)
        loop.add_reader(self._pidfd, self._died, loop)

    def _died(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._pidfd is not None
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        code = self.proc.wait()
        if self.disarmed:
            return
        self.channel.close()
        # A move into its cgroup still under way (settle_at_start) ends first: its failure for
        # the dead process must not overwrite the new one's escape_error.
        self.settle()
        try:
            self._spawn()
            self.watch(loop)
        except Exception as exc:  # fork or exec refused, descriptors or threads run out
            if self.on_lost is None:
                raise
            self.on_lost(code, exc)
            return
        self.respawned += 1
        if self.on_death is not None:
            self.on_death(code)

    def disarm(self, wait: bool = True) -> bool:
        """Orderly shutdown: tell the watchdog to stand down, if every agent is dead. With an
        agent process still alive under the parent it stays armed (False): the daemon's exit
        then closes the channel without "done", and the watchdog kills what is left. `wait=False`
        tells it without waiting for it to exit (an embedded CI run does its remaining work
        meanwhile); a later disarm() only waits."""
        if not self.disarmed:
            if self.parent.populated():
                log.critical("watchdog stays armed: agent processes are still alive under %s",
                             self.parent.path)
                return False
            self.disarmed = True
            with contextlib.suppress(OSError):
                self.channel.send(DONE)
            self.channel.close()
        if self.handed_over:
            return True  # it holds the handed-over runs until a new daemon takes them
        if wait and self._reap(timeout=5.0):
            self.cgroup.remove(strict=False)  # its own, empty once it has exited
        return True

    def hand_over(self, message: dict[str, Any], listener: socket.socket, fds: list[int]
                  ) -> None:
        """An orderly restart: give the watchdog the handover (`message`), the listening
        socket a new daemon connects to and the runs' descriptors, in that order; from then on
        it holds them, and this daemon's exit no longer makes it kill. OSError if the watchdog
        did not take it all (then the caller kills every run: fail closed)."""
        # Bounded: a watchdog that stops reading fails the handover (and every run is killed).
        self.channel.settimeout(GIVE_TIMEOUT)
        _send_fds(self.channel, {**message, "kind": "handover"}, [listener.fileno(), *fds])
        self.disarmed = True
        self.handed_over = True
        self.channel.close()

    def _reap(self, timeout: float) -> bool:
        """Wait up to `timeout` for the watchdog to exit after "done"; whether it has. Woken
        by its pidfd, not by Popen.wait's sleep-and-poll, whose sleeps (up to 50 ms) would be
        added to every embedded CI run's teardown."""
        if self.proc.returncode is not None:
            return True  # already reaped: its pid may belong to another process by now
        try:
            pidfd = os.pidfd_open(self.proc.pid)
        except OSError:
            pidfd = None
        if pidfd is not None:
            try:
                select.select([pidfd], [], [], timeout)
            finally:
                os.close(pidfd)
        try:
            self.proc.wait(timeout=0)
        except subprocess.TimeoutExpired:
            return False
        return True


if __name__ == "__main__":
    sys.exit(main())
