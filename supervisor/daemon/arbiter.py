"""The arbiter: the registry of agents and runs, the views of them, and the scope of every
verb (one agent, a class, global). Runs in the daemon's event loop; touches the kernel only
through the Runtime seam and the kill path.

What a verb does lives beside it, one concern a module: launching.py (a run's start),
ending.py (every way a run ends: the kill, its exit, its window, the one door `finalise`),
verbs.py (pause, resume, reactivate, graceful stop); killpath.py holds kill steps 2-5."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supervisor.audit import AuditLog
from supervisor.config import Config
from supervisor.daemon import ending, launching, verbs
from supervisor.daemon.killpath import Credentials, NoCredentials, ParentCgroup
from supervisor.daemon.liverun import SYSTEM, LiveRun, actor_detail, held_pause
from supervisor.daemon.observers import RunObservers
from supervisor.daemon.store import AgentRecord, RunRecord, Store
from supervisor.daemon.workspace_access import WorkspaceAdmission, admit_workspace
from supervisor.errors import (
    AgentBusy,
    AgentNotFound,
    IllegalTransition,
    RunNotFound,
    SupervisorError,
    did_you_mean,
)
from supervisor.models import (
    ActionRequest,
    ActionResult,
    Actor,
    AgentResult,
    RunRequest,
    RunView,
    Scope,
)
from supervisor.profiles import Profile
from supervisor.runtime.base import NetworkAttachment, Runtime
from supervisor.runtime.output_index import index_path
from supervisor.sandbox.killindex import KillIndex, PreSignal
from supervisor.states import (
    AgentState,
    EndCause,
    IllegalTransitionError,
    RunState,
    Verb,
    agent_at_end,
    agent_can,
    agent_transition,
    run_end,
    run_transition,
)

if TYPE_CHECKING:  # an agent's view is made on request only (supervisor/models/views.py)
    from supervisor.models.views import AgentView

log = logging.getLogger(__name__)

GLOBAL_HALT_KEY = "global_halt"
# How long a stopping daemon waits for the stops whose grace it cut to reach the kill path
# (Arbiter.cut_graces): a few turns of the loop; the bound only keeps a stuck one from
# holding the shutdown.
GRACE_CUT_WAIT = 1.0
__all__ = ["GLOBAL_HALT_KEY", "SYSTEM", "Arbiter", "LiveRun"]


# (command, profile, workspace, env, image): raises CommandNotFound (sandbox/command.py).
CommandCheck = Callable[[list[str], Profile, str | None, dict[str, str], str | None], None]
# Network mode "gateway": the attachment the runtime plumbs in, and the sandbox's proxy env.
NetworkProvider = Callable[[LiveRun], Awaitable[tuple[NetworkAttachment, dict[str, str]]]]


class Arbiter:
    def __init__(self, config: Config, store: Store, audit: AuditLog, runtime: Runtime, *,
                 credentials: Credentials | None = None, parent: ParentCgroup | None = None,
                 parent_path: str | None = None, command_check: CommandCheck | None = None,
                 observers: RunObservers | None = None) -> None:
        self.config = config
        # Refuses a command the sandbox's root does not have, before anything is registered
        # (sandbox/command.py); None where the runtime is a fake with no root to look in.
        self.command_check = command_check
        self.store = store
        self.audit = audit
        self.runtime = runtime
        # Kill step 2: the tokens runs hold (the egress gateway, once it is wired in).
        self.credentials: Credentials = credentials or NoCredentials()
        # Every run's cgroup lives under `parent` (held open): a global halt is one write.
        self.parent = parent
        self.parent_path = (parent_path or config.sandbox.cgroup_parent).strip("/")
        # The live runs' cgroup.kill files for the owners' acceptor thread, which SIGKILLs an
        # owner's kill before the loop sees it (sandbox/killindex.py, api/presignal.py).
        self.kill_index = KillIndex()
        if parent is not None:
            self.kill_index.hold_parent(parent)
        self.agents: dict[str, AgentRecord] = {a.name: a for a in store.agents()}
        self.live: dict[str, LiveRun] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        # Told of each run's start and end, pause, resume, reconcile and agent change, each
        # by name (daemon/observers.py): telemetry, tripwires, seccomp, gateway, fleet.
        self.observers = observers or RunObservers()
        # Network mode "gateway" (supervisor/daemon/egress.py): None refuses such profiles.
        self.network_provider: NetworkProvider | None = None
        # Awaited before any run's command starts (after its sandbox is created): an embedded
        # CI run's watchdog still being spawned and moved into its cgroup (daemon/core.py).
        self.before_start: Callable[[], Awaitable[None]] | None = None
        # Which workspace a caller may launch on (daemon/workspace_access.py); it needs root,
        # so the unit tier puts a fake here.
        self.admit_workspace: WorkspaceAdmission = admit_workspace
        self.global_halt = store.get_meta(GLOBAL_HALT_KEY) is not None
        self.shutting_down = False
        # Set with why (cut_graces) when the daemon stops or restarts: every graceful stop
        # still in its grace period goes to the kill path at once (daemon/verbs.py stop_agent).
        self.graces_cut = asyncio.Event()
        self.graces_cut_reason = ""
        # One future per stop in its grace period, done once its grace is over (its kill path
        # owns the run, or the run ended): what cut_graces waits for.
        self.in_grace: set[asyncio.Future[None]] = set()
        self.bundles_dir = config.daemon.runtime_dir / "bundles"
        self.logs_dir = config.logs_dir
        self._tasks: set[asyncio.Task[Any]] = set()
        # Step 6 of ended runs, after the answer: run id -> its cleanup.
        self.cleanups: dict[str, asyncio.Task[dict[str, Any]]] = {}
        # Runs a kill ended whose observers are told after its answer (ending.observe_ended).
        self.unobserved: dict[str, RunRecord] = {}
        # Step 6 runs at most this many runtime cleanups at once (each spawns a process from
        # the loop); enough that a hundred finish well within shutdown's wait on a busy host.
        self.cleanup_slots = asyncio.Semaphore(32)
        # Answers to a kill that are written off the loop and not yet out (a fleet ack on its
        # way to the store, daemon/fleet.py): step 6 waits for them, since its runtime
        # processes would take the CPU from the answer (and, on a shared host, from the other
        # daemons' kills).
        self.answers_pending: set[asyncio.Future[None]] = set()
        self._cleanup_audits: set[asyncio.Task[Any]] = set()

    # ----------------------------------------------------------------- helpers

    def _lock(self, name: str) -> asyncio.Lock:
        return self.locks.setdefault(name, asyncio.Lock())

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        return self.track(asyncio.ensure_future(coro))

    async def answers_out(self, timeout: float) -> None:
        """Until every answer pending now is out, or `timeout` seconds."""
        if self.answers_pending:
            await asyncio.wait(list(self.answers_pending), timeout=timeout)

    def track(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Keep a background task alive until it ends; shutdown cancels what is left."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _agent(self, name: str) -> AgentRecord:
        try:
            return self.agents[name]
        except KeyError:
            close = did_you_mean(name, self.agents)
            raise AgentNotFound(f"no agent named {name!r}"
                                + (f"; did you mean {', '.join(close)}?" if close else ""),
                                agent=name, did_you_mean=close) from None

    def _live_of(self, agent: AgentRecord) -> LiveRun | None:
        return self.live.get(agent.current_run) if agent.current_run else None

    def _set_agent_state(self, agent: AgentRecord, verb: str, actor: Actor, reason: str
                         ) -> tuple[AgentState, AgentState]:
        previous = AgentState(agent.state)
        try:
            new = agent_transition(previous, verb)
        except IllegalTransitionError as exc:
            raise IllegalTransition(
                f"cannot {verb} agent {agent.name!r}: it is {previous.value}",
                agent=agent.name, verb=verb, state=previous.value, allowed_from=exc.allowed_from,
            ) from None
        agent.state = new.value
        agent.updated_at = time.time()
        agent.last_actor = actor.label()
        agent.last_reason = reason
        self.observers.agents_changed()
        return previous, new

    def index_run(self, live: LiveRun) -> None:
        """A started or adopted run's cgroup.kill, for the owners' acceptor. Never fails a
        launch: a run that is not indexed is left to the loop's kill path."""
        agent = self.agents.get(live.record.agent)
        try:
            self.kill_index.hush = getattr(self.observers.seccomp, "hush", None)
            if live.handle is not None and agent is not None:
                self.kill_index.add(live.record.id, agent.name, agent.agent_class,
                                    live.handle.cgroup, container_id=live.record.container_id,
                                    watcher=live.handle)
        except Exception:
            log.exception("run %s: not indexed for the owners' acceptor", live.record.id)

    def _set_run_state(self, run: RunRecord, verb: str) -> None:
        run.state = run_transition(RunState(run.state), verb).value

    def _free_slot(self) -> int:
        used = {lr.record.uid_slot for lr in self.live.values()}
        for slot in range(self.config.sandbox.max_runs):
            if slot not in used:
                return slot
        raise AgentBusy(
            f"all {self.config.sandbox.max_runs} run slots are in use",
            max_runs=self.config.sandbox.max_runs,
        )

    def _refuse(self, error: SupervisorError, actor: Actor, verb: str, scope: str,
                target: str | None, reason: str) -> SupervisorError:
        """Audit a policy refusal so every 'no' is explainable from the log."""
        self.audit.append(
            actor=actor.label(), verb=verb, scope=scope, target=target, reason=reason,
            outcome=f"refused:{error.code}",
            detail={"message": error.message, "actor": actor_detail(actor)},
        )
        return error

    # ----------------------------------------------------------------- views

    def run_view(self, run: RunRecord) -> RunView:
        return RunView(
            id=run.id, agent=run.agent, state=run.state, command=run.command,
            profile=run.profile, workspace=run.workspace, pid=run.pid,
            started_at=run.started_at, ended_at=run.ended_at, exit_code=run.exit_code,
            time_to_halt_ms=run.time_to_halt_ms, end_reason=run.end_reason, timeout=run.timeout,
        )

    def agent_view(self, name: str) -> AgentView:
        agent = self._agent(name)
        run_id = agent.current_run or agent.last_run
        if run_id in self.unobserved:  # its telemetry is read next: final, not live
            ending.observe_ended(self, run_id)
        live = self.live.get(run_id) if run_id else None
        record = live.record if live else (self.store.run(run_id) if run_id else None)
        from supervisor.models.views import AgentView

        return AgentView(
            name=agent.name, agent_class=agent.agent_class, profile=agent.profile,
            state=agent.state, created_at=agent.created_at, updated_at=agent.updated_at,
            last_reason=agent.last_reason, last_actor=agent.last_actor,
            run=self.run_view(record) if record else None,
            time_to_halt_ms=record.time_to_halt_ms if record else None,
        )

    def list_agents(self) -> list[AgentView]:
        return [self.agent_view(name) for name in sorted(self.agents)]

    def get_run(self, run_id: str) -> tuple[RunRecord, LiveRun | None]:
        if run_id in self.unobserved:  # its telemetry may be read next: final, not live
            ending.observe_ended(self, run_id)
        live = self.live.get(run_id)
        if live:
            return live.record, live
        record = self.store.run(run_id)
        if record is None:
            raise RunNotFound(f"no run with id {run_id!r}", run=run_id)
        return record, None

    def resolve_run(self, ref: str) -> tuple[RunRecord, LiveRun | None]:
        """A run by id, or the current (else last) run of the agent named `ref`."""
        if ref in self.agents:
            agent = self.agents[ref]
            run_id = agent.current_run or agent.last_run
            if run_id is None:
                raise RunNotFound(f"agent {ref!r} has never run", agent=ref)
            return self.get_run(run_id)
        try:
            return self.get_run(ref)
        except RunNotFound:
            raise AgentNotFound(f"no agent or run named {ref!r}", agent=ref) from None

    # ----------------------------------------------------------------- runs start and end

    async def launch(self, request: RunRequest, actor: Actor) -> RunView:
        return await launching.launch(self, request, actor)

    async def settled(self, run_id: str, timeout: float | None = None) -> None:
        """Until the run has ended and its cleanup (step 6) is done."""
        await ending.settled(self, run_id, timeout)

    def _finalise(self, live: LiveRun, cause: EndCause, *, exit_code: int | None = None,
                  time_to_halt_ms: float | None = None, reason: str = "") -> None:
        """The one door every run leaves by (ending.finalise)."""
        ending.finalise(self, live, cause, exit_code=exit_code,
                        time_to_halt_ms=time_to_halt_ms, reason=reason)

    async def _kill(self, agents: list[AgentRecord], actor: Actor, reason: str, scope: str, *,
                    verb: str = "kill", agent_verb: Verb = Verb.KILL,
                    cause: EndCause = EndCause.KILLED, arrived: float | None = None,
                    whole_parent: bool = False, presignal: PreSignal | None = None,
                    after_answer: Callable[[Callable[[], None]], None] | None = None
                    ) -> list[AgentResult | SupervisorError]:
        """The kill path for one agent or many (ending.kill_agents). The telemetry sampler
        stands aside meanwhile: its /proc walk would take a core from the dying processes and
        the GIL from this loop; and no audit checkpoint starts, since one would sit in front
        of the kill's rows (AuditLog.kill_under_way); nor does the garbage collector
        (ending.collector_held). With `after_answer`, all three last until the answer is
        written and the work left for after it is done: a checkpoint begun as the answer is
        written would take the GIL from it."""
        aside = contextlib.ExitStack()
        aside.enter_context(self.observers.killing())
        aside.enter_context(self.audit.kill_under_way())
        aside.enter_context(ending.collector_held())
        try:
            results = await ending.kill_agents(self, agents, actor, reason, scope, verb=verb,
                                               agent_verb=agent_verb, cause=cause,
                                               arrived=arrived, whole_parent=whole_parent,
                                               presignal=presignal, after_answer=after_answer)
        except BaseException:
            aside.close()
            raise
        if after_answer is None:
            aside.close()
        else:
            after_answer(aside.close)
        return results


    # ----------------------------------------------------------------- scoped actions

    def _targets(self, scope: Scope) -> list[AgentRecord]:
        if scope.agent is not None:
            return [self._agent(scope.agent)]
        if scope.agent_class is not None:
            return [a for a in self.agents.values() if a.agent_class == scope.agent_class]
        return list(self.agents.values())

    def halt_globally(self, actor: Actor, reason: str, agents: list[AgentRecord],
                      **detail: Any) -> None:
        """Set the global halt (no launch until an owner reactivates every agent) and its
        audit row, committed with the kill's rows (the writer is woken for them): woken for
        this row alone, the writer committed it and signed a checkpoint while the kill sent
        its SIGKILLs (docs/benchmarks.md, fleet "Fourth pass")."""
        self.global_halt = True
        self.store.set_meta(GLOBAL_HALT_KEY, f"{actor.label()}: {reason}")
        self.audit.append(actor=actor.label(), verb="global_halt", scope="global",
                          reason=reason, detail={"actor": actor_detail(actor),
                                                 "agents": sorted(a.name for a in agents),
                                                 **detail},
                          wake=False)

    async def act(self, verb: str, request: ActionRequest, actor: Actor, *,
                  cause: EndCause = EndCause.KILLED, arrived: float | None = None,
                  presignal: PreSignal | None = None,
                  after_answer: Callable[[Callable[[], None]], None] | None = None
                  ) -> ActionResult:
        """Apply `verb` to one agent, a class or every agent.

        A single agent in the wrong state is a 409; in a class or global scope, agents for
        which the verb does not apply are reported as skipped and left untouched. A kill's
        `cause` says why runs it ends ended; `arrived` (perf_counter) is when the request
        was read off its source, where time_to_halt_ms starts; `presignal`, what the owners'
        acceptor SIGKILLed for this request before the loop saw it (its audit rows say so).
        `after_answer` (a caller that writes the answer itself, then runs what it was
        handed): a kill may leave its records until its answer is written
        (ending.kill_agents)."""
        if arrived is None:
            arrived = time.perf_counter()
        scope = request.scope
        scope_text = scope.describe()
        targets = self._targets(scope)
        reason = request.reason
        if verb == Verb.KILL and scope.kind == "global":
            self.halt_globally(actor, reason, targets)
        if verb == Verb.REACTIVATE and scope.kind == "global" and self.global_halt:
            self.global_halt = False
            self.store.set_meta(GLOBAL_HALT_KEY, None)
            self.audit.append(actor=actor.label(), verb="lift_global_halt", scope="global",
                              reason=reason, detail={"actor": actor_detail(actor)})

        single = scope.kind == "agent"
        results: list[AgentResult] = []
        chosen: list[AgentRecord] = []
        for agent in targets:
            state = AgentState(agent.state)
            if not self._applies(verb, agent, state):
                if single:
                    error = IllegalTransition(
                        f"cannot {verb} agent {agent.name!r}: it is {state.value}",
                        agent=agent.name, verb=verb, state=state.value,
                    )
                    raise self._refuse(error, actor, verb, scope_text, agent.name, reason)
                results.append(AgentResult(agent=agent.name, previous_state=state.value,
                                           new_state=state.value, skipped=f"{state.value}"))
                continue
            chosen.append(agent)
        outcomes: list[AgentResult | BaseException]
        if verb == Verb.KILL:
            try:
                outcomes = list(await self._kill(chosen, actor, reason, scope_text,
                                                 cause=cause, arrived=arrived,
                                                 whole_parent=scope.kind == "global",
                                                 presignal=presignal,
                                                 after_answer=after_answer))
            finally:
                self.audit.wake()  # the global_halt row, if the kill appended none
        else:
            outcomes = list(await asyncio.gather(
                *(self._dispatch(verb, agent, actor, reason, scope_text, request.grace)
                  for agent in chosen), return_exceptions=True))
        errors: list[SupervisorError] = []
        for agent, outcome in zip(chosen, outcomes, strict=True):
            if isinstance(outcome, SupervisorError):
                errors.append(outcome)
                results.append(AgentResult(
                    agent=agent.name, previous_state="?", new_state=agent.state,
                    error={"code": outcome.code, "message": outcome.message},
                ))
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                results.append(outcome)
        results.sort(key=lambda r: r.agent)
        if errors:
            # Never answer a scoped action as if it worked while any agent in it failed: the
            # first error, with every agent's result, so the operator sees who is still up.
            first = errors[0]
            first.detail.setdefault("results", [r.model_dump(exclude_none=True)
                                                for r in results])
            first.detail.setdefault("failed", sorted(r.agent for r in results if r.error))
            raise first
        halts = [r.time_to_halt_ms for r in results if r.time_to_halt_ms is not None]
        return ActionResult(
            verb=verb, scope=scope_text, reason=reason, actor=actor.label(), results=results,
            time_to_halt_ms=max(halts) if halts else None, global_halt=self.global_halt,
        )

    def _applies(self, verb: str, agent: AgentRecord, state: AgentState) -> bool:
        if verb in (Verb.RESUME, Verb.REACTIVATE) and held_pause(agent):
            return agent_can(state, Verb.RELEASE)
        if not agent_can(state, verb):
            return False
        if verb == Verb.STOP:
            return agent.current_run is not None
        if verb == Verb.KILL and state == AgentState.KILLED:
            return agent.current_run is not None  # killed again only while a run is alive
        return True

    def _dispatch(self, verb: str, agent: AgentRecord, actor: Actor, reason: str, scope: str,
                  grace: float | None) -> Awaitable[AgentResult]:
        if verb == Verb.PAUSE:
            return verbs.pause_agent(self, agent, actor, reason, scope)
        if verb == Verb.RESUME:
            return verbs.resume_agent(self, agent, actor, reason, scope)
        if verb == Verb.REACTIVATE:
            return verbs.reactivate_agent(self, agent, actor, reason, scope)
        if verb == Verb.STOP:
            return verbs.stop_agent(self, agent, actor, reason, scope,
                                    grace or self.config.kill.default_grace)
        raise ValueError(verb)

    # ----------------------------------------------------------------- lifecycle of the daemon

    async def reconcile(self) -> list[dict[str, Any]]:
        """Kill and clean up what a previous instance left behind, and say so in the audit."""
        reports: list[dict[str, Any]] = []
        adopted = {live.record.container_id for live in self.live.values()}  # a restart's
        for run in self.store.unfinished_runs():
            if run.id in self.live:
                continue
            agent = self.agents.get(run.agent)
            try:  # through the state table, like every ending (ending.finalise)
                run.state = run_end(RunState(run.state), EndCause.REAPED).value
            except (IllegalTransitionError, ValueError):
                log.error("run %s was left in state %r; recorded killed", run.id, run.state)
                run.state = RunState.KILLED.value
            run.end_cause = EndCause.REAPED.value
            run.ended_at = time.time()
            run.end_reason = "reaped at startup: the previous supervisor instance ended"
            self.store.put_run(run)
            if agent is not None and agent.current_run == run.id:
                previous = agent.state
                agent.current_run = None
                agent.last_run = run.id
                agent.state = agent_at_end(AgentState(agent.state), EndCause.REAPED).value
                self.store.put_agent(agent)
                self.audit.append(
                    actor=SYSTEM.label(), verb="reap", scope=f"agent:{run.agent}",
                    target=run.agent, reason=run.end_reason, previous_state=previous,
                    new_state=agent.state, detail={"run": run.id},
                )
        for leftover in await self.runtime.leftovers():
            name = (leftover.container_id or leftover.netns
                    or (leftover.cgroup or "").rpartition("/")[2])
            # An adopted gateway run's stdio MCP servers (`<container>-mcp<n>`) were adopted
            # with it, all of them (daemon/egress.py adopt), or the run was not.
            if name in adopted or name.rpartition("-mcp")[0] in adopted:
                continue
            done = await self.runtime.reap(leftover, self.config.kill.confirm_timeout)
            report = {"container": leftover.container_id, "netns": leftover.netns,
                      "cgroup": leftover.cgroup, **done}
            reports.append(report)
            self.audit.append(
                actor=SYSTEM.label(), verb="reap", scope="global",
                target=leftover.container_id or leftover.netns or leftover.cgroup,
                reason="left by a previous supervisor instance", detail=report,
            )
            log.warning("reaped leftover %s", report)
        self.observers.reconciled()
        return reports

    async def cut_graces(self, why: str, timeout: float = GRACE_CUT_WAIT) -> None:
        """A stopping or restarting daemon waits for no stop's grace period: each stop in its
        grace goes on to the kill path now, audited with `why`, and answers its caller.
        Returns once each one's kill path owns its run (a few turns of the loop; at most
        `timeout`), so the shutdown's own sweep does not take those runs from under them."""
        self.graces_cut_reason = why
        self.graces_cut.set()
        if self.in_grace:
            await asyncio.wait(list(self.in_grace), timeout=timeout)

    async def shutdown(self, reason: str) -> None:
        """Orderly shutdown: every live run goes through the kill path in one sweep, audited;
        then every cleanup finishes before the loop ends."""
        self.shutting_down = True
        agents = [self.agents[live.record.agent] for live in list(self.live.values())
                  if live.ending is None]
        if agents:
            for result in await self._kill(agents, SYSTEM, reason, "global", verb="shutdown",
                                           agent_verb=Verb.SHUTDOWN, cause=EndCause.SHUTDOWN,
                                           whole_parent=True):
                if isinstance(result, SupervisorError):
                    log.critical("shutdown kill failed: %s", result.message)
        # Kills and exits already in flight (started by an operator, a timeout or break-glass)
        # and every cleanup finish before the loop ends; cancelling them would leave state.
        in_flight: list[Awaitable[Any]] = [live.done.wait() for live in self.live.values()]
        in_flight += [asyncio.shield(task) for task in self.cleanups.values()]
        in_flight += [asyncio.shield(task) for task in self._cleanup_audits]
        if in_flight:
            try:
                await asyncio.wait_for(asyncio.gather(*in_flight, return_exceptions=True),
                                       self.config.kill.confirm_timeout * 2)
            except TimeoutError:
                log.critical("shutdown: runs still ending: %s", sorted(self.live))
        for task in list(self._tasks):
            task.cancel()

    def prune_logs(self, retention: float) -> int:
        """Delete the output of runs that ended more than `retention` seconds ago."""
        removed = 0
        for run in self.store.runs_ended_before(time.time() - retention):
            path = Path(run.log_path)
            if path.parent == self.logs_dir and path.exists():
                path.unlink()
                index_path(path).unlink(missing_ok=True)  # the log's time index goes with it
                removed += 1
        if removed:
            self.audit.append(actor=SYSTEM.label(), verb="logs_pruned", scope="global",
                              reason=f"run output older than {retention:g}s",
                              detail={"files": removed})
        return removed

    def forget_agent(self, name: str, actor: Actor, reason: str) -> None:
        """Drop an idle or killed agent from the registry (its runs stay in the history)."""
        agent = self._agent(name)
        if agent.current_run is not None:
            raise AgentBusy(f"agent {name!r} still has a run", agent=name)
        del self.agents[name]
        self.locks.pop(name, None)
        self.store.delete_agent(name)
        self.audit.append(actor=actor.label(), verb="forget", scope=f"agent:{name}",
                          target=name, reason=reason, previous_state=agent.state,
                          detail={"actor": actor_detail(actor)})

    def active_runs(self) -> int:
        return len(self.live)

    def runtime_info(self) -> dict[str, Any]:
        return self.runtime.describe()

