"""The signals agent-supervisord blocks from its first line (entry.py) until its loop's
handlers exist (main.py, serve): a reload (SIGHUP), a restart (SIGUSR2, systemd's
RestartKillSignal=) or a stop (SIGTERM, SIGINT) asked during the start waits, pending, and
is acted on then. A module of its own: importing it blocks nothing (entry.py, imported only
as the daemon's entry point, does)."""

from __future__ import annotations

import signal

START_DEFERRED = frozenset({signal.SIGHUP, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT})
