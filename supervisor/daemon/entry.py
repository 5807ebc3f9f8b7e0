"""agent-supervisord's first line (its console script and `python -m supervisor.daemon`):
SIGUSR1 is blocked before anything else is imported, so break-glass by signal is never the
signal's default action (the process ending, its agents left to whoever comes next) and never
lost: it waits, pending, for the daemon's HaltSignal thread (daemon/breakglass.py). What is
left before this line is the interpreter's own start."""

from __future__ import annotations

import signal

# SIGHUP too: until the loop's reload handler is installed (daemon/main.py, serve), a reload
# asked during the start waits, pending, instead of killing the daemon (its default action).
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGHUP})


def main() -> None:
    from supervisor.daemon.main import main as daemon_main

    daemon_main()
