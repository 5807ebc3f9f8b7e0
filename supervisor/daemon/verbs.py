"""The verbs that change an agent without ending it by force: pause, resume, reactivate, and
the graceful stop (SIGTERM, the grace period, then the kill path). Each goes through the state
table and is recorded and audited by `record`. Runs in the daemon's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

from supervisor.daemon import ending
from supervisor.daemon.killpath import CONFIRMERS
from supervisor.daemon.liverun import LiveRun, actor_detail, held_pause, ms_since
from supervisor.daemon.store import AgentRecord
from supervisor.errors import EnforcementError, IllegalTransition, SupervisorError
from supervisor.models import Actor, AgentResult
from supervisor.states import AgentState, EndCause, Verb, agent_can

if TYPE_CHECKING:
    from supervisor.daemon.arbiter import Arbiter

log = logging.getLogger(__name__)


async def pause_agent(arbiter: Arbiter, agent: AgentRecord, actor: Actor, reason: str, scope: str
                     ) -> AgentResult:
    async with arbiter._lock(agent.name):
        if not agent_can(AgentState(agent.state), Verb.PAUSE):
            arbiter._set_agent_state(agent, Verb.PAUSE, actor, reason)  # raises
        live = arbiter._live_of(agent)
        assert live is not None and live.handle is not None
        frozen = await live.handle.freeze(arbiter.config.kill.confirm_timeout)
        if not frozen:
            await live.handle.thaw()
            raise EnforcementError(f"agent {agent.name}: cgroup did not freeze",
                                   agent=agent.name)
        await arbiter.observers.paused(live.record.id)  # tokens suspended, link down
        if agent.state != AgentState.ACTIVE:  # a kill overtook the pause
            raise IllegalTransition(f"agent {agent.name!r} is now {agent.state}",
                                    agent=agent.name, state=agent.state)
        previous, new = arbiter._set_agent_state(agent, Verb.PAUSE, actor, reason)
        arbiter._set_run_state(live.record, Verb.PAUSE)
        return record(arbiter, agent, live, actor, "pause", scope, reason, previous, new)


async def resume_agent(arbiter: Arbiter, agent: AgentRecord, actor: Actor, reason: str, scope: str
                      ) -> AgentResult:
    async with arbiter._lock(agent.name):
        if held_pause(agent):
            previous, new = arbiter._set_agent_state(agent, Verb.RELEASE, actor, reason)
            return record(arbiter, agent, None, actor, "resume", scope, reason, previous, new)
        previous, new = arbiter._set_agent_state(agent, Verb.RESUME, actor, reason)
        live = arbiter._live_of(agent)
        assert live is not None and live.handle is not None
        await arbiter.observers.resuming(live.record.id)  # link up, tokens back
        await live.handle.thaw()
        arbiter._set_run_state(live.record, Verb.RESUME)
        return record(arbiter, agent, live, actor, "resume", scope, reason, previous, new)


async def reactivate_agent(arbiter: Arbiter, agent: AgentRecord, actor: Actor, reason: str,
                           scope: str) -> AgentResult:
    live = arbiter._live_of(agent)
    if live is not None:
        raise IllegalTransition(
            f"agent {agent.name!r} cannot be reactivated: the kernel has not confirmed its "
            f"last kill (run {live.record.id} is {live.record.state})",
            agent=agent.name, run=live.record.id, run_state=live.record.state,
        )
    transition = Verb.RELEASE if held_pause(agent) else Verb.REACTIVATE
    previous, new = arbiter._set_agent_state(agent, transition, actor, reason)
    return record(arbiter, agent, None, actor, "reactivate", scope, reason, previous, new)


async def stop_agent(arbiter: Arbiter, agent: AgentRecord, actor: Actor, reason: str, scope: str,
                     grace: float) -> AgentResult:
    """SIGTERM every process, wait `grace`, then the kill path for whatever is left."""
    async with arbiter._lock(agent.name):
        state = AgentState(agent.state)
        live = arbiter._live_of(agent)
        if not agent_can(state, Verb.STOP) or live is None or live.handle is None:
            arbiter._set_agent_state(agent, Verb.STOP, actor, reason)  # raises
            raise IllegalTransition(f"agent {agent.name!r} has no run to stop",
                                    agent=agent.name)
        handle = live.handle
        live.ending = EndCause.STOPPED
        t0 = time.perf_counter()
        with contextlib.suppress(Exception):  # a stopping agent gets no more credentials
            await arbiter.credentials.revoke(live.record.id)
        if state == AgentState.PAUSED:
            await handle.thaw()
        handle.signal_all(signal.SIGTERM)
        try:
            status = await asyncio.wait_for(asyncio.shield(handle.wait_exit()), grace)
            graceful = True
        except TimeoutError:
            graceful = False
    if live.ending is not EndCause.STOPPED:  # a kill overtook the stop; it ends the run
        await live.done.wait()
    elif not graceful:
        live.ending = None
        [result] = await arbiter._kill([agent], actor, reason or f"grace {grace:g}s expired",
                                    scope, verb="stop", agent_verb=Verb.STOP, arrived=t0)
        if isinstance(result, SupervisorError):
            raise result
        return result
    previous, new = arbiter._set_agent_state(agent, Verb.STOP, actor, reason)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        await loop.run_in_executor(CONFIRMERS, handle.cgroup.wait_empty,
                                   arbiter.config.kill.confirm_timeout)
    handle.teardown_network()
    time_to_halt_ms = ms_since(t0, time.perf_counter())
    ending.finalise(arbiter, live, EndCause.STOPPED, exit_code=status,
                    time_to_halt_ms=time_to_halt_ms, reason=f"stop: {reason}" if reason else "stop")
    return record(arbiter, agent, live, actor, "stop", scope, reason, previous, new,
                  time_to_halt_ms=time_to_halt_ms,
                  extra={"graceful": True, "exit_code": status})


def record(arbiter: Arbiter, agent: AgentRecord, live: LiveRun | None, actor: Actor, verb: str,
           scope: str, reason: str, previous: AgentState, new: AgentState,
           time_to_halt_ms: float | None = None, extra: dict[str, Any] | None = None,
          ) -> AgentResult:
    arbiter.store.put_agent(agent)
    if live is not None:
        arbiter.store.put_run(live.record)
    arbiter.audit.append(
        actor=actor.label(), verb=verb, scope=scope, target=agent.name, reason=reason,
        previous_state=previous.value, new_state=new.value, time_to_halt_ms=time_to_halt_ms,
        detail={"run": live.record.id if live else None, "actor": actor_detail(actor),
                **(extra or {})},
    )
    log.info("%s agent %s by %s (%s)", verb, agent.name, actor.label(), reason or "-")
    return AgentResult(agent=agent.name, previous_state=previous.value, new_state=new.value,
                       run_id=live.record.id if live else None,
                       time_to_halt_ms=time_to_halt_ms)
