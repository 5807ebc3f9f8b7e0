"""Following a run's output across restarts of the daemon, for a foreground `agentctl run` and
`agentctl logs -f`: a restart ends the stream with the daemon's notice (StreamEnded, why
"restarting"; supervisor/api/server.py FollowStreams); the output is then followed again from
the byte where it stopped once a daemon answers, so nothing is lost or shown twice. A stop of
the daemon, or no daemon back within RESTART_WAIT, ends it for good. No privilege beyond the
control socket."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from supervisor.api.client import Client
from supervisor.errors import DaemonUnavailable, StreamEnded

# How long to wait for the next daemon after a restart ended the stream (a restart under
# systemd takes seconds; the unit's TimeoutStopSec is 30 s), and how often to ask.
RESTART_WAIT = 120.0
RESTART_POLL = 0.25


def follow(client: Client, ref: str, tail: int | None = None, since: float | None = None,
           told: Callable[[StreamEnded, float], None] | None = None) -> Iterator[bytes]:
    """The run's output until the run ends. `told(exc, seconds)` hears of each restart's gap
    before the wait. Raises the StreamEnded of a stop, or of a restart with no daemon back
    within RESTART_WAIT seconds."""
    where: dict[str, int] = {}
    chunks = client.logs(ref, follow=True, tail=tail, since=since, where=where)
    deadline: float | None = None
    while True:
        try:
            for chunk in chunks:
                deadline = None  # output again: a later restart has a wait of its own
                yield chunk
            return
        except StreamEnded as exc:
            if exc.detail.get("why") != "restarting" or "offset" not in where:
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + RESTART_WAIT
                if told is not None:
                    told(exc, RESTART_WAIT)
            if now >= deadline or not answers_by(client, deadline):
                exc.message += f" (no daemon answered within {RESTART_WAIT:g}s)"
                raise
            chunks = client.logs(str(exc.detail["run"]), follow=True, offset=where["offset"],
                                 where=where)


def answers_by(client: Client, deadline: float) -> bool:
    """Whether a daemon answers on the client's socket before `deadline` (monotonic)."""
    while True:
        time.sleep(RESTART_POLL)
        try:
            client.health()
            return True
        except DaemonUnavailable:
            if time.monotonic() >= deadline:
                return False
