"""A run while the daemon holds it (`LiveRun`) and the few small facts every verb on runs
shares: the system actor, an actor's audit detail, a held pause, a run's exit status. No I/O,
no privilege."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field
from typing import Any

from supervisor.daemon.store import AgentRecord, RunRecord
from supervisor.models import Actor
from supervisor.models.tripwire import TripwireRule
from supervisor.profiles import Profile
from supervisor.runtime.base import RunHandle
from supervisor.states import AgentState, EndCause

SYSTEM = Actor(kind="system", name="supervisor")


@dataclass
class LiveRun:
    """A run the daemon is supervising now: its record, its runtime handle and its events."""
    record: RunRecord
    handle: RunHandle | None = None
    profile: Profile | None = None
    tripwires: list[TripwireRule] = field(default_factory=list)  # the agent's own overrides
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    ending: EndCause | None = None  # set by whoever finalises the run, before it awaits
    watcher: asyncio.Task[None] | None = None
    timeout_handle: asyncio.TimerHandle | None = None
    # Taken over from the previous daemon at a restart (daemon/handover.py): its init is not
    # this daemon's child, so its exit status is unknown.
    adopted: bool = False


def exit_status(live: LiveRun) -> int:
    """The init's status if the kernel has reported it already, else what SIGKILL gives:
    the answer never waits on a runtime for it."""
    if live.handle is not None:
        with contextlib.suppress(Exception):
            exit_future = live.handle.wait_exit()
            if isinstance(exit_future, asyncio.Future) and exit_future.done():
                status = exit_future.result()
                if isinstance(status, int):
                    return status
    return 128 + signal.SIGKILL


def ms_since(t0: float, t1: float) -> float:
    return round((t1 - t0) * 1000, 3)


def held_pause(agent: AgentRecord) -> bool:
    """Paused with no run: the pause outlived its run (a restart) and still holds the agent."""
    return agent.state == AgentState.PAUSED and agent.current_run is None


def actor_detail(actor: Actor) -> dict[str, Any]:
    return actor.model_dump(exclude_defaults=True)
