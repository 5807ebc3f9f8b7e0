"""Who is told about a run's life, by name: the telemetry sampler, the tripwires, the seccomp
listener, the egress gateway and the fleet. The arbiter is given one `RunObservers` at
assembly (daemon/core.py; main.py adds the fleet) and calls it where a run starts, ends, is
paused or resumed, at reconcile and when an agent's state changes; each call below is written
out, so whoever reads a run's end (ending.finalise) or the kill path sees all it touches. The
`background` (the sampler's /proc walk) stands aside while a kill runs (`killing`).

A run's start and end, and an agent's change, are observations: one that fails is logged and
the others still run, so no observer can stop a launch, an ending or a kill. Pause, resume and
reconcile wait for the gateway and fail with it (a pause that could not suspend the run's
tokens is not a pause). The launch gate (fleet holds) is a question, not an observation: its
answer refuses a launch. No I/O of its own, no privilege; runs in the event loop."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from supervisor.daemon.store import RunRecord
from supervisor.errors import SupervisorError

log = logging.getLogger(__name__)


class Sampler(Protocol):
    """Telemetry: samples a run's cgroup (relative path) from its start to its end."""

    def run_started(self, run_id: str, cgroup: str, started_at: float) -> None: ...

    def run_ended(self, run_id: str) -> None: ...


class StandsAside(Protocol):
    """A thread whose CPU a kill would compete with (the telemetry sampler's /proc walk):
    inside `stand_aside()` it waits instead of working."""

    def stand_aside(self) -> AbstractContextManager[None]: ...


class Tripwires(Protocol):
    """Containment (daemon/containment.py): arms a run's tripwires and drops them."""

    def run_started(self, run_id: str) -> None: ...

    def run_ended(self, run_id: str) -> None: ...


class SyscallListener(Protocol):
    """The seccomp listener: closes an ended container's notification fds; stops polling
    them once a kill is about to end the container (`hush`), until `forget`."""

    def forget(self, container_id: str) -> None: ...

    def hush(self, container_ids: Collection[str]) -> None: ...


class ExitWatcher(Protocol):
    """The runtime's handle of a run: `hush` stops watching its init until its cleanup."""

    def hush(self) -> None: ...


class Gateway(Protocol):
    """The egress gateway (daemon/egress.py) beyond kill step 2's `Credentials`."""

    async def pause(self, run_id: str) -> None: ...

    async def resume(self, run_id: str) -> None: ...

    def run_ended(self, run_id: str) -> None: ...

    def reap_leftovers(self) -> object: ...


class Fleet(Protocol):
    """Fleet membership (daemon/fleet.py): republishes the agents, holds launches."""

    def agents_changed(self) -> None: ...

    def gate(self, name: str, agent_class: str) -> SupervisorError | None: ...


def observe(call: Callable[..., object], *args: Any) -> None:
    """Observers must never break a launch, an ending or a kill: a failure is logged."""
    try:
        call(*args)
    except Exception:
        log.exception("run observer %s failed", getattr(call, "__qualname__", call))


@dataclass
class RunObservers:
    """Each observer a daemon has; None where it has none (the unit tier, a host without
    a seccomp listener, a daemon outside a fleet)."""

    sampler: Sampler | None = None
    tripwires: Tripwires | None = None
    seccomp: SyscallListener | None = None
    gateway: Gateway | None = None
    fleet: Fleet | None = None
    background: StandsAside | None = None

    @contextlib.contextmanager
    def killing(self) -> Iterator[None]:
        """Around a kill, from step 1 to its records and audit rows: the background stands
        aside; if it cannot, the kill goes on all the same."""
        with contextlib.ExitStack() as stack:
            if self.background is not None:
                try:
                    stack.enter_context(self.background.stand_aside())
                except Exception:
                    log.exception("run observer %s failed to stand aside", self.background)
            yield

    def run_started(self, run: RunRecord) -> None:
        """The run's command runs: its tripwires are armed before its first sample."""
        if self.tripwires is not None:
            observe(self.tripwires.run_started, run.id)
        if self.sampler is not None:
            observe(self.sampler.run_started, run.id, run.cgroup, run.started_at)

    def hush(self, runs: Sequence[tuple[RunRecord, ExitWatcher]],
             seccomp_hushed: Collection[str] = ()) -> None:
        """A sweep is about to SIGKILL `runs` (killpath.sweep's `hush`): their inits' exit
        watchers and their seccomp fds (one request for all) stop listening. Each catches
        up after the kill's answer: the run's cleanup reaps its init, `run_ended` closes
        its fds. One that fails leaves the others hushed all the same. `seccomp_hushed`:
        run ids whose fds the owners' acceptor asked the listener to hush already (with
        its SIGKILL); asking again woke the listener's thread, to find nothing to do, in
        the middle of the kill (docs/benchmarks.md run 18)."""
        for _run, handle in runs:
            observe(handle.hush)
        containers = [run.container_id for run, _handle in runs if run.id not in seccomp_hushed]
        if self.seccomp is not None and containers:
            observe(self.seccomp.hush, containers)

    def run_ended(self, run: RunRecord) -> None:
        """Called once per run by ending.finalise, whatever ended it."""
        if self.sampler is not None:
            observe(self.sampler.run_ended, run.id)
        if self.tripwires is not None:
            observe(self.tripwires.run_ended, run.id)
        if self.seccomp is not None:
            observe(self.seccomp.forget, run.container_id)
        if self.gateway is not None:
            observe(self.gateway.run_ended, run.id)

    async def paused(self, run_id: str) -> None:
        """After the freeze: the run's tokens suspended, its link down."""
        if self.gateway is not None:
            await self.gateway.pause(run_id)

    async def resuming(self, run_id: str) -> None:
        """Before the thaw: the link up, the tokens usable again."""
        if self.gateway is not None:
            await self.gateway.resume(run_id)

    def reconciled(self) -> None:
        """After reconcile reaped runs: the leftovers that are not a run's (nft tables)."""
        if self.gateway is not None:
            self.gateway.reap_leftovers()

    def agents_changed(self) -> None:
        if self.fleet is not None:
            observe(self.fleet.agents_changed)

    def launch_refusal(self, name: str, agent_class: str) -> SupervisorError | None:
        """Why a launch may not start now (a fleet hold), or None."""
        return None if self.fleet is None else self.fleet.gate(name, agent_class)

