"""The arbiter: the registry of agents and runs and every verb on them. Runs in the daemon's
event loop; touches the kernel only through the Runtime seam and the kill path.

A kill (`_kill`): step 1, mark every target agent killed in memory before any await; steps
2-5 in supervisor/daemon/killpath.py (one sweep for a class or global scope); then each run
ends through `_finalise`, the one door every run leaves by, whatever its `EndCause`; step 6
(runtime state, bundle) runs after the answer, tracked and audited. `time_to_halt_ms` spans
the request's arrival to the network teardown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.audit import AuditLog
from supervisor.config import Config
from supervisor.daemon.killpath import (
    CONFIRMERS,
    Credentials,
    HaltReport,
    NoCredentials,
    RunKill,
    sweep,
)
from supervisor.daemon.store import AgentRecord, RunRecord, Store
from supervisor.daemon.workspace_access import (
    AdmittedWorkspace,
    WorkspaceAdmission,
    admit_workspace,
)
from supervisor.errors import (
    AgentBusy,
    AgentKilled,
    AgentNotFound,
    DiskSpaceLow,
    EgressSetupFailed,
    EnforcementError,
    GlobalHalt,
    IllegalTransition,
    KillUnconfirmed,
    RunNotFound,
    ShuttingDown,
    SupervisorError,
)
from supervisor.models import (
    ActionRequest,
    ActionResult,
    Actor,
    AgentResult,
    AgentView,
    RunRequest,
    RunView,
    Scope,
)
from supervisor.models.tripwire import TripwireRule
from supervisor.profiles import Profile, load_profile
from supervisor.runtime.base import (
    NetworkAttachment,
    RunCgroup,
    RunHandle,
    RunParams,
    Runtime,
)
from supervisor.runtime.output import check_free_space
from supervisor.states import (
    RUN_ENDED,
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

log = logging.getLogger(__name__)

SYSTEM = Actor(kind="system", name="supervisor")
GLOBAL_HALT_KEY = "global_halt"
_LAUNCH_WAIT = 30.0  # a kill waits this long for a launch in flight to reach a killable state
# A run being killed: a second kill only re-sends SIGKILL; the first one finalises it.
_KILLING = frozenset({EndCause.KILLED, EndCause.TIMEOUT, EndCause.TRIPWIRE,
                      EndCause.BREAK_GLASS, EndCause.SHUTDOWN})


@dataclass
class LiveRun:
    record: RunRecord
    handle: RunHandle | None = None
    profile: Profile | None = None
    tripwires: list[TripwireRule] = field(default_factory=list)  # the agent's own overrides
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    ending: EndCause | None = None  # set by whoever finalises the run, before it awaits
    watcher: asyncio.Task[None] | None = None
    timeout_handle: asyncio.TimerHandle | None = None


# (command, profile, workspace, env, image): raises CommandNotFound (sandbox/command.py).
CommandCheck = Callable[[list[str], Profile, str | None, dict[str, str], str | None], None]
# Network mode "gateway": the attachment the runtime plumbs in, and the sandbox's proxy env.
NetworkProvider = Callable[[LiveRun], Awaitable[tuple[NetworkAttachment, dict[str, str]]]]


class Arbiter:
    def __init__(self, config: Config, store: Store, audit: AuditLog, runtime: Runtime, *,
                 credentials: Credentials | None = None, parent: RunCgroup | None = None,
                 parent_path: str | None = None, command_check: CommandCheck | None = None
                 ) -> None:
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
        self.agents: dict[str, AgentRecord] = {a.name: a for a in store.agents()}
        self.live: dict[str, LiveRun] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        # (run_id, cgroup relative path, started_at) once a run is running; (run_id) at its end.
        self.run_started_hooks: list[Callable[[str, str, float], None]] = []
        self.run_ended_hooks: list[Callable[[str], None]] = []
        # Network mode "gateway" (supervisor/daemon/egress.py): None refuses such profiles.
        self.network_provider: NetworkProvider | None = None
        # (run_id) after a pause froze the run / before a resume thaws it.
        self.pause_hooks: list[Callable[[str], Awaitable[None]]] = []
        self.resume_hooks: list[Callable[[str], Awaitable[None]]] = []
        # After reconcile has reaped runs: other leftovers (the gateway's nftables tables).
        self.reconcile_hooks: list[Callable[[], object]] = []
        # Which workspace a caller may launch on (daemon/workspace_access.py); it needs root,
        # so the unit tier puts a fake here.
        self.admit_workspace: WorkspaceAdmission = admit_workspace
        self.global_halt = store.get_meta(GLOBAL_HALT_KEY) is not None
        self.shutting_down = False
        self.bundles_dir = config.daemon.runtime_dir / "bundles"
        self.logs_dir = config.logs_dir
        self._tasks: set[asyncio.Task[Any]] = set()
        # Step 6 of ended runs, after the answer: run id -> its cleanup.
        self.cleanups: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._cleanup_audits: set[asyncio.Task[Any]] = set()

    # ----------------------------------------------------------------- helpers

    def _lock(self, name: str) -> asyncio.Lock:
        return self.locks.setdefault(name, asyncio.Lock())

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        return self.track(asyncio.ensure_future(coro))

    def track(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Keep a background task alive until it ends; shutdown cancels what is left."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _agent(self, name: str) -> AgentRecord:
        try:
            return self.agents[name]
        except KeyError:
            raise AgentNotFound(f"no agent named {name!r}", agent=name) from None

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
        return previous, new

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
            detail={"message": error.message, "actor": _who(actor)},
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
        live = self.live.get(run_id) if run_id else None
        record = live.record if live else (self.store.run(run_id) if run_id else None)
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

    # ----------------------------------------------------------------- launch

    async def launch(self, request: RunRequest, actor: Actor) -> RunView:
        name = request.name or f"agent-{secrets.token_hex(3)}"
        scope = f"agent:{name}"
        if self.shutting_down:
            raise ShuttingDown("the supervisor is shutting down; no new runs")
        if self.global_halt:
            raise self._refuse(
                GlobalHalt("a global halt is in force; an owner must lift it with "
                           "'agentctl reactivate --all'"),
                actor, "launch", scope, name, "")
        try:  # a full disk takes every run's output, the audit log and the state with it
            check_free_space((self.config.daemon.state_dir, self.logs_dir),
                             self.config.disk.min_free_bytes, self.config.disk.min_free_percent)
        except DiskSpaceLow as exc:
            log.error("launch of agent %s refused: %s", name, exc.message)
            raise self._refuse(exc, actor, "launch", scope, name, "") from None
        existing = self.agents.get(name)
        profile_name = request.profile or (existing.profile if existing else
                                           self.config.daemon.default_profile)
        profile = load_profile(profile_name, self.config.daemon.profile_dirs)
        if existing is not None and existing.state == AgentState.KILLED:
            raise self._refuse(
                AgentKilled(f"agent {name!r} was killed ({existing.last_reason or 'no reason'}); "
                            f"an owner must reactivate it first", agent=name,
                            killed_by=existing.last_actor),
                actor, "launch", scope, name, "")
        if existing is not None and _held_pause(existing):
            raise self._refuse(
                IllegalTransition(f"agent {name!r} is paused; resume or reactivate it first",
                                  agent=name, verb="launch", state=existing.state,
                                  paused_by=existing.last_actor),
                actor, "launch", scope, name, "")
        if existing is not None and existing.state != AgentState.IDLE:
            raise AgentBusy(f"agent {name!r} already has a run ({existing.state})", agent=name,
                            run=existing.current_run)
        if self.command_check is not None:
            self.command_check(request.command, profile, request.workspace, request.env,
                               request.image or profile.image)

        async with self._lock(name):
            now = time.time()
            agent = self.agents.get(name) or AgentRecord(
                name=name, agent_class=request.agent_class or "default", profile=profile.name,
                state=AgentState.IDLE.value, created_at=now, updated_at=now,
            )
            if request.agent_class is not None:
                agent.agent_class = request.agent_class
            agent.profile = profile.name
            slot = self._free_slot()
            admitted = await self.admit_workspace(
                request.workspace, actor, self.config,
                lambda error: self._refuse(error, actor, "launch", scope, name, ""))
            previous, _new = self._set_agent_state(agent, Verb.LAUNCH, actor, "")
            run_id = secrets.token_hex(6)
            container_id = f"{self.config.sandbox.name_prefix}-{run_id}"
            run = RunRecord(
                id=run_id, agent=name, state=RunState.STARTING.value, command=request.command,
                profile=profile.name, workspace=request.workspace, container_id=container_id,
                netns=container_id,
                cgroup=f"{self.config.sandbox.cgroup_parent.strip('/')}/{container_id}",
                bundle=str(self.bundles_dir / container_id),
                log_path=str(self.logs_dir / f"{run_id}.log"), uid_slot=slot, started_at=now,
                timeout=(request.timeout if request.timeout is not None
                         else profile.limits.wall_clock),
            )
            agent.current_run = run_id
            live = LiveRun(record=run, profile=profile, tripwires=list(request.tripwires))
            self.agents[name] = agent
            self.live[run_id] = live
            self.store.put_agent(agent)
            self.store.put_run(run)
            try:
                await self._create_and_start(live, profile, request, admitted)
            except BaseException as exc:
                live.ready.set()
                self._fail_launch(agent, live, actor, exc)
                if existing is None and agent.state == AgentState.IDLE:
                    # A first launch that failed leaves no agent behind (bad input changes
                    # nothing); the run's record and the audit row keep what happened.
                    self.agents.pop(name, None)
                    self.locks.pop(name, None)
                    self.store.delete_agent(name)
                raise
            live.ready.set()
            if agent.state == AgentState.KILLED:
                # A kill raced the launch and owns the run now; the command never started.
                self.audit.append(
                    actor=actor.label(), verb="launch", scope=scope, target=name,
                    previous_state=previous.value, new_state=agent.state,
                    outcome="aborted:killed",
                    detail={"run": run_id, "command": request.command, "actor": _who(actor)},
                )
                return self.run_view(run)
            self.audit.append(
                actor=actor.label(), verb="launch", scope=scope, target=name,
                previous_state=previous.value, new_state=agent.state,
                detail={"run": run_id, "command": request.command, "profile": profile.name,
                        "workspace": request.workspace, "timeout": request.timeout,
                        "pid": run.pid, "actor": _who(actor)},
            )
            log.info("launched agent %s run %s pid %s", name, run_id, run.pid)
            return self.run_view(run)

    async def _create_and_start(self, live: LiveRun, profile: Profile, request: RunRequest,
                                admitted: AdmittedWorkspace | None = None) -> None:
        run = live.record
        network: NetworkAttachment | None = None
        env = dict(request.env)
        if profile.network.mode == "gateway":
            if self.network_provider is None:
                raise EgressSetupFailed(f"profile {profile.name!r} asks for network mode "
                                        f"'gateway' but this supervisor runs no egress gateway",
                                        profile=profile.name)
            network, proxy_env = await self.network_provider(live)
            env.update(proxy_env)
        params = RunParams(
            run_id=run.id, agent=run.agent, container_id=run.container_id, netns=run.netns,
            cgroup=run.cgroup, bundle=Path(run.bundle), log_path=Path(run.log_path),
            profile=profile, command=request.command, uid_slot=run.uid_slot,
            workspace=request.workspace, env=env, network=network,
            workspace_fd=admitted.fd if admitted else None,
            runtime=profile.runtime or self.config.sandbox.runtime,
            image=request.image or profile.image,
        )
        try:
            handle = await self.runtime.launch(params)
        except BaseException:
            if network is not None:
                network.detach()
            raise
        finally:
            if admitted is not None:
                admitted.close()
        live.handle = handle
        run.pid = handle.pid
        # The kill path's files are opened before the agent's command runs, so a kill never
        # needs a new descriptor (docker makes the cgroup at start: held right after it).
        held = await self._hold(handle, run, before_start=True)
        if self.agents[run.agent].state == AgentState.KILLED:
            return  # never start the agent's command; the kill path takes it from here
        await handle.start()
        run.pid = handle.pid  # docker: the engine starts the init, so its pid is known only now
        if not held:
            await self._hold(handle, run, before_start=False)
        self._set_run_state(run, Verb.START)
        self.store.put_run(run)
        for started_hook in self.run_started_hooks:
            _call_hook(started_hook, run.id, run.cgroup, run.started_at)
        live.watcher = self._spawn(self._watch(live))
        if run.timeout is not None:
            loop = asyncio.get_running_loop()
            live.timeout_handle = loop.call_later(
                run.timeout, lambda: self._spawn(self._expire(live, time.perf_counter())))

    async def _hold(self, handle: RunHandle, run: RunRecord, *, before_start: bool) -> bool:
        """Hold the run's cgroup open for the kill path. A run whose cgroup cannot be held is
        not left running (fail closed): it is killed and the launch fails."""
        try:
            handle.cgroup.hold()
            return True
        except FileNotFoundError:
            if before_start:
                return False
            error: OSError = FileNotFoundError(f"no cgroup for run {run.id}")
        except OSError as exc:
            error = exc
        with contextlib.suppress(OSError):
            handle.cgroup.kill()
        with contextlib.suppress(Exception):
            await handle.cleanup()
        raise EnforcementError(f"run {run.id}: cannot hold its cgroup open for the kill path: "
                               f"{error.strerror or error}", run=run.id) from error

    def _fail_launch(self, agent: AgentRecord, live: LiveRun, actor: Actor,
                     exc: BaseException) -> None:
        run = live.record
        previous = AgentState(agent.state)
        if RunState(run.state) not in RUN_ENDED:  # a kill that raced the launch may have
            live.ending = EndCause.LAUNCH_FAILED
            self._finalise(live, EndCause.LAUNCH_FAILED, reason=f"launch failed: {exc}")
        code = exc.code if isinstance(exc, SupervisorError) else "internal_error"
        self.audit.append(
            actor=actor.label(), verb="launch", scope=f"agent:{agent.name}", target=agent.name,
            previous_state=AgentState.IDLE.value, new_state=agent.state,
            outcome=f"failed:{code}",
            detail={"run": run.id, "error": str(exc), "actor": _who(actor),
                    "agent_state_before": previous.value},
        )
        log.error("launch of agent %s failed: %s", agent.name, exc)

    async def _expire(self, live: LiveRun, fired: float) -> None:
        run = live.record
        if live.ending is not None or run.state in RUN_ENDED:
            return
        reason = f"execution window of {run.timeout:g}s expired"
        with contextlib.suppress(SupervisorError):
            await self._kill([self.agents[run.agent]], SYSTEM, reason, f"agent:{run.agent}",
                             cause=EndCause.TIMEOUT, arrived=fired)

    async def _watch(self, live: LiveRun) -> None:
        """Finalise a run whose command ended by itself."""
        assert live.handle is not None
        status = await live.handle.wait_exit()
        if live.ending is not None:
            return
        live.ending = EndCause.EXITED
        handle, run = live.handle, live.record
        loop = asyncio.get_running_loop()
        # The init is gone, so the kernel is killing the rest of its pid namespace; the run is
        # over when the cgroup is empty.
        with contextlib.suppress(OSError):
            await loop.run_in_executor(CONFIRMERS, handle.cgroup.wait_empty,
                                       self.config.kill.confirm_timeout)
        handle.teardown_network()
        agent = self.agents[run.agent]
        previous = AgentState(agent.state)
        self._finalise(live, EndCause.EXITED, exit_code=status)
        self.audit.append(
            actor=SYSTEM.label(), verb="exit", scope=f"agent:{agent.name}", target=agent.name,
            previous_state=previous.value, new_state=agent.state,
            detail={"run": run.id, "exit_code": status, "cause": EndCause.EXITED.value},
        )

    # ----------------------------------------------------------------- the one way out

    def _finalise(self, live: LiveRun, cause: EndCause, *, exit_code: int | None = None,
                  time_to_halt_ms: float | None = None, reason: str = "") -> None:
        """End a run, whatever ended it: its record (state from the table, cause, exit code,
        time_to_halt), its agent, the observers; then step 6 (runtime state, bundle) in the
        background, tracked, so no answer ever waits on a runtime."""
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
        agent = self.agents.get(run.agent)
        if agent is not None:
            if agent.current_run == run.id:
                agent.current_run = None
            agent.last_run = run.id
            agent.state = agent_at_end(AgentState(agent.state), cause).value
            agent.updated_at = time.time()
            self.store.put_agent(agent)
        self.live.pop(run.id, None)
        self.store.put_run(run)
        for ended_hook in self.run_ended_hooks:
            _call_hook(ended_hook, run.id)
        if live.handle is None:
            live.done.set()
            return
        cleanup = self.track(asyncio.ensure_future(self._cleanup(live)))
        self.cleanups[run.id] = cleanup
        cleanup.add_done_callback(lambda _t: self.cleanups.pop(run.id, None))

    async def _cleanup(self, live: LiveRun) -> dict[str, Any]:
        """Step 6: the runtime's state, the bundle, the cgroup directories. A failure is
        audited here; a scoped halt's cleanups are also audited together (`_audit_cleanups`)."""
        assert live.handle is not None
        run = live.record
        t0 = time.perf_counter()
        outcome = "ok"
        detail: dict[str, Any] = {"run": run.id, "cause": run.end_cause, "outcome": outcome}
        try:
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
            self.audit.append(actor=SYSTEM.label(), verb="cleanup", scope=f"agent:{run.agent}",
                              target=run.agent, outcome=outcome, detail=detail)
        log.info("run %s cleaned up (%s) in %.1f ms", run.id, outcome, detail["cleanup_ms"])
        return detail

    async def _audit_cleanups(self, tasks: list[asyncio.Task[dict[str, Any]]], scope: str,
                              verb: str) -> None:
        """One row for the runtime cleanup that followed a scoped halt's answer."""
        t0 = time.perf_counter()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        details = [d for d in done if isinstance(d, dict)]
        failed = [d["run"] for d in details if d.get("outcome") != "ok"]
        self.audit.append(
            actor=SYSTEM.label(), verb="cleanup", scope=scope, reason=f"after {verb}",
            outcome="ok" if not failed and len(details) == len(tasks) else "failed",
            detail={"runs": len(tasks), "failed": failed,
                    "after_answer_ms": round((time.perf_counter() - t0) * 1000, 3),
                    "slowest_ms": max((d.get("cleanup_ms", 0.0) for d in details),
                                      default=None)})

    async def settled(self, run_id: str, timeout: float | None = None) -> None:
        """Until the run has ended and its cleanup (step 6) is done."""
        live = self.live.get(run_id)
        if live is not None:
            await asyncio.wait_for(live.done.wait(), timeout)
            return
        cleanup = self.cleanups.get(run_id)
        if cleanup is not None:
            await asyncio.wait_for(asyncio.shield(cleanup), timeout)

    # ----------------------------------------------------------------- the kill

    async def _run_kill(self, live: LiveRun) -> RunKill | None:
        """Steps 2-5 of one run, once its launch has made something to kill (None: it never
        got that far; its credentials are revoked all the same)."""
        if not live.ready.is_set():
            with contextlib.suppress(Exception):
                await self.credentials.revoke(live.record.id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.ready.wait(), _LAUNCH_WAIT)
        if live.handle is None:
            return None
        return RunKill(live.record.id, credentials=self.credentials, cgroup=live.handle.cgroup,
                       network=live.handle, confirm_timeout=self.config.kill.confirm_timeout)

    async def _kill(self, agents: list[AgentRecord], actor: Actor, reason: str, scope: str, *,
                    verb: str = "kill", agent_verb: Verb = Verb.KILL,
                    cause: EndCause = EndCause.KILLED, arrived: float | None = None,
                    whole_parent: bool = False) -> list[AgentResult | SupervisorError]:
        """The kill path for one agent or many: step 1 for all before any await, steps 2-5
        in one sweep, then each run finalised and each agent's kill audited. With
        `whole_parent` (a global halt), step 3 is one write to the parent cgroup."""
        t0 = arrived if arrived is not None else time.perf_counter()
        arrived_at = time.time() - (time.perf_counter() - t0)
        marks: list[tuple[AgentRecord, AgentState, AgentState, LiveRun | None]] = []
        for agent in agents:  # step 1
            previous, new = self._set_agent_state(agent, agent_verb, actor, reason)
            marks.append((agent, previous, new, self._live_of(agent)))
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
        self.store.put_agents([agent for agent, _previous, _new, _live in marks])
        owned_ids = {live.record.id for live in owned}
        scoped = len(marks) > 1 or whole_parent
        kills: dict[str, RunKill] = {}
        covered: set[str] = set()
        prefix = self.parent_path + "/"
        for live, kill in zip(owned + rekill, await asyncio.gather(
                *(self._run_kill(live) for live in owned + rekill)), strict=True):
            if kill is not None:
                kills[live.record.id] = kill
                if whole_parent and live.record.cgroup.startswith(prefix):
                    covered.add(live.record.id)
        t_ready = time.perf_counter()
        await sweep(list(kills.values()), self.parent if covered else None, frozenset(covered))
        t_swept = time.perf_counter()

        results: list[AgentResult | SupervisorError] = []
        for agent, previous, new, live in marks:
            results.append(await self._after_kill(agent, previous, new, live, kills, actor,
                                                  reason, scope, verb, cause, t0, arrived_at,
                                                  owner=live is not None and
                                                  live.record.id in owned_ids,
                                                  scoped=scoped))
        log.log(logging.WARNING if scoped else logging.INFO,
                "%s of %d agents, %d runs (%s) by %s (%s): queued %.1f ms, steps 2-5 %.1f ms, "
                "records and audit %.1f ms", verb, len(marks), len(kills), scope,
                actor.label(), reason or "no reason", _ms_since(t0, t_ready),
                _ms_since(t_ready, t_swept), _ms_since(t_swept, time.perf_counter()))
        if scoped:  # a scoped halt: its cleanup is audited as one
            tasks = [self.cleanups[run_id] for run_id in kills if run_id in self.cleanups]
            if tasks:
                audit = self._spawn(self._audit_cleanups(tasks, scope, verb))
                self._cleanup_audits.add(audit)
                audit.add_done_callback(self._cleanup_audits.discard)
        return results

    async def _after_kill(self, agent: AgentRecord, previous: AgentState, new: AgentState,
                          live: LiveRun | None, kills: dict[str, RunKill], actor: Actor,
                          reason: str, scope: str, verb: str, cause: EndCause, t0: float,
                          arrived_at: float, *, owner: bool, scoped: bool
                          ) -> AgentResult | SupervisorError:
        detail: dict[str, Any] = {"actor": _who(actor), "cause": cause.value,
                                  "request_arrived_at": round(arrived_at, 6)}
        time_to_halt_ms: float | None = None
        outcome = "ok"
        report: HaltReport | None = None
        if live is not None and live.ending is EndCause.EXITED:
            await live.done.wait()  # the command ended by itself a moment ago
            detail["note"] = "the run had already exited"
        elif live is not None:
            kill = kills.get(live.record.id)
            if kill is None:
                detail.update(run=live.record.id, note="the run had not been created yet")
                time_to_halt_ms = _ms_since(t0, time.perf_counter())
            else:
                report = kill.report
                detail.update(report.detail())
                time_to_halt_ms = _ms_since(t0, report.halted_at or time.perf_counter())
            if not owner:
                detail["note"] = "another kill of this run is under way"
            elif report is not None and not report.confirmed:
                # Not done until the kernel says so: the run stays tracked as "killing" and
                # is killed again in the background until its cgroup is empty.
                outcome = "unconfirmed"
                self._set_run_state(live.record, Verb.KILL_UNCONFIRMED)
                self.store.put_run(live.record)
                assert kill is not None
                live.watcher = self._spawn(self._keep_killing(live, kill, agent, actor, verb,
                                                              reason, t0))
            else:
                run_reason = f"{verb}: {reason}" if reason else verb
                self._finalise(live, cause, exit_code=_exit_code(live),
                               time_to_halt_ms=time_to_halt_ms, reason=run_reason)
        self.audit.append(
            actor=actor.label(), verb=verb, scope=scope, target=agent.name, reason=reason,
            previous_state=previous.value, new_state=new.value,
            time_to_halt_ms=time_to_halt_ms, outcome=outcome, detail=detail,
        )
        # A scoped halt logs one line for all (_kill): a line per agent would be written,
        # to a journal that may be slow, while the answer waits.
        log.log(logging.DEBUG if scoped else logging.WARNING,
                "%s agent %s by %s (%s): time_to_halt_ms=%s", verb, agent.name, actor.label(),
                reason or "no reason", time_to_halt_ms)
        if outcome == "unconfirmed":
            return KillUnconfirmed(
                f"agent {agent.name}: the kernel still reports processes after escalation",
                agent=agent.name, survivors=detail.get("survivors", []),
            )
        return AgentResult(agent=agent.name, previous_state=previous.value,
                           new_state=new.value, run_id=live.record.id if live else None,
                           time_to_halt_ms=time_to_halt_ms)

    async def _keep_killing(self, live: LiveRun, kill: RunKill, agent: AgentRecord,
                            actor: Actor, verb: str, reason: str, t0: float) -> None:
        """Retry an unconfirmed kill until the kernel reports the cgroup empty."""
        attempts = await kill.keep_killing()
        await kill.teardown_off_loop()
        time_to_halt_ms = _ms_since(t0, kill.report.halted_at or time.perf_counter())
        assert live.ending is not None
        self._finalise(live, live.ending, exit_code=_exit_code(live),
                       time_to_halt_ms=time_to_halt_ms,
                       reason=f"{verb}: {reason}" if reason else verb)
        self.audit.append(
            actor=actor.label(), verb="kill_confirmed", scope=f"agent:{agent.name}",
            target=agent.name, previous_state=AgentState.KILLED.value,
            new_state=agent.state, time_to_halt_ms=time_to_halt_ms,
            detail={"run": live.record.id, "attempts": attempts},
        )
        log.warning("kill of agent %s confirmed after %d attempts: time_to_halt_ms=%s",
                    agent.name, attempts, time_to_halt_ms)

    # ----------------------------------------------------------------- other verbs

    async def _pause_agent(self, agent: AgentRecord, actor: Actor, reason: str, scope: str
                           ) -> AgentResult:
        async with self._lock(agent.name):
            if not agent_can(AgentState(agent.state), Verb.PAUSE):
                self._set_agent_state(agent, Verb.PAUSE, actor, reason)  # raises
            live = self._live_of(agent)
            assert live is not None and live.handle is not None
            frozen = await live.handle.freeze(self.config.kill.confirm_timeout)
            if not frozen:
                await live.handle.thaw()
                raise EnforcementError(f"agent {agent.name}: cgroup did not freeze",
                                       agent=agent.name)
            for pause_hook in self.pause_hooks:  # tokens suspended, link down
                await pause_hook(live.record.id)
            if agent.state != AgentState.ACTIVE:  # a kill overtook the pause
                raise IllegalTransition(f"agent {agent.name!r} is now {agent.state}",
                                        agent=agent.name, state=agent.state)
            previous, new = self._set_agent_state(agent, Verb.PAUSE, actor, reason)
            self._set_run_state(live.record, Verb.PAUSE)
            return self._record(agent, live, actor, "pause", scope, reason, previous, new)

    async def _resume_agent(self, agent: AgentRecord, actor: Actor, reason: str, scope: str
                            ) -> AgentResult:
        async with self._lock(agent.name):
            if _held_pause(agent):
                previous, new = self._set_agent_state(agent, Verb.RELEASE, actor, reason)
                return self._record(agent, None, actor, "resume", scope, reason, previous, new)
            previous, new = self._set_agent_state(agent, Verb.RESUME, actor, reason)
            live = self._live_of(agent)
            assert live is not None and live.handle is not None
            for resume_hook in self.resume_hooks:
                await resume_hook(live.record.id)
            await live.handle.thaw()
            self._set_run_state(live.record, Verb.RESUME)
            return self._record(agent, live, actor, "resume", scope, reason, previous, new)

    async def _reactivate_agent(self, agent: AgentRecord, actor: Actor, reason: str, scope: str
                                ) -> AgentResult:
        live = self._live_of(agent)
        if live is not None:
            raise IllegalTransition(
                f"agent {agent.name!r} cannot be reactivated: the kernel has not confirmed its "
                f"last kill (run {live.record.id} is {live.record.state})",
                agent=agent.name, run=live.record.id, run_state=live.record.state,
            )
        transition = Verb.RELEASE if _held_pause(agent) else Verb.REACTIVATE
        previous, new = self._set_agent_state(agent, transition, actor, reason)
        return self._record(agent, None, actor, "reactivate", scope, reason, previous, new)

    async def _stop_agent(self, agent: AgentRecord, actor: Actor, reason: str, scope: str,
                          grace: float) -> AgentResult:
        """SIGTERM every process, wait `grace`, then the kill path for whatever is left."""
        async with self._lock(agent.name):
            state = AgentState(agent.state)
            live = self._live_of(agent)
            if not agent_can(state, Verb.STOP) or live is None or live.handle is None:
                self._set_agent_state(agent, Verb.STOP, actor, reason)  # raises
                raise IllegalTransition(f"agent {agent.name!r} has no run to stop",
                                        agent=agent.name)
            handle = live.handle
            live.ending = EndCause.STOPPED
            t0 = time.perf_counter()
            with contextlib.suppress(Exception):  # a stopping agent gets no more credentials
                await self.credentials.revoke(live.record.id)
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
            [result] = await self._kill([agent], actor, reason or f"grace {grace:g}s expired",
                                        scope, verb="stop", agent_verb=Verb.STOP, arrived=t0)
            if isinstance(result, SupervisorError):
                raise result
            return result
        previous, new = self._set_agent_state(agent, Verb.STOP, actor, reason)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            await loop.run_in_executor(CONFIRMERS, handle.cgroup.wait_empty,
                                       self.config.kill.confirm_timeout)
        handle.teardown_network()
        time_to_halt_ms = _ms_since(t0, time.perf_counter())
        self._finalise(live, EndCause.STOPPED, exit_code=status, time_to_halt_ms=time_to_halt_ms,
                       reason=f"stop: {reason}" if reason else "stop")
        return self._record(agent, live, actor, "stop", scope, reason, previous, new,
                            time_to_halt_ms=time_to_halt_ms, extra={"graceful": True,
                                                                    "exit_code": status})

    def _record(self, agent: AgentRecord, live: LiveRun | None, actor: Actor, verb: str,
                scope: str, reason: str, previous: AgentState, new: AgentState,
                time_to_halt_ms: float | None = None, extra: dict[str, Any] | None = None,
                ) -> AgentResult:
        self.store.put_agent(agent)
        if live is not None:
            self.store.put_run(live.record)
        self.audit.append(
            actor=actor.label(), verb=verb, scope=scope, target=agent.name, reason=reason,
            previous_state=previous.value, new_state=new.value, time_to_halt_ms=time_to_halt_ms,
            detail={"run": live.record.id if live else None, "actor": _who(actor),
                    **(extra or {})},
        )
        log.info("%s agent %s by %s (%s)", verb, agent.name, actor.label(), reason or "-")
        return AgentResult(agent=agent.name, previous_state=previous.value, new_state=new.value,
                           run_id=live.record.id if live else None,
                           time_to_halt_ms=time_to_halt_ms)

    # ----------------------------------------------------------------- scoped actions

    def _targets(self, scope: Scope) -> list[AgentRecord]:
        if scope.agent is not None:
            return [self._agent(scope.agent)]
        if scope.agent_class is not None:
            return [a for a in self.agents.values() if a.agent_class == scope.agent_class]
        return list(self.agents.values())

    async def act(self, verb: str, request: ActionRequest, actor: Actor, *,
                  cause: EndCause = EndCause.KILLED, arrived: float | None = None
                  ) -> ActionResult:
        """Apply `verb` to one agent, a class or every agent.

        A single agent in the wrong state is a 409; in a class or global scope, agents for
        which the verb does not apply are reported as skipped and left untouched. A kill's
        `cause` says why runs it ends ended; `arrived` (perf_counter) is when the request
        was read off its source, where time_to_halt_ms starts."""
        if arrived is None:
            arrived = time.perf_counter()
        scope = request.scope
        scope_text = scope.describe()
        targets = self._targets(scope)
        reason = request.reason
        if verb == Verb.KILL and scope.kind == "global":
            self.global_halt = True
            self.store.set_meta(GLOBAL_HALT_KEY, f"{actor.label()}: {reason}")
            self.audit.append(actor=actor.label(), verb="global_halt", scope="global",
                              reason=reason, detail={"actor": _who(actor),
                                                     "agents": sorted(a.name for a in targets)})
        if verb == Verb.REACTIVATE and scope.kind == "global" and self.global_halt:
            self.global_halt = False
            self.store.set_meta(GLOBAL_HALT_KEY, None)
            self.audit.append(actor=actor.label(), verb="lift_global_halt", scope="global",
                              reason=reason, detail={"actor": _who(actor)})

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
            outcomes = list(await self._kill(chosen, actor, reason, scope_text, cause=cause,
                                             arrived=arrived,
                                             whole_parent=scope.kind == "global"))
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
        if verb in (Verb.RESUME, Verb.REACTIVATE) and _held_pause(agent):
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
            return self._pause_agent(agent, actor, reason, scope)
        if verb == Verb.RESUME:
            return self._resume_agent(agent, actor, reason, scope)
        if verb == Verb.REACTIVATE:
            return self._reactivate_agent(agent, actor, reason, scope)
        if verb == Verb.STOP:
            return self._stop_agent(agent, actor, reason, scope,
                                    grace or self.config.kill.default_grace)
        raise ValueError(verb)

    # ----------------------------------------------------------------- lifecycle of the daemon

    async def reconcile(self) -> list[dict[str, Any]]:
        """Kill and clean up what a previous instance left behind, and say so in the audit."""
        reports: list[dict[str, Any]] = []
        for run in self.store.unfinished_runs():
            agent = self.agents.get(run.agent)
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
        for hook in self.reconcile_hooks:
            hook()
        return reports

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
                          detail={"actor": _who(actor)})

    def active_runs(self) -> int:
        return len(self.live)

    def runtime_info(self) -> dict[str, Any]:
        return self.runtime.describe()


def _exit_code(live: LiveRun) -> int:
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


def _ms_since(t0: float, t1: float) -> float:
    return round((t1 - t0) * 1000, 3)


def _call_hook(hook: Callable[..., None], *args: Any) -> None:
    """Observers (telemetry, tripwires, seccomp) must never break a launch or a kill."""
    try:
        hook(*args)
    except Exception:
        log.exception("run hook %s failed", getattr(hook, "__qualname__", hook))


def _held_pause(agent: AgentRecord) -> bool:
    """Paused with no run: the pause outlived its run (a restart) and still holds the agent."""
    return agent.state == AgentState.PAUSED and agent.current_run is None


def _who(actor: Actor) -> dict[str, Any]:
    return actor.model_dump(exclude_defaults=True)
