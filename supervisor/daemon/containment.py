"""Automatic containment: feeds telemetry samples and syscall attempts to each run's
tripwires and turns every firing into an audit row (verb "tripwire", hence a `tripwire.fired`
event) and, for pause and kill, the same verb an operator would use, with actor
system:tripwire and a reason that names the rule and the values. Runs in the event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from supervisor.daemon.arbiter import Arbiter
from supervisor.errors import SupervisorError
from supervisor.models import ActionRequest, Actor, AuditEntry, Scope
from supervisor.runtime.output import OutputCounts
from supervisor.states import AgentState, EndCause
from supervisor.telemetry import Sample, SyscallAttempt
from supervisor.tripwires import Firing, RunTripwires

log = logging.getLogger(__name__)

TRIPWIRE = Actor(kind="system", name="tripwire")


class Containment:
    """`counter`: told of each run's syscall attempts as they come (telemetry's
    syscall_attempts, TelemetryHub.add_syscall_attempt)."""

    def __init__(self, arbiter: Arbiter,
                 counter: Callable[[str, int], None] | None = None) -> None:
        self.arbiter = arbiter
        self.counter = counter
        self.runs: dict[str, RunTripwires] = {}
        self.attempts: dict[str, int] = {}
        # A run's first syscall attempt if it came before its tripwires were armed (the run
        # started a moment before the arbiter told us): evaluated when they are. One per run.
        self.unarmed: dict[str, SyscallAttempt] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # A run's start and end (daemon/observers.py `Tripwires`) ---------------------------

    def run_started(self, run_id: str) -> None:
        live = self.arbiter.live.get(run_id)
        if live is None or live.profile is None:
            return
        policy = live.profile.tripwires.with_overrides(live.tripwires)
        if policy.rules:
            self.runs[run_id] = RunTripwires(policy)
        count = self.attempts.setdefault(run_id, 0)
        early = self.unarmed.pop(run_id, None)
        if early is not None and run_id in self.runs:
            for firing in self.runs[run_id].evaluate_metric("syscall_attempts", count, early.ts):
                self._fire(run_id, firing, early)

    def run_ended(self, run_id: str) -> None:
        self.runs.pop(run_id, None)
        self.attempts.pop(run_id, None)
        self.unarmed.pop(run_id, None)

    def carry(self, run_id: str) -> dict[str, Any]:
        """A run's evaluation state for the next daemon (daemon/handover.py)."""
        state = self.runs.get(run_id)
        return {"attempts": self.attempts.get(run_id, 0),
                **({"tripwires": state.carry()} if state is not None else {})}

    def restore(self, run_id: str, carried: dict[str, Any]) -> None:
        """An adopted run's state as `carry` gave it, after `run_started` armed it; a
        malformed part is logged and left at its start."""
        attempts = carried.get("attempts")
        if isinstance(attempts, int) and not isinstance(attempts, bool) and attempts >= 0:
            self.attempts[run_id] = self.attempts.get(run_id, 0) + attempts
        state, tripwires = self.runs.get(run_id), carried.get("tripwires")
        if state is not None and isinstance(tripwires, dict):
            try:
                state.restore(tripwires)
            except ValueError as exc:
                log.error("run %s: tripwire state not carried over: %s", run_id, exc)

    def on_sample(self, run_id: str, sample: Sample) -> None:
        state = self.runs.get(run_id)
        if state is None:
            return
        for firing in state.evaluate(sample):
            self._fire(run_id, firing)

    def on_attempt(self, attempt: SyscallAttempt) -> None:
        run_id = self._run_of(attempt.container_id)
        if run_id is None:
            return
        count = self.attempts.get(run_id, 0) + attempt.count
        self.attempts[run_id] = count
        if self.counter is not None:
            try:
                self.counter(run_id, attempt.count)
            except Exception:  # the count is telemetry's; the tripwires below still judge
                log.exception("syscall attempt counter %r failed", self.counter)
        state = self.runs.get(run_id)
        if state is None:
            self.unarmed.setdefault(run_id, attempt)
            return
        for firing in state.evaluate_metric("syscall_attempts", count, attempt.ts):
            self._fire(run_id, firing, attempt)

    def on_audit(self, _db: object, entry: AuditEntry) -> None:
        """An operator's resume re-arms auto-containment for that agent's run."""
        if entry.verb == "resume" and entry.outcome == "ok" and entry.target:
            agent = self.arbiter.agents.get(entry.target)
            if agent is not None and agent.current_run in self.runs:
                self.runs[agent.current_run].resumed()

    # Firing -----------------------------------------------------------------------------

    def _run_of(self, container_id: str) -> str | None:
        for run_id, live in self.arbiter.live.items():
            if live.record.container_id == container_id:
                return run_id
        return None

    def output_capped(self, run_id: str, counts: OutputCounts) -> None:
        """The run reached its output cap (recording stopped): the output_bytes tripwire
        fires once, with its profile's [output] action."""
        live = self.arbiter.live.get(run_id)
        if live is None or live.profile is None:
            return
        firing = Firing(
            rule="output_cap", metric="output_bytes", value=float(counts.produced),
            threshold=float(counts.cap), action=live.profile.output.action,
            reason=(f"tripwire output_cap: the run's output passed its cap of {counts.cap} "
                    f"bytes; the rest is discarded"), sample_ts=time.time())
        self._fire(run_id, firing, extra={"output": counts.as_dict()})

    def fire(self, run_id: str, firing: Firing, extra: dict[str, Any]) -> None:
        """A firing decided elsewhere (the egress gateway's budget and breaker)."""
        self._fire(run_id, firing, extra=extra)

    def _fire(self, run_id: str, firing: Firing, attempt: SyscallAttempt | None = None,
              extra: dict[str, Any] | None = None) -> None:
        live = self.arbiter.live.get(run_id)
        if live is None:
            return
        agent = live.record.agent
        detail: dict[str, Any] = {"run": run_id, **firing.detail(), **(extra or {})}
        if attempt is not None:
            detail["syscall"] = {"name": attempt.syscall, "pid": attempt.pid,
                                 "attempt_ts": attempt.ts}
        self.arbiter.audit.append(
            actor=TRIPWIRE.label(), verb="tripwire", scope=f"agent:{agent}", target=agent,
            reason=firing.reason, outcome=firing.action, detail=detail,
        )
        log.warning("agent %s: %s -> %s", agent, firing.reason, firing.action)
        if firing.action in ("pause", "kill"):
            self._spawn(self._act(agent, firing, time.perf_counter()))

    async def _act(self, agent: str, firing: Firing, fired: float) -> None:
        record = self.arbiter.agents.get(agent)
        if record is None:
            return
        state = AgentState(record.state)
        if (firing.action == "pause" and state != AgentState.ACTIVE) or (
                firing.action == "kill" and state == AgentState.KILLED):
            return  # already contained, by an operator or another rule
        try:
            await self.arbiter.act(firing.action, ActionRequest(
                scope=Scope(agent=agent), reason=firing.reason[:500]), TRIPWIRE,
                cause=EndCause.TRIPWIRE, arrived=fired)
        except SupervisorError as exc:
            log.error("tripwire %s on %s could not %s: %s", firing.rule, agent, firing.action,
                      exc.message)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


