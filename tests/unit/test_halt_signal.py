"""Break-glass by SIGUSR1 at every moment of the daemon's life (issue 13, the review's open
finding): the signal is blocked from the process's first line and taken by one thread from
the start to the exit. With break-glass up it is break-glass's trigger; before (starting) and
after (handing over, stopping) it kills through the parent's cgroup.kill and leaves the HALT
file, which outlives the process; one that comes after the thread's last wait is taken at
close. Each case in a process of its own (a signal mask is process state). No root."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.unit.conftest import WAIT

REPO = Path(__file__).resolve().parents[2]

# argv: halt file, the agents' parent (absent here: kill_tree reports and returns), case.
SCRIPT = """
import os, signal, sys, threading, time
from pathlib import Path
import supervisor.daemon.entry  # blocks SIGUSR1 on import, as the daemon's first line
from supervisor.daemon.breakglass import HaltSignal
halt, parent, case = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
assert signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, [])
signals = HaltSignal(halt, parent, 0.1)
if case == "pending-before-start":  # sent before the thread exists: taken once it does
    os.kill(os.getpid(), signal.SIGUSR1)
signals.start()
got = threading.Event()
if case == "attached":
    signals.attach(lambda arrived: got.set())
if case == "after-the-last-wait":  # the thread has stopped waiting; the exit is near
    signals.stop_waiting()
    os.kill(os.getpid(), signal.SIGUSR1)
    signals.close()
    print("closed", flush=True)
    sys.exit(0)
if case == "stopped-and-continued":  # SIGSTOP, then SIGCONT, from the test: no signal taken
    signals.attach(lambda arrived: got.set())
    print("ready", flush=True)
    sys.stdin.readline()  # the test has stopped and continued this process
    time.sleep(0.3)
    signals.close()
    print("attached" if got.is_set() else "nothing", flush=True)
    sys.exit(0)
if case in ("attached", "detached", "pending-before-start"):
    if case == "detached":
        signals.attach(lambda arrived: got.set())
        signals.detach()  # break-glass stopped: the daemon is handing over or stopping
    if case != "pending-before-start":
        os.kill(os.getpid(), signal.SIGUSR1)
    deadline = time.monotonic() + float(sys.argv[4])
    while time.monotonic() < deadline and not (got.is_set() or halt.exists()):
        time.sleep(0.01)
    signals.close()
    print("attached" if got.is_set() else "unattended", flush=True)
"""


def _run(tmp_path: Path, case: str) -> tuple[str, Path]:
    halt = tmp_path / "HALT"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(halt), str(tmp_path / "absent"),
                           case, str(WAIT)], capture_output=True, text=True, timeout=4 * WAIT,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip(), halt


def test_with_break_glass_up_the_signal_is_its_trigger(tmp_path: Path) -> None:
    said, halt = _run(tmp_path, "attached")
    assert said == "attached" and not halt.exists()


def test_with_break_glass_stopped_the_signal_kills_and_leaves_the_halt_file(
        tmp_path: Path) -> None:
    said, halt = _run(tmp_path, "detached")
    assert said == "unattended"
    assert "SIGUSR1 to the daemon" in halt.read_text()
    assert halt.stat().st_mode & 0o777 == 0o600


def test_a_signal_sent_before_the_thread_started_is_taken_when_it_starts(
        tmp_path: Path) -> None:
    said, halt = _run(tmp_path, "pending-before-start")
    assert said == "unattended" and "while it was starting or stopping" in halt.read_text()


def test_a_signal_after_the_threads_last_wait_is_taken_at_close(tmp_path: Path) -> None:
    said, halt = _run(tmp_path, "after-the-last-wait")
    assert said == "closed"
    assert "SIGUSR1 to the daemon" in halt.read_text()


def test_a_daemon_stopped_and_continued_takes_no_signal(tmp_path: Path) -> None:
    """SIGSTOP then SIGCONT (a debugger, a freezer, a benchmark's pause) interrupts the
    thread's wait (EINTR). CPython's sigtimedwait, interrupted once its timeout had passed,
    returned a siginfo for no signal, and the daemon halted every agent."""
    halt = tmp_path / "HALT"
    with subprocess.Popen([sys.executable, "-c", SCRIPT, str(halt), str(tmp_path / "absent"),
                           "stopped-and-continued", str(WAIT)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}) as proc:
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline().strip() == "ready"
            for _ in range(3):
                proc.send_signal(signal.SIGSTOP)
                time.sleep(0.25)  # longer than any poll the thread might make
                proc.send_signal(signal.SIGCONT)
                time.sleep(0.05)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            said = proc.stdout.readline().strip()
            assert proc.wait(timeout=4 * WAIT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert said == "nothing" and not halt.exists()
