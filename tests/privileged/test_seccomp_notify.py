"""Seccomp user notification against the real kernel: the listener (seccomp_notify.py) fed by a
process that installs a notify filter with libseccomp, and a real daemon whose runc hands it
each run's fd. Every attempt is answered EPERM and counted; no agent ever hangs, not even when
the listener dies (the kernel then answers ENOSYS). Needs root."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from supervisor.sandbox.seccomp_notify import AttemptObservers, SeccompListener
from supervisor.telemetry import SyscallAttempt
from tests.support.daemon import REPO, Daemon, new_daemon, running_daemon, wait_for

EPERM, ENOSYS = 1, 38
CLONE_NEWUSER = 0x10000000

# Installs a filter that notifies unshare and keyctl (libseccomp, as runc does), sends the fd to
# the listener at argv[1] the way runc 1.1 does, keeps no copy, then runs argv[3].
NOTIFIED_CHILD = r"""
import ctypes, ctypes.util, json, os, signal, socket, sys, threading, time
path, container_id, mode = sys.argv[1], sys.argv[2], sys.argv[3]
seccomp = ctypes.CDLL(ctypes.util.find_library("seccomp"))
seccomp.seccomp_init.restype = ctypes.c_void_p
seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
seccomp.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
seccomp.seccomp_notify_fd.argtypes = [ctypes.c_void_p]
ctx = seccomp.seccomp_init(0x7FFF0000)  # SCMP_ACT_ALLOW
for nr in (272, 250):  # unshare, keyctl
    assert seccomp.seccomp_rule_add(ctx, 0x7FC00000, nr, 0) == 0  # SCMP_ACT_NOTIFY
assert seccomp.seccomp_load(ctx) == 0
fd = seccomp.seccomp_notify_fd(ctx)
assert fd >= 0
state = {"ociVersion": "1.0.2-dev", "fds": ["seccompFd"], "pid": os.getpid(),
         "metadata": "run-" + container_id,
         "state": {"ociVersion": "1.0.2-dev", "id": container_id, "status": "creating",
                   "pid": os.getpid(), "bundle": "/nonexistent"}}
with socket.socket(socket.AF_UNIX) as sock:
    sock.connect(path)
    message = b"not json" if container_id == "garbled" else json.dumps(state).encode()
    socket.send_fds(sock, [message], [fd])
os.close(fd)
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    ctypes.set_errno(0)
    return ctypes.get_errno() if libc.syscall(nr, *args) == -1 else 0
def unshare():
    return call(272, ctypes.c_ulong(0x10000000))
def say(*words):
    print(*words, flush=True)
if mode == "storm":
    results = {"unshare": [unshare() for _ in range(200)],
               "keyctl": [call(250, 0, 0, 0, 0) for _ in range(200)]}
    say(json.dumps(results))
elif mode == "forgotten":
    say(unshare())
    sys.stdin.readline()
    say(unshare())
elif mode == "killed-waiting":
    say(unshare())
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGKILL)).start()
    say("second")
    unshare()
    say("not reached")
elif mode == "until-enosys":
    seen = 0
    for _ in range(10**6):
        result = unshare()
        say(result)
        seen += result == 38
        if seen == 50:
            break
        time.sleep(0.001)
"""

LISTENER_PROCESS = r"""
import asyncio, sys
from pathlib import Path
from supervisor.sandbox.seccomp_notify import SeccompListener
async def main():
    listener = SeccompListener(Path(sys.argv[1]))
    await listener.start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

# Inside a sandbox: N rounds of the escape-class calls the isolation probe makes, each errno.
STORM = r"""
import ctypes, json, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
def call(fn, *args):
    ctypes.set_errno(0)
    return ctypes.get_errno() if fn(*args) == -1 else 0
calls = {
    "unshare": lambda: call(libc.unshare, 0x10000000),
    "mount": lambda: call(libc.mount, b"none", b"/tmp", b"tmpfs", 0, None),
    "bpf": lambda: call(libc.syscall, 321, 0, None, 0),
    "ptrace": lambda: call(libc.ptrace, 16, os.getppid() or 1, None, None),
    "keyctl": lambda: call(libc.syscall, 250, 0, 0, 0, 0),
}
started = time.monotonic()
results = {name: [] for name in calls}
for _ in range(int(sys.argv[1])):
    for name, fn in calls.items():
        results[name].append(fn())
print(json.dumps({"errnos": results, "seconds": time.monotonic() - started}))
"""

LOOP_UNSHARE = r"""
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
while True:
    ctypes.set_errno(0)
    result = ctypes.get_errno() if libc.unshare(0x10000000) == -1 else 0
    print(result, flush=True)
    time.sleep(0.001)
"""

_ATTEMPT_LINE = re.compile(r"seccomp notify: (\S+) pid \d+ (\w+)\(.*\) answered EPERM x(\d+)")


def _total(records: list[SyscallAttempt]) -> int:
    return sum(r.count for r in records)


def _by_syscall(records: list[SyscallAttempt]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for record in records:
        counts[record.syscall] += record.count
    return counts


def _child(socket_path: Path, container_id: str, mode: str) -> list[str]:
    return [sys.executable, "-c", NOTIFIED_CHILD, str(socket_path), container_id, mode]


def _socket_path(tmp_root: Path) -> Path:
    return tmp_root / "run" / "seccomp.sock"


async def _counted_once(listener: SeccompListener, tmp_root: Path, container_id: str
                        ) -> tuple[asyncio.subprocess.Process, int]:
    """A `forgotten` child (its stdin and stdout piped) whose first call was answered: the
    process and that answer, once the listener has counted the call (or after 5 s)."""
    proc = await asyncio.create_subprocess_exec(
        *_child(_socket_path(tmp_root), container_id, "forgotten"),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    first = int(await asyncio.wait_for(proc.stdout.readline(), 30))
    for _ in range(500):
        if listener.attempts_by_container() == {container_id: 1}:
            break
        await asyncio.sleep(0.01)
    return proc, first


def test_every_attempt_is_answered_eperm_then_recorded(tmp_root: Path) -> None:
    recorded: list[SyscallAttempt] = []

    def broken(attempt: SyscallAttempt) -> None:
        raise RuntimeError("an observer's bug must not leave a syscall unanswered")

    async def scenario() -> tuple[dict[str, list[int]], int, dict[str, int]]:
        # The first observer fails on every record; the next still hears each one.
        listener = SeccompListener(_socket_path(tmp_root),
                                   AttemptObservers(tripwires=broken, metrics=recorded.append))
        await listener.start()
        try:
            assert _socket_path(tmp_root).stat().st_mode & 0o777 == 0o600
            proc = await asyncio.create_subprocess_exec(
                *_child(_socket_path(tmp_root), "as-storm", "storm"),
                stdout=asyncio.subprocess.PIPE)
            stdout, _ = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0
            # Every process under the filter is gone: the kernel hangs the fd up; the last
            # coalesced records reach the loop.
            for _ in range(500):
                if not listener.attempts_by_container() and _total(recorded) == 400:
                    break
                await asyncio.sleep(0.01)
            return json.loads(stdout), proc.pid, listener.attempts_by_container()
        finally:
            await listener.stop()

    results, pid, open_fds = asyncio.run(scenario())
    assert results == {"unshare": [EPERM] * 200, "keyctl": [EPERM] * 200}
    assert _by_syscall(recorded) == {"unshare": 200, "keyctl": 200}
    # Coalesced: the loop got records, not one call per attempt (at most one per batch).
    assert len(recorded) <= 400
    assert {a.container_id for a in recorded} == {"as-storm"}
    assert {a.pid for a in recorded} == {pid}
    assert {a.number for a in recorded} == {272, 250}
    assert all(a.args[0] == CLONE_NEWUSER for a in recorded if a.syscall == "unshare")
    assert open_fds == {}
    assert not _socket_path(tmp_root).exists()


def test_forget_makes_the_kernel_answer_enosys(tmp_root: Path) -> None:
    async def scenario() -> list[int]:
        listener = SeccompListener(_socket_path(tmp_root))
        await listener.start()
        try:
            proc, first = await _counted_once(listener, tmp_root, "as-forget")
            assert proc.stdin is not None and proc.stdout is not None
            assert listener.attempts_by_container() == {"as-forget": 1}
            closed = threading.Event()
            listener.forget("as-forget", closed)  # returns at once: the thread closes the fd
            assert await asyncio.to_thread(closed.wait, 30)
            assert listener.attempts_by_container() == {}
            proc.stdin.write(b"go\n")
            second = int(await asyncio.wait_for(proc.stdout.readline(), 30))
            await asyncio.wait_for(proc.wait(), 30)
            return [first, second]
        finally:
            await listener.stop()

    # Still denied without the listener: ENOSYS from the kernel, at once.
    assert asyncio.run(scenario()) == [EPERM, ENOSYS]


def test_a_hushed_containers_fds_wake_nothing_until_forgotten(tmp_root: Path) -> None:
    """A kill hushes the container's fds before its SIGKILL: a call notified meanwhile waits
    unanswered, and the process killed in it needs no answer (it dies); the fd's hang-up once
    the filter has no process left wakes nothing (the fd stays open, its count kept) until
    `forget`."""
    async def scenario() -> tuple[int, bool, int | None, bytes, dict[str, int],
                                  dict[str, int]]:
        listener = SeccompListener(_socket_path(tmp_root))
        await listener.start()
        try:
            proc, first = await _counted_once(listener, tmp_root, "as-hush")
            assert proc.stdin is not None and proc.stdout is not None
            hushed = threading.Event()
            listener.hush(["as-hush"], hushed)
            assert await asyncio.to_thread(hushed.wait, 30)
            proc.stdin.write(b"go\n")  # its second call: notified, and nobody answers
            await asyncio.sleep(0.5)
            waiting = proc.returncode is None and not proc.stdout.at_eof()
            proc.send_signal(signal.SIGKILL)
            code = await asyncio.wait_for(proc.wait(), 30)
            rest = await proc.stdout.read()
            await asyncio.sleep(0.5)  # a polled hang-up would have closed the fd by now
            while_hushed = listener.attempts_by_container()
            closed = threading.Event()
            listener.forget("as-hush", closed)
            assert await asyncio.to_thread(closed.wait, 30)
            return first, waiting, code, rest, while_hushed, listener.attempts_by_container()
        finally:
            await listener.stop()

    first, waiting, code, rest, while_hushed, after = asyncio.run(scenario())
    assert (first, waiting, code, rest) == (EPERM, True, -signal.SIGKILL, b"")
    assert while_hushed == {"as-hush": 1}, "the hang-up closed the fd while hushed"
    assert after == {}


def test_answers_never_wait_for_the_event_loop(
        tmp_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="supervisor.sandbox.seccomp_notify")

    async def scenario() -> tuple[int, dict[str, list[int]]]:
        child: subprocess.Popen[str] | None = None
        held = threading.Event()

        def hold_the_loop(attempt: SyscallAttempt) -> None:
            # Block the event loop (as a slow subscriber would) from the first record until the
            # child has had its second call answered anyway, by the listener's thread, and has
            # been SIGKILLed: the loop's load never holds an agent's syscall, nor the reverse.
            if (attempt.container_id != "as-killed" or child is None or child.stdout is None
                    or held.is_set()):
                return
            held.set()
            lines = [child.stdout.readline().strip() for _ in range(3)]
            assert lines == [str(EPERM), "second", "not reached"], lines
            child.wait(10)

        listener = SeccompListener(_socket_path(tmp_root),
                                   AttemptObservers(tripwires=hold_the_loop))
        await listener.start()
        loop = asyncio.get_running_loop()
        try:
            child = subprocess.Popen(_child(_socket_path(tmp_root), "as-killed",
                                            "killed-waiting"), stdout=subprocess.PIPE, text=True)
            code = await asyncio.wait_for(loop.run_in_executor(None, child.wait), 30)
            assert child.stdout is not None
            child.stdout.close()
            # The next one is served as if nothing happened.
            proc = await asyncio.create_subprocess_exec(
                *_child(_socket_path(tmp_root), "as-after", "storm"),
                stdout=asyncio.subprocess.PIPE)
            stdout, _ = await asyncio.wait_for(proc.communicate(), 30)
            assert held.is_set(), "the loop was never held"
            return code, json.loads(stdout)
        finally:
            await listener.stop()

    code, results = asyncio.run(scenario())
    assert code == -signal.SIGKILL
    assert results == {"unshare": [EPERM] * 200, "keyctl": [EPERM] * 200}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


def test_odd_connections_are_dropped_and_an_unreadable_state_still_gets_answers(
        tmp_root: Path) -> None:
    recorded: list[SyscallAttempt] = []

    async def scenario() -> dict[str, list[int]]:
        listener = SeccompListener(_socket_path(tmp_root),
                                   AttemptObservers(tripwires=recorded.append))
        await listener.start()
        try:
            loop = asyncio.get_running_loop()
            for payload in (b"", b"{\"fds\": [\"seccompFd\"]}", b"[1, 2"):
                with socket.socket(socket.AF_UNIX) as peer:
                    peer.setblocking(False)
                    await loop.sock_connect(peer, str(_socket_path(tmp_root)))
                    if payload:
                        await loop.sock_sendall(peer, payload)
            proc = await asyncio.create_subprocess_exec(
                *_child(_socket_path(tmp_root), "garbled", "storm"),
                stdout=asyncio.subprocess.PIPE)
            stdout, _ = await asyncio.wait_for(proc.communicate(), 30)
            return dict(json.loads(stdout))
        finally:
            await listener.stop()  # hands the last coalesced records over

    results = asyncio.run(scenario())
    assert results == {"unshare": [EPERM] * 200, "keyctl": [EPERM] * 200}
    assert _total(recorded) == 400 and {a.container_id for a in recorded} == {"unknown"}


def test_the_kernel_answers_enosys_when_the_listener_process_dies(tmp_root: Path) -> None:
    socket_path = _socket_path(tmp_root)
    listener = subprocess.Popen([sys.executable, "-c", LISTENER_PROCESS, str(socket_path)],
                                stdout=subprocess.PIPE, text=True, cwd=REPO)
    child = None
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "ready"
        child = subprocess.Popen(_child(socket_path, "as-orphan", "until-enosys"),
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        before = [child.stdout.readline().strip() for _ in range(50)]
        assert before == [str(EPERM)] * 50
        listener.kill()
        # The child finishes by itself: nothing is left waiting for an answer.
        rest, _ = child.communicate(timeout=30)
        assert child.returncode == 0
        after = [int(line) for line in rest.split()]
        assert set(after) <= {EPERM, ENOSYS}
        assert after.count(ENOSYS) == 50 and after[-1] == ENOSYS
    finally:
        for proc in (listener, child):
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()


def _attempts_in_log(daemon: Daemon) -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    for match in _ATTEMPT_LINE.finditer(daemon.logs()):
        counts[(match[1], match[2])] += int(match[3])
    return counts


def test_an_escape_syscall_storm_is_answered_and_counted(daemon: Daemon) -> None:
    rounds = 200
    started = time.monotonic()
    result = daemon.agentctl("run", "--name", "storm", "--", "/usr/bin/python3", "-c", STORM,
                             str(rounds), timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name, errnos in out["errnos"].items():
        assert errnos == [EPERM] * rounds, (name, Counter(errnos))
    print(f"{5 * rounds} notified calls in {out['seconds'] * 1000:.0f} ms inside the sandbox, "
          f"{elapsed:.1f} s for the whole run")

    container_id = f"{daemon.prefix}-{daemon.agentctl_json('inspect', 'storm')['run']['id']}"
    expected = {(container_id, name): rounds for name in out["errnos"]}

    def counted() -> bool:
        counts = _attempts_in_log(daemon)
        return {k: v for k, v in counts.items() if k[0] == container_id} == expected

    wait_for(counted, timeout=10, what="the daemon to log every attempt")
    # The self-test canary's `unshare -U true` went through the listener too.
    assert any("selftest" in container for container, _ in _attempts_in_log(daemon))


def test_agents_do_not_hang_when_the_daemon_is_sigkilled(tmp_root: Path) -> None:
    daemon = new_daemon(tmp_root)
    daemon.start()
    try:
        view = daemon.agentctl_json("run", "--detach", "--name", "looper", "--",
                                    "/usr/bin/python3", "-c", LOOP_UNSHARE)
        log_path = daemon.root / "state" / "logs" / f"{view['id']}.log"

        def answered() -> list[str]:
            lines = log_path.read_text().split() if log_path.exists() else []
            return lines if len(lines) >= 20 else []

        wait_for(answered, timeout=30, what="the agent's first answered calls")
        pids = daemon.agent_pids()
        assert pids
        daemon.stop(signal.SIGKILL)
        # Its calls now get ENOSYS from the kernel (or the watchdog has killed it already):
        # either way it is gone at once, never stuck waiting for an answer.
        wait_for(lambda: not [p for p in pids if psutil.pid_exists(p)
                              and psutil.Process(p).status() != psutil.STATUS_ZOMBIE],
                 timeout=5, what="the agent to be gone")
        results = Counter(int(x) for x in log_path.read_text().split())
        assert set(results) <= {EPERM, ENOSYS}, results
        print(f"agent results around the SIGKILL: {dict(results)}")
        daemon.start()
        assert daemon.clean() == {}
    finally:
        daemon.stop()
        daemon.cleanup_host()


def test_without_a_listener_the_filter_itself_answers_eperm(tmp_root: Path) -> None:
    with running_daemon(tmp_root, telemetry={"seccomp_listener": ""}) as daemon:
        assert not (daemon.root / "run" / "seccomp.sock").exists()
        result = daemon.agentctl("run", "--name", "plain", "--", "/usr/bin/python3", "-c",
                                 STORM, "3", timeout=60)
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout.strip().splitlines()[-1])
        assert all(errnos == [EPERM] * 3 for errnos in out["errnos"].values()), out
        assert not _attempts_in_log(daemon)
