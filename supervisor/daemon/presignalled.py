"""What the daemon's loop does with a SIGKILL the owners' acceptor sent before the loop saw its
request (api/presignal.py, sandbox/killindex.py): once the request is over, every signalled run
that no kill's audit row took is killed through the kill path, audited and finalised as
killed, or recorded in a row of its own if it had ended (`finish`); a signalled run whose init
died first waits for that instead of ending as exited or stopped (`settle`). Runs in the
daemon's event loop."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from supervisor.sandbox.killindex import PreSignal
from supervisor.states import EndCause

if TYPE_CHECKING:
    from supervisor.daemon.arbiter import Arbiter
    from supervisor.daemon.liverun import LiveRun

log = logging.getLogger(__name__)

# How long a run's exit watcher waits for the request that SIGKILLed it at the acceptor to
# be settled by the loop (its kill path, or `finish`) before it settles it itself.
SETTLE_WAIT = 10.0
# A run no kill owns: a kill overtakes a graceful stop in its grace period (ending.py).
_UNOWNED = frozenset({None, EndCause.STOPPED})


def finish(arbiter: Arbiter, record: PreSignal, why: str) -> None:
    """On the loop, once the request that carried `record` is over (answered, refused, its
    connection gone): every run signalled at the acceptor that no kill path's audit row took
    is killed now through the kill path (audited, finalised as killed), or, if it has ended
    already, recorded in an audit row of its own. Idempotent."""
    if record.finished:
        return
    record.finished = True
    left = [run_id for run_id in record.runs if run_id not in record.claimed]
    if not left:
        record.settled.set()
        return
    arbiter.track(asyncio.ensure_future(_unclaimed(arbiter, record, left, why)))


async def _unclaimed(arbiter: Arbiter, record: PreSignal, left: list[str], why: str) -> None:
    try:
        reason = (f"SIGKILL sent at the owners' acceptor for '{record.request.reason}'; "
                  f"{why}")
        agents = []
        for run_id in left:
            live = arbiter.live.get(run_id)
            agent = arbiter.agents.get(record.runs[run_id])
            if (live is not None and live.ending in _UNOWNED and agent is not None
                    and agent.current_run == run_id and agent not in agents):
                agents.append(agent)
        log.critical("owners' acceptor: %d run(s) SIGKILLed for a request whose kill path "
                     "did not take them (%s); killing %d agent(s) through the kill path",
                     len(left), why, len(agents))
        if record.request.scope.kind == "global" and not arbiter.global_halt:
            # Every run was SIGKILLed for a global halt: it is in force (fail closed), so no
            # launch follows a fleet killed as if nothing had been asked.
            arbiter.halt_globally(record.actor, reason, list(arbiter.agents.values()),
                                  why=why)
        if agents:
            await arbiter._kill(agents, record.actor, reason, record.request.scope.describe(),
                                arrived=record.arrived, presignal=record)
        rest = sorted(run_id for run_id in left if run_id not in record.claimed)
        if rest:  # ended, or owned by another kill, before this one: their SIGKILL on record
            arbiter.audit.append(
                actor=record.actor.label(), verb="acceptor_sigkill",
                scope=record.request.scope.describe(), reason=reason, outcome="unclaimed",
                detail={"runs": {run_id: record.runs[run_id] for run_id in rest},
                        "sigkill": {run_id: record.detail(run_id) for run_id in rest},
                        "why": why})
    finally:
        record.settled.set()


async def settle(arbiter: Arbiter, record: PreSignal, live: LiveRun) -> None:
    """A run SIGKILLed at the acceptor has exited, and no kill path owns it yet (its exit
    watcher, or a graceful stop, would end it as exited or stopped): wait (at
    most SETTLE_WAIT) for the loop to settle its request, then settle it here."""
    try:
        await asyncio.wait_for(record.settled.wait(), SETTLE_WAIT)
    except TimeoutError:
        if live.ending in _UNOWNED:
            finish(arbiter, record, "its request did not reach the loop's kill path")
            await record.settled.wait()
