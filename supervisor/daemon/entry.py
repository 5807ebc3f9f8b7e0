"""agent-supervisord's first line (its console script and `python -m supervisor.daemon`):
SIGUSR1 is blocked before anything else is imported, so break-glass by signal is never the
signal's default action (the process ending, its agents left to whoever comes next) and never
lost: it waits, pending, for the daemon's HaltSignal thread (daemon/breakglass.py). What is
left before this line is the interpreter's own start.

The daemon's other signals (startsignals.START_DEFERRED) are blocked here too, until the
loop's handlers exist (daemon/main.py, serve): a reload (SIGHUP), a restart (SIGUSR2,
systemd's RestartKillSignal=) or a stop (SIGTERM, SIGINT) that arrives while the daemon
starts waits, pending, and is acted on then; its default action would end the daemon in
the middle of its start, after it may have adopted runs handed over by a restart, whose
only killer would then be its own watchdog.

A mask survives fork and exec. The children that live on clear it: the watchdog and the egress
gateway worker first thing (their main()), an agent's container by runc's init (tini then
hands its agent a clear mask: tests/privileged/test_signal_mask.py). The short-lived helpers
(runc's other verbs, nft, nsenter, systemctl) keep it; none is ever signalled but by SIGKILL
(the unit's KillMode=mixed sends SIGTERM to the daemon alone)."""

from __future__ import annotations

import signal

from supervisor.daemon.startsignals import START_DEFERRED

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, *START_DEFERRED})


def main() -> None:
    from supervisor.daemon.main import main as daemon_main

    daemon_main()
