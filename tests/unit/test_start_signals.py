"""The daemon's start-time signal mask (supervisor/daemon/entry.py, startsignals.py): its
entry point blocks SIGUSR1 and the deferred signals, importing the daemon's code elsewhere
(a test, an embedding caller) blocks nothing, and what arrived meanwhile is taken off as
pending. Each in a process of its own, never in the test runner's. No privilege."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.support.daemon import REPO


def _blocked_after(code: str) -> int:
    """The SigBlk of a fresh interpreter (its mask cleared first) after running `code`."""
    script = ("import signal\nsignal.pthread_sigmask(signal.SIG_SETMASK, ())\n" + code +
              "\nprint([l for l in open('/proc/self/status') if l.startswith('SigBlk')][0]"
              ".split()[1])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=60, check=True)
    return int(done.stdout.split()[-1], 16)


def _bits(*signums: int) -> int:
    return sum(1 << (s - 1) for s in signums)


def test_the_entry_point_blocks_them_and_importing_the_daemon_does_not() -> None:
    assert _blocked_after("import supervisor.daemon.main") == 0
    assert _blocked_after("import supervisor.daemon.entry") == _bits(
        signal.SIGUSR1, signal.SIGHUP, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


def test_what_arrived_while_starting_is_taken_off_as_pending() -> None:
    code = """
import os
from supervisor.daemon.main import STOP_SIGNALS, take_pending
from supervisor.daemon.startsignals import START_DEFERRED
signal.pthread_sigmask(signal.SIG_BLOCK, START_DEFERRED)
assert take_pending(STOP_SIGNALS) == set()
os.kill(os.getpid(), signal.SIGUSR2)
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGHUP)
assert take_pending(STOP_SIGNALS) == {signal.SIGUSR2, signal.SIGTERM}
assert signal.sigpending() == {signal.SIGHUP}  # a reload's: delivered once unblocked
assert take_pending(STOP_SIGNALS) == set()
"""
    assert _blocked_after(code) == _bits(signal.SIGHUP, signal.SIGUSR2, signal.SIGTERM,
                                         signal.SIGINT)
