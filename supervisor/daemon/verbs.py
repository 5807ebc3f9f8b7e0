"""The verbs that change an agent without ending it by force: pause, resume, reactivate, and
the graceful stop (SIGTERM, the grace period, then the kill path). Each goes through the state
table and is recorded and audited by `record`. Runs in the daemon's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from supervisor.daemon import ending, presignalled
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
        over: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        arbiter.in_grace.add(over)
        try:
            status, graceful = await _exit_within(handle.wait_exit(), grace,
                                                  arbiter.graces_cut)
        except BaseException:
            _grace_over(arbiter, over)
            raise
        presignal = arbiter.kill_index.signalled(live.record.id)
        if graceful and presignal is not None and live.ending is EndCause.STOPPED:
            # It died of the owners' acceptor's SIGKILL, not of the SIGTERM: its kill's.
            await presignalled.settle(arbiter, presignal, live)
    if live.ending is not EndCause.STOPPED:  # a kill overtook the stop; it ends the run
        _grace_over(arbiter, over)
        await live.done.wait()
    elif not graceful:
        # The run stays marked stopping until the kill path owns it (kill_agents overtakes a
        # stop's mark): no shutdown sweep or execution window takes it in between.
        why = reason or f"grace {grace:g}s expired"
        if arbiter.graces_cut.is_set():
            cut = f"grace cut short: {arbiter.graces_cut_reason}"
            why = f"{reason} ({cut})" if reason else cut
        # Shielded: the daemon's stop cancels the request's handler after a bounded wait
        # (api/listener.py LISTENER_DRAIN), never the kill it started.
        kill = asyncio.shield(arbiter._kill(
            [agent], actor, why, scope, verb="stop", agent_verb=Verb.STOP, arrived=t0))
        _grace_over(arbiter, over)  # after the kill's task is queued: its step 1 runs first
        [result] = await kill
        if isinstance(result, SupervisorError):
            raise result
        return result
    _grace_over(arbiter, over)
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


def _grace_over(arbiter: Arbiter, over: asyncio.Future[None]) -> None:
    arbiter.in_grace.discard(over)
    if not over.done():
        over.set_result(None)


async def _exit_within(exit_status: Awaitable[int | None], grace: float, cut: asyncio.Event
                       ) -> tuple[int | None, bool]:
    """(the init's exit status, True) if it exits within `grace` and before `cut` is set,
    else (None, False). The exit future is left running for whoever waits on it next."""
    exit_ = asyncio.ensure_future(exit_status)
    if not cut.is_set():
        cutting: asyncio.Future[Any] = asyncio.ensure_future(cut.wait())
        try:
            await asyncio.wait((exit_, cutting), timeout=grace,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            cutting.cancel()
    if exit_.done() and not exit_.cancelled():
        return exit_.result(), True
    return None, False


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
