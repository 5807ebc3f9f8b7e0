"""How a run ends. A kill of one agent or many (`kill_agents`): step 1, every target agent
marked killed before any await (written to the store while the kernel confirms); steps 2-5 in
one sweep (supervisor/daemon/killpath.py); the kill's audit rows; then each run through
`finalise`, the one door every run leaves by whatever its `EndCause`; step 6
(runtime state, bundle) after the answer, tracked and audited. A run's own exit (`watch`) and
its execution window (`expire`) end here too. Runs in the daemon's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from supervisor.daemon import presignalled
from supervisor.daemon.killpath import CONFIRMERS, HaltReport, RunKill, sweep
from supervisor.daemon.liverun import (
    SYSTEM,
    LiveRun,
    actor_detail,
    exit_status,
    ms_since,
)
from supervisor.daemon.store import AgentRecord
from supervisor.errors import KillUnconfirmed, SupervisorError
from supervisor.models import Actor, AgentResult
from supervisor.sandbox.killindex import PreSignal
from supervisor.states import (
    RUN_ENDED,
    AgentState,
    EndCause,
    RunState,
    Verb,
    agent_at_end,
    run_end,
)

if TYPE_CHECKING:
    from supervisor.daemon.arbiter import Arbiter

log = logging.getLogger(__name__)

_CLEANUP_WAIT = 5.0  # at most this long for the ending's audit rows before step 6 goes on
_LAUNCH_WAIT = 30.0  # a kill waits this long for a launch in flight to reach a killable state
# A scoped halt waits this long at most, in the loop's thread, for the writer to commit its
# audit rows before it writes its records (`kill_agents`).
ROWS_ON_LOOP = 0.01
# A run being killed: a second kill only re-sends SIGKILL; the first one finalises it.
_KILLING = frozenset({EndCause.KILLED, EndCause.TIMEOUT, EndCause.TRIPWIRE,
                      EndCause.BREAK_GLASS, EndCause.SHUTDOWN})


# The collector is held off at most this long at a time (seconds): a kill answers in
# milliseconds; one that waits for a launch (up to _LAUNCH_WAIT), or kills that overlap one
# after another without end, must not leave it off while the daemon's garbage grows.
COLLECTOR_HOLD_MAX = 1.0


class _CollectorHold:
    """The cyclic garbage collector off while any kill is under way (counted, so kills that
    overlap hold it together), back on, if it was on, when the last one lets go, or once it
    has been off for COLLECTOR_HOLD_MAX, whichever comes first."""

    def __init__(self) -> None:
        self.holders = 0
        self.reenable = False
        self.lapse: asyncio.TimerHandle | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        if not self.holders:
            self.reenable = gc.isenabled()
            gc.disable()
            if self.reenable:
                with contextlib.suppress(RuntimeError):  # no loop: the caller's return
                    self.lapse = asyncio.get_running_loop().call_later(COLLECTOR_HOLD_MAX,
                                                                       gc.enable)
        self.holders += 1
        try:
            yield
        finally:
            self.holders -= 1
            if not self.holders:
                if self.lapse is not None:
                    self.lapse.cancel()
                    self.lapse = None
                if self.reenable:
                    gc.enable()


_COLLECTOR = _CollectorHold()


def collector_held() -> contextlib.AbstractContextManager[None]:
    """No automatic collection from a kill's start until its answer is out (`Arbiter._kill`
    holds this as long as the sampler's stand-aside): a generation-0 collection took 0.2-0.3
    ms of the loop's CPU, the GIL held, and fell inside 4 of 5 class halts, in front of the
    SIGKILL's confirmation or the answer (docs/benchmarks.md run 20). What the kill allocated
    is collected at the first allocation after. Never longer than COLLECTOR_HOLD_MAX in one
    go (a kill that waits for a launch in flight, kills that overlap without end)."""
    return _COLLECTOR.held()


async def expire(arbiter: Arbiter, live: LiveRun, fired: float) -> None:
    run = live.record
    if live.ending is not None or run.state in RUN_ENDED:
        return
    reason = f"execution window of {run.timeout:g}s expired"
    with contextlib.suppress(SupervisorError):
        await arbiter._kill([arbiter.agents[run.agent]], SYSTEM, reason, f"agent:{run.agent}",
                            cause=EndCause.TIMEOUT, arrived=fired)


async def watch(arbiter: Arbiter, live: LiveRun) -> None:
    """Finalise a run whose command ended by itself."""
    assert live.handle is not None
    status = await live.handle.wait_exit()
    presignal = arbiter.kill_index.signalled(live.record.id)
    if presignal is not None and live.ending is None:
        # SIGKILLed at the owners' acceptor: its request's kill path ends it as killed.
        await presignalled.settle(arbiter, presignal, live)
    if live.ending is not None:
        return
    live.ending = EndCause.EXITED
    handle, run = live.handle, live.record
    loop = asyncio.get_running_loop()
    # The init is gone, so the kernel is killing the rest of its pid namespace; the run is
    # over when the cgroup is empty.
    with contextlib.suppress(OSError):
        await loop.run_in_executor(CONFIRMERS, handle.cgroup.wait_empty,
                                   arbiter.config.kill.confirm_timeout)
    handle.teardown_network()
    agent = arbiter.agents[run.agent]
    previous = AgentState(agent.state)
    finalise(arbiter, live, EndCause.EXITED, exit_code=status)
    arbiter.audit.append(
        actor=SYSTEM.label(), verb="exit", scope=f"agent:{agent.name}", target=agent.name,
        previous_state=previous.value, new_state=agent.state,
        detail={"run": run.id, "exit_code": status, "cause": EndCause.EXITED.value,
                **({"exit_status": "unknown: the run was adopted after a restart and "
                                   + (getattr(handle, "exit_unknown", None)
                                      or "its init was not this daemon's child")}
                   if status is None and live.adopted else {})},
    )


def finalise(arbiter: Arbiter, live: LiveRun, cause: EndCause, *, exit_code: int | None = None,
             time_to_halt_ms: float | None = None, reason: str = "",
             after: asyncio.Future[None] | None = None) -> None:
    """End a run, whatever ended it: its record (state from the table, cause, exit code,
    time_to_halt), its agent, the observers; then step 6 (runtime state, bundle) in the
    background, tracked, so no answer ever waits on a runtime (`after`: not before this
    gate opens, a kill's `answer_out`)."""
    run = live.record
    if RunState(run.state) in RUN_ENDED:  # ended already (a launch that failed under a kill)
        live.done.set()
        return
    run.state = run_end(RunState(run.state), cause).value
    run.end_cause = cause.value
    run.end_reason = reason or cause.value
    run.exit_code = exit_code
    if time_to_halt_ms is not None:
        run.time_to_halt_ms = time_to_halt_ms
    run.ended_at = time.time()
    if live.timeout_handle is not None:
        live.timeout_handle.cancel()
    agent = arbiter.agents.get(run.agent)
    if agent is not None:
        if agent.current_run == run.id:
            agent.current_run = None
        agent.last_run = run.id
        agent.state = agent_at_end(AgentState(agent.state), cause).value
        agent.updated_at = time.time()
        arbiter.store.put_agent(agent)
    arbiter.live.pop(run.id, None)
    arbiter.kill_index.remove(run.id)
    arbiter.store.put_run(run)
    if after is None:
        arbiter.observers.run_ended(run)  # telemetry, tripwires, seccomp fds, gateway
    else:  # a kill's: after its answer (`answer_out`), or at a read of the run before that
        arbiter.unobserved[run.id] = run
    if live.handle is None:
        live.done.set()
        return
    cleanup = arbiter.track(asyncio.ensure_future(clean_up(arbiter, live, after)))
    arbiter.cleanups[run.id] = cleanup
    cleanup.add_done_callback(lambda _t: arbiter.cleanups.pop(run.id, None))


async def clean_up(arbiter: Arbiter, live: LiveRun, after: asyncio.Future[None] | None = None
                   ) -> dict[str, Any]:
    """Step 6: the runtime's state, the bundle, the cgroup directories. A failure is
    audited here; every kill's cleanups are also audited together (`audit_cleanup`).
    `after` (every kill): not before this gate opens, once the kill's answer is out."""
    assert live.handle is not None
    run = live.record
    outcome = "ok"
    detail: dict[str, Any] = {"run": run.id, "cause": run.end_cause, "outcome": outcome}
    t0 = time.perf_counter()
    try:
        if after is not None:
            await asyncio.wait({after}, timeout=3 * _CLEANUP_WAIT)  # bounded twice over
        async with arbiter.cleanup_slots:  # a few at a time: each spawn holds the loop
            t0 = time.perf_counter()
            await live.handle.cleanup()
    except Exception as exc:
        outcome = detail["outcome"] = "failed"
        detail["error"] = f"{type(exc).__name__}: {exc}"
        log.exception("run %s: cleanup failed", run.id)
    finally:
        live.handle.cgroup.release()
        live.done.set()
    detail["cleanup_ms"] = round((time.perf_counter() - t0) * 1000, 3)
    if outcome != "ok":  # a clean cleanup is in the log; a failed one is evidence
        arbiter.audit.append(actor=SYSTEM.label(), verb="cleanup", scope=f"agent:{run.agent}",
                          target=run.agent, outcome=outcome, detail=detail)
    log.info("run %s cleaned up (%s) in %.1f ms", run.id, outcome, detail["cleanup_ms"])
    return detail


def audit_cleanup(arbiter: Arbiter, run_ids: list[str], scope: str, verb: str,
                  target: str | None = None) -> None:
    """Step 6 of the runs a kill ended, one audit row once all are done (after the answer):
    for one agent as for a class or every agent."""
    tasks = [arbiter.cleanups[run_id] for run_id in run_ids if run_id in arbiter.cleanups]
    if tasks:
        audit = arbiter._spawn(audit_cleanups(arbiter, tasks, scope, verb, target))
        arbiter._cleanup_audits.add(audit)
        audit.add_done_callback(arbiter._cleanup_audits.discard)


async def audit_cleanups(arbiter: Arbiter, tasks: list[asyncio.Task[dict[str, Any]]], scope: str,
                         verb: str, target: str | None = None) -> None:
    """One row for the runtime cleanup that followed a kill's answer."""
    t0 = time.perf_counter()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    details = [d for d in done if isinstance(d, dict)]
    failed = [d["run"] for d in details if d.get("outcome") != "ok"]
    detail: dict[str, Any] = {
        "runs": len(tasks), "failed": failed,
        "after_answer_ms": round((time.perf_counter() - t0) * 1000, 3),
        "slowest_ms": max((d.get("cleanup_ms", 0.0) for d in details), default=None)}
    if len(details) == 1:
        detail["run"] = details[0]["run"]
    arbiter.audit.append(
        actor=SYSTEM.label(), verb="cleanup", scope=scope, target=target, reason=f"after {verb}",
        outcome="ok" if not failed and len(details) == len(tasks) else "failed", detail=detail)


async def settled(arbiter: Arbiter, run_id: str, timeout: float | None = None) -> None:
    """Until the run has ended and its cleanup (step 6) is done."""
    live = arbiter.live.get(run_id)
    if live is not None:
        await asyncio.wait_for(live.done.wait(), timeout)
        return
    cleanup = arbiter.cleanups.get(run_id)
    if cleanup is not None:
        await asyncio.wait_for(asyncio.shield(cleanup), timeout)


async def run_kill(arbiter: Arbiter, live: LiveRun) -> RunKill | None:
    """Steps 2-5 of one run, once its launch has made something to kill (None: it never
    got that far; its credentials are revoked all the same)."""
    if not live.ready.is_set():
        with contextlib.suppress(Exception):
            await arbiter.credentials.revoke(live.record.id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.ready.wait(), _LAUNCH_WAIT)
    if live.handle is None:
        return None
    return RunKill(live.record.id, credentials=arbiter.credentials, cgroup=live.handle.cgroup,
                   network=live.handle, confirm_timeout=arbiter.config.kill.confirm_timeout)


async def kill_agents(arbiter: Arbiter, agents: list[AgentRecord], actor: Actor, reason: str,
                      scope: str, *,
                      verb: str = "kill", agent_verb: Verb = Verb.KILL,
                      cause: EndCause = EndCause.KILLED, arrived: float | None = None,
                      whole_parent: bool = False, presignal: PreSignal | None = None,
                      after_answer: Callable[[Callable[[], None]], None] | None = None
                      ) -> list[AgentResult | SupervisorError]:
    """The kill path for one agent or many: step 1 for all before any await (its store
    write beside the confirmation), steps 2-5 in one sweep, then each agent's kill audited
    (the rows handed to the writer at once) and each run finalised. A scoped halt waits for
    the writer to commit the rows first (at most ROWS_ON_LOOP, in the loop's thread, which
    the answer would spend waiting anyway); a single agent's kill finalises its run while
    the writer commits. With `whole_parent` (a global halt), step 3 is one write to the
    parent cgroup. `presignal`: what the owners' acceptor SIGKILLed for this request before
    the loop saw it; each run's row says so, and its runs are this kill's to account for.

    `after_answer` (the API's action handler, which writes the answer itself): a scoped
    halt whose rows are durable by then and whose every run the kernel confirmed hands its
    records, its log line and its cleanup's audit to it, and returns at once: the answer
    says what the rows say, and the records follow it in the same turn of the loop, before
    any other request is read (supervisor/api/server.py, `AfterAnswer`)."""
    t0 = arrived if arrived is not None else time.perf_counter()
    arrived_at = time.time() - (time.perf_counter() - t0)
    cpu0 = time.process_time()  # the daemon's CPU (all its threads) from here to the records
    marks: list[tuple[AgentRecord, AgentState, AgentState, LiveRun | None]] = []
    for agent in agents:  # step 1
        previous, new = arbiter._set_agent_state(agent, agent_verb, actor, reason)
        marks.append((agent, previous, new, arbiter._live_of(agent)))
    if presignal is not None:  # each of these runs gets this kill's row (`judge`)
        presignal.claimed.update(live.record.id for *_mark, live in marks if live is not None)
    owned: list[LiveRun] = []
    rekill: list[LiveRun] = []
    for _agent, _previous, _new, live in marks:
        if live is None or live.ending is EndCause.EXITED:
            continue
        if live.ending in _KILLING:
            rekill.append(live)  # another kill owns it; SIGKILL again all the same
        else:
            live.ending = cause  # a graceful stop in its grace period is overtaken
            owned.append(live)
    owned_ids = {live.record.id for live in owned}
    scoped = len(marks) > 1 or whole_parent
    kills: dict[str, RunKill] = {}
    covered: set[str] = set()
    prefix = arbiter.parent_path + "/"
    # A run whose launch is done gets its RunKill at once; only launches still in flight are
    # waited for, together (a task per run cost a turn of a busy loop each before step 2).
    in_flight = [live for live in owned + rekill if not live.ready.is_set()]
    marked = [agent for agent, _previous, _new, _live in marks]

    def write_marks() -> None:  # step 1's store write (in memory it is done)
        arbiter.store.put_agents(marked)

    if in_flight:  # a launch may hold us for seconds: the marks go to disk first
        write_marks()
    waited = dict(zip((live.record.id for live in in_flight), await asyncio.gather(
        *(run_kill(arbiter, live) for live in in_flight)), strict=True)) if in_flight else {}
    for live in owned + rekill:
        kill = (waited[live.record.id] if live.record.id in waited
                else await run_kill(arbiter, live))
        if kill is not None:
            kills[live.record.id] = kill
            if whole_parent and live.record.cgroup.startswith(prefix):
                covered.add(live.record.id)
    t_ready = time.perf_counter()
    # Unless a launch was waited for, step 1's store write is done while the kernel empties
    # the cgroups, after every SIGKILL (DESIGN.md's step 1 is the mark in memory, above).
    sweep_line: list[str] = []  # logged with the kill's own line, after the answer
    await sweep(list(kills.values()), arbiter.parent if covered else None, frozenset(covered),
                beside=None if in_flight else write_marks,
                hush=functools.partial(arbiter.observers.hush, [
                    (live.record, live.handle) for live in owned + rekill
                    if live.handle is not None and live.record.id in kills],
                    seccomp_hushed=frozenset() if presignal is None else frozenset(
                        presignal.hushed)),
                signalled=None if presignal is None else {
                    run_id: mechanism for run_id, mechanism in presignal.mechanism.items()
                    if mechanism == "cgroup.kill"},
                log_line=sweep_line)
    t_swept = time.perf_counter()

    answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    who = (actor.label(), actor_detail(actor))  # once for every row, not once per agent
    try:
        verdicts = [await judge(arbiter, agent, previous, new, live, kills, actor, reason,
                                scope, verb, cause, t0, arrived_at,
                                owner=live is not None and live.record.id in owned_ids,
                                scoped=scoped, presignal=presignal, who=who)
                    for agent, previous, new, live in marks]
        # The audit rows first, to the writer together (one commit): the answer waits until
        # they are durable.
        with arbiter.audit.batch():
            for verdict in verdicts:
                arbiter.audit.append(**verdict.row)
        t_audited = time.perf_counter()
        durable = False
        if scoped:
            # Wait for them here, the GIL released, before the records: written beside the
            # writer's commit, the records took turns with it at the GIL, and the answer
            # then waited for the writer's hand-back through the loop (1.0-1.6 ms after
            # the records in a class halt, docs/benchmarks.md run 12). Bounded: a writer that
            # is slow (a full disk, a retry) leaves the records to go on beside it.
            durable = arbiter.audit.flush_blocking(ROWS_ON_LOOP)
        t_durable = time.perf_counter()

        def records() -> None:
            t_records = time.perf_counter()
            # Every agent's and run's record in one transaction.
            with arbiter.store.batch():
                for verdict in verdicts:
                    verdict.end(answered)
            t_recorded = time.perf_counter()
            for line in sweep_line:
                log.info("%s", line)
            log.log(logging.WARNING if scoped else logging.INFO,
                    "%s of %d agents, %d runs (%s) by %s (%s): queued %.1f ms, steps 2-5 %.1f "
                    "ms, audit rows %.1f ms (durable %.1f ms later), records %.1f ms%s; daemon "
                    "CPU %.1f ms", verb, len(marks), len(kills), scope, actor.label(),
                    reason or "no reason", ms_since(t0, t_ready), ms_since(t_ready, t_swept),
                    ms_since(t_swept, t_audited), ms_since(t_audited, t_durable),
                    ms_since(t_records, t_recorded),
                    f" (after the answer, {ms_since(t_durable, t_records):.1f} ms after the "
                    "rows were durable)" if deferred else "",
                    (time.process_time() - cpu0) * 1000)
            # Step 6 of the runs this kill ended (not those another kill owns: that one
            # audits them).
            audit_cleanup(arbiter, [run_id for run_id in kills if run_id in owned_ids], scope,
                          verb, target=marks[0][0].name if len(marks) == 1 and not scoped
                          else None)

        # The answer first when it can say all there is to say: every row durable and every
        # run confirmed (an unconfirmed one's answer is an error, and its run is handed to
        # `keep_killing` by its record).
        deferred = (after_answer is not None and durable
                    and all(verdict.row["outcome"] == "ok" for verdict in verdicts))
        if after_answer is not None and deferred:
            after_answer(records)
        else:
            records()
    finally:  # once every row is appended: step 6 of this kill's runs waits on this gate
        arbiter.track(asyncio.ensure_future(answer_out(arbiter, answered)))
    return [v.result for v in verdicts]


async def answer_out(arbiter: Arbiter, answered: asyncio.Future[None]) -> None:
    """Open a kill's gate for step 6 once its audit rows are durable (what the answer waits
    for) and the loop has turned once more: the answer is written before any runtime process
    is spawned (a hundred spawns held a global halt's answer for seconds); an answer sent
    from a thread (a fleet ack) is out too. One gate for all of a kill's runs: a wait of its
    own in each run's cleanup was a hundred tasks waking in front of a global halt's answer."""
    try:
        await arbiter.audit.flushed(_CLEANUP_WAIT)
        await arbiter.answers_out(_CLEANUP_WAIT)
        await asyncio.sleep(0)
    finally:
        observe_ended(arbiter)
        answered.set_result(None)


def observe_ended(arbiter: Arbiter, run_id: str | None = None) -> None:
    """Tell the observers (telemetry summary, tripwires, seccomp fds, gateway) of the runs a
    kill ended, or of `run_id` only: after the kill's answer, since for a hundred runs they
    were half of the records in front of it (docs/benchmarks.md run 11), or at once when
    a read of that run comes first, so no read sees an ended run still observed as live.
    Their store writes (the telemetry summaries) in one transaction."""
    if run_id is not None:
        runs = [arbiter.unobserved.pop(run_id)] if run_id in arbiter.unobserved else []
    else:
        runs = list(arbiter.unobserved.values())
        arbiter.unobserved.clear()
    if runs:
        with arbiter.store.batch():
            for run in runs:
                arbiter.observers.run_ended(run)


@dataclass
class Verdict:
    """What a kill did to one agent: its audit row, its answer, and `end` (the run's records:
    finalised, or left to `keep_killing` if the kernel has not confirmed), which runs once
    the row is appended."""

    row: dict[str, Any]
    result: AgentResult | SupervisorError
    end: Callable[[asyncio.Future[None]], None]


def _nothing_to_end(_answered: asyncio.Future[None]) -> None:
    pass


async def judge(arbiter: Arbiter, agent: AgentRecord, previous: AgentState, new: AgentState,
                live: LiveRun | None, kills: dict[str, RunKill], actor: Actor, reason: str,
                scope: str, verb: str, cause: EndCause, t0: float, arrived_at: float, *,
                owner: bool, scoped: bool, presignal: PreSignal | None = None,
                who: tuple[str, dict[str, Any]] | None = None) -> Verdict:
    """`who`: the actor's label and detail, made once for all of a kill's agents (a
    model dump each)."""
    label, actor_fields = who if who is not None else (actor.label(), actor_detail(actor))
    detail: dict[str, Any] = {"actor": actor_fields, "cause": cause.value,
                              "request_arrived_at": round(arrived_at, 6)}
    if presignal is not None and live is not None:
        sigkill = presignal.detail(live.record.id)
        if sigkill is not None:  # sent at the owners' acceptor, before the loop saw it
            detail["sigkill"] = sigkill
    time_to_halt_ms: float | None = None
    outcome = "ok"
    report: HaltReport | None = None
    kill: RunKill | None = None
    end = _nothing_to_end
    if live is not None and live.ending is EndCause.EXITED:
        await live.done.wait()  # the command ended by itself a moment ago
        detail["note"] = "the run had already exited"
    elif live is not None:
        kill = kills.get(live.record.id)
        if kill is None:
            detail.update(run=live.record.id, note="the run had not been created yet")
            time_to_halt_ms = ms_since(t0, time.perf_counter())
        else:
            report = kill.report
            detail.update(report.detail())
            time_to_halt_ms = ms_since(t0, report.halted_at or time.perf_counter())
        if not owner:
            detail["note"] = "another kill of this run is under way"
        elif report is not None and not report.confirmed:
            # Not done until the kernel says so: the run stays tracked as "killing" and
            # is killed again in the background until its cgroup is empty.
            outcome = "unconfirmed"
            assert kill is not None
            end = functools.partial(_unconfirmed, arbiter, live, kill, agent, actor, verb,
                                    reason, t0)
        else:
            # Step 6 waits for the answer for one agent too: its runc delete and bundle
            # removal, on the loop, held a single kill's answer under load.
            end = functools.partial(_finalised, arbiter, live, cause, time_to_halt_ms,
                                    f"{verb}: {reason}" if reason else verb)
    row = dict(actor=label, verb=verb, scope=scope, target=agent.name, reason=reason,
               previous_state=previous.value, new_state=new.value,
               time_to_halt_ms=time_to_halt_ms, outcome=outcome, detail=detail)
    # A scoped halt logs one line for all (kill_agents): a line per agent would be written,
    # to a journal that may be slow, while the answer waits.
    log.log(logging.DEBUG if scoped else logging.WARNING,
            "%s agent %s by %s (%s): time_to_halt_ms=%s", verb, agent.name, label,
            reason or "no reason", time_to_halt_ms)
    if outcome == "unconfirmed":
        return Verdict(row, KillUnconfirmed(
            f"agent {agent.name}: the kernel still reports processes after escalation",
            agent=agent.name, survivors=detail.get("survivors", []),
        ), end)
    return Verdict(row, AgentResult(agent=agent.name, previous_state=previous.value,
                                    new_state=new.value,
                                    run_id=live.record.id if live else None,
                                    time_to_halt_ms=time_to_halt_ms), end)


def _finalised(arbiter: Arbiter, live: LiveRun, cause: EndCause, time_to_halt_ms: float | None,
               reason: str, answered: asyncio.Future[None]) -> None:
    finalise(arbiter, live, cause, exit_code=exit_status(live),
             time_to_halt_ms=time_to_halt_ms, reason=reason, after=answered)


def _unconfirmed(arbiter: Arbiter, live: LiveRun, kill: RunKill, agent: AgentRecord,
                 actor: Actor, verb: str, reason: str, t0: float,
                 _answered: asyncio.Future[None]) -> None:
    arbiter._set_run_state(live.record, Verb.KILL_UNCONFIRMED)
    arbiter.store.put_run(live.record)
    live.watcher = arbiter._spawn(keep_killing(arbiter, live, kill, agent, actor, verb,
                                               reason, t0))


async def keep_killing(arbiter: Arbiter, live: LiveRun, kill: RunKill, agent: AgentRecord,
                       actor: Actor, verb: str, reason: str, t0: float) -> None:
    """Retry an unconfirmed kill until the kernel reports the cgroup empty."""
    attempts = await kill.keep_killing()
    await kill.teardown_off_loop()
    time_to_halt_ms = ms_since(t0, kill.report.halted_at or time.perf_counter())
    assert live.ending is not None
    finalise(arbiter, live, live.ending, exit_code=exit_status(live),
             time_to_halt_ms=time_to_halt_ms, reason=f"{verb}: {reason}" if reason else verb)
    arbiter.audit.append(
        actor=actor.label(), verb="kill_confirmed", scope=f"agent:{agent.name}",
        target=agent.name, previous_state=AgentState.KILLED.value,
        new_state=agent.state, time_to_halt_ms=time_to_halt_ms,
        detail={"run": live.record.id, "attempts": attempts},
    )
    log.warning("kill of agent %s confirmed after %d attempts: time_to_halt_ms=%s",
                agent.name, attempts, time_to_halt_ms)
    audit_cleanup(arbiter, [live.record.id], f"agent:{agent.name}", verb, target=agent.name)
