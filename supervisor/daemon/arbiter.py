"""The arbiter: the registry of agents and runs and every verb on them, the kill path included.
Runs in the daemon's event loop; touches the kernel only through the Runtime seam.

The kill path, in this order (DESIGN.md): mark the agent killed in memory, revoke credentials,
SIGKILL the run's cgroup, wait for the kernel to report it empty, tear the network down, then
delete runtime state. `time_to_halt_ms` spans the first step to the network teardown."""

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
from supervisor.runtime.base import NetworkAttachment, RunHandle, RunParams, Runtime
from supervisor.runtime.output import check_free_space
from supervisor.states import (
    RUN_ENDED,
    AgentState,
    IllegalTransitionError,
    RunState,
    agent_can,
    agent_transition,
    run_transition,
)

log = logging.getLogger(__name__)

SYSTEM = Actor(kind="system", name="supervisor")
GLOBAL_HALT_KEY = "global_halt"
_LAUNCH_WAIT = 30.0  # a kill waits this long for a launch in flight to reach a killable state


@dataclass
class LiveRun:
    record: RunRecord
    handle: RunHandle | None = None
    profile: Profile | None = None
    tripwires: list[TripwireRule] = field(default_factory=list)  # the agent's own overrides
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    ending: str | None = None  # "kill", "stop", "exit", "shutdown": who finalizes the run
    watcher: asyncio.Task[None] | None = None
    timeout_handle: asyncio.TimerHandle | None = None


# Hooks run at step 2 of the kill path (credential revocation); the egress gateway adds one.
RevokeHook = Callable[[str, str], Awaitable[None]]
# Network mode "gateway": the attachment the runtime plumbs in, and the sandbox's proxy env.
NetworkProvider = Callable[[LiveRun], Awaitable[tuple[NetworkAttachment, dict[str, str]]]]


class Arbiter:
    def __init__(self, config: Config, store: Store, audit: AuditLog, runtime: Runtime) -> None:
        self.config = config
        self.store = store
        self.audit = audit
        self.runtime = runtime
        self.agents: dict[str, AgentRecord] = {a.name: a for a in store.agents()}
        self.live: dict[str, LiveRun] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.revoke_hooks: list[RevokeHook] = []
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
            stats=_stats(live),
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
            previous, _new = self._set_agent_state(agent, "launch", actor, "")
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
        if self.agents[run.agent].state == AgentState.KILLED:
            return  # never start the agent's command; the kill path takes it from here
        await handle.start()
        run.pid = handle.pid  # docker: the engine starts the init, so its pid is known only now
        self._set_run_state(run, "start")
        self.store.put_run(run)
        for started_hook in self.run_started_hooks:
            _call_hook(started_hook, run.id, run.cgroup, run.started_at)
        live.watcher = self._spawn(self._watch(live))
        if run.timeout is not None:
            loop = asyncio.get_running_loop()
            live.timeout_handle = loop.call_later(
                run.timeout, lambda: self._spawn(self._expire(live)))

    def _fail_launch(self, agent: AgentRecord, live: LiveRun, actor: Actor,
                     exc: BaseException) -> None:
        run = live.record
        run.state = RunState.FAILED.value
        run.ended_at = time.time()
        run.end_reason = f"launch failed: {exc}"
        agent.current_run = None
        agent.last_run = run.id
        if agent.state == AgentState.ACTIVE:
            agent.state = AgentState.IDLE.value
        self.live.pop(run.id, None)
        self.store.put_run(run)
        self.store.put_agent(agent)
        for ended_hook in self.run_ended_hooks:  # e.g. the gateway's listener and token
            _call_hook(ended_hook, run.id)
        live.done.set()
        code = exc.code if isinstance(exc, SupervisorError) else "internal_error"
        self.audit.append(
            actor=actor.label(), verb="launch", scope=f"agent:{agent.name}", target=agent.name,
            previous_state=AgentState.IDLE.value, new_state=agent.state,
            outcome=f"failed:{code}",
            detail={"run": run.id, "error": str(exc), "actor": _who(actor)},
        )
        log.error("launch of agent %s failed: %s", agent.name, exc)

    async def _expire(self, live: LiveRun) -> None:
        run = live.record
        if live.ending or run.state in RUN_ENDED:
            return
        reason = f"execution window of {run.timeout:g}s expired"
        with contextlib.suppress(SupervisorError):
            await self._kill_agent(self.agents[run.agent], SYSTEM, reason, f"agent:{run.agent}")

    async def _watch(self, live: LiveRun) -> None:
        """Finalize a run whose command ended by itself."""
        assert live.handle is not None
        status = await live.handle.wait_exit()
        if live.ending is not None:
            return
        live.ending = "exit"
        handle, run = live.handle, live.record
        await handle.wait_empty(self.config.kill.confirm_timeout)
        handle.teardown_network()
        await handle.cleanup()
        agent = self.agents[run.agent]
        previous = AgentState(agent.state)
        self._set_run_state(run, "exit")
        run.exit_code = status
        run.end_reason = "exited"
        self._end_run(agent, live)
        if previous != AgentState.KILLED:  # a kill that arrived meanwhile keeps its hold
            agent.state = agent_transition(previous, "exit").value
        agent.updated_at = time.time()
        self.store.put_agent(agent)
        self.audit.append(
            actor=SYSTEM.label(), verb="exit", scope=f"agent:{agent.name}", target=agent.name,
            previous_state=previous.value, new_state=agent.state,
            detail={"run": run.id, "exit_code": status},
        )
        live.done.set()

    def _end_run(self, agent: AgentRecord, live: LiveRun) -> None:
        run = live.record
        run.ended_at = time.time()
        if live.timeout_handle is not None:
            live.timeout_handle.cancel()
        agent.current_run = None
        agent.last_run = run.id
        self.live.pop(run.id, None)
        self.store.put_run(run)
        for ended_hook in self.run_ended_hooks:
            _call_hook(ended_hook, run.id)

    # ----------------------------------------------------------------- the kill path

    async def _halt_run(self, live: LiveRun) -> tuple[float, dict[str, Any]]:
        """Steps 2-5 for one run; returns time_to_halt_ms measured from `live`'s kill mark."""
        run = live.record
        t0 = run.extra.get("halt_t0", time.perf_counter())
        detail: dict[str, Any] = {"run": run.id}
        for hook in self.revoke_hooks:  # step 2
            await hook(run.agent, run.id)
        if not live.ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.ready.wait(), _LAUNCH_WAIT)
        handle = live.handle
        if handle is None:
            detail["note"] = "the run had not been created yet"
            return (time.perf_counter() - t0) * 1000, detail
        try:
            detail["mechanism"] = handle.kill()  # step 3
        except FileNotFoundError:
            detail["mechanism"] = "none: the cgroup was already gone"
        timeout = self.config.kill.confirm_timeout
        confirmed = await handle.wait_empty(timeout)  # step 4
        if not confirmed:
            log.critical("run %s: cgroup not empty %.1fs after kill; escalating", run.id, timeout)
            detail["escalated"] = handle.kill(force_fallback=True)
            confirmed = await handle.wait_empty(timeout)
        detail["confirmed_empty"] = confirmed
        detail["netns_removed"] = handle.teardown_network()  # step 5
        time_to_halt_ms = round((time.perf_counter() - t0) * 1000, 3)
        if not confirmed:
            detail["survivors"] = handle.residue().get("processes", [])
        return time_to_halt_ms, detail

    async def _kill_agent(self, agent: AgentRecord, actor: Actor, reason: str, scope: str,
                          verb: str = "kill") -> AgentResult:
        t0 = time.perf_counter()
        # Step 1, before any await: no launch, resume or restart can race past this point.
        final_verb = verb if verb in ("kill", "shutdown") else "stop"
        previous, new = self._set_agent_state(agent, final_verb, actor, reason)
        live = self._live_of(agent)
        time_to_halt_ms: float | None = None
        detail: dict[str, Any] = {"actor": _who(actor)}
        outcome = "ok"
        if live is not None and live.ending == "exit":
            # The command ended by itself a moment ago; its own finalization is under way.
            await live.done.wait()
            detail["note"] = "the run had already exited"
        elif live is not None and live.ending not in ("kill", "shutdown"):
            live.ending = verb
            live.record.extra["halt_t0"] = t0
            time_to_halt_ms, halt_detail = await self._halt_run(live)
            detail.update(halt_detail)
            run = live.record
            run.end_reason = f"{verb}: {reason}" if reason else verb
            if not detail.get("confirmed_empty", True):
                # Not done until the kernel says so: the run stays tracked as "killing" and
                # the kill is retried in the background until the cgroup is empty.
                outcome = "unconfirmed"
                self._set_run_state(run, "kill_unconfirmed")
                self.store.put_run(run)
                live.watcher = self._spawn(self._keep_killing(live, agent, actor, t0))
            else:
                await self._finish_kill(live, agent, time_to_halt_ms)
        self.store.put_agent(agent)
        self.audit.append(
            actor=actor.label(), verb=verb, scope=scope, target=agent.name, reason=reason,
            previous_state=previous.value, new_state=new.value,
            time_to_halt_ms=time_to_halt_ms, outcome=outcome, detail=detail,
        )
        log.warning("%s agent %s by %s (%s): time_to_halt_ms=%s", verb, agent.name,
                    actor.label(), reason or "no reason", time_to_halt_ms)
        if outcome == "unconfirmed":
            raise KillUnconfirmed(
                f"agent {agent.name}: the kernel still reports processes after escalation",
                agent=agent.name, survivors=detail.get("survivors", []),
            )
        return AgentResult(agent=agent.name, previous_state=previous.value,
                           new_state=new.value, run_id=live.record.id if live else None,
                           time_to_halt_ms=time_to_halt_ms)

    async def _finish_kill(self, live: LiveRun, agent: AgentRecord,
                           time_to_halt_ms: float | None) -> None:
        """Step 6 and the run's record once the kernel has confirmed the cgroup empty."""
        run = live.record
        status = await _exit_status(live)
        if live.handle is not None:
            await live.handle.cleanup()
        if RunState(run.state) not in RUN_ENDED:  # a failed launch has ended it already
            self._set_run_state(run, "kill")
            run.exit_code = status if status is not None else 128 + signal.SIGKILL
            run.time_to_halt_ms = time_to_halt_ms
            self._end_run(agent, live)
        live.done.set()

    async def _keep_killing(self, live: LiveRun, agent: AgentRecord, actor: Actor,
                            t0: float) -> None:
        """Retry an unconfirmed kill until the kernel reports the cgroup empty."""
        handle = live.handle
        assert handle is not None
        attempts = 0
        while True:
            attempts += 1
            with contextlib.suppress(FileNotFoundError):
                handle.kill(force_fallback=attempts % 2 == 0)
            if await handle.wait_empty(self.config.kill.confirm_timeout):
                break
            if attempts % 10 == 0:
                log.critical("run %s: still not empty after %d kill attempts: %s",
                             live.record.id, attempts, handle.residue())
        time_to_halt_ms = round((time.perf_counter() - t0) * 1000, 3)
        await self._finish_kill(live, agent, time_to_halt_ms)
        self.store.put_agent(agent)
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
            if not agent_can(AgentState(agent.state), "pause"):
                self._set_agent_state(agent, "pause", actor, reason)  # raises
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
            previous, new = self._set_agent_state(agent, "pause", actor, reason)
            self._set_run_state(live.record, "pause")
            return self._record(agent, live, actor, "pause", scope, reason, previous, new)

    async def _resume_agent(self, agent: AgentRecord, actor: Actor, reason: str, scope: str
                            ) -> AgentResult:
        async with self._lock(agent.name):
            if _held_pause(agent):
                previous, new = self._set_agent_state(agent, "release", actor, reason)
                return self._record(agent, None, actor, "resume", scope, reason, previous, new)
            previous, new = self._set_agent_state(agent, "resume", actor, reason)
            live = self._live_of(agent)
            assert live is not None and live.handle is not None
            for resume_hook in self.resume_hooks:
                await resume_hook(live.record.id)
            await live.handle.thaw()
            self._set_run_state(live.record, "resume")
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
        transition = "release" if _held_pause(agent) else "reactivate"
        previous, new = self._set_agent_state(agent, transition, actor, reason)
        return self._record(agent, None, actor, "reactivate", scope, reason, previous, new)

    async def _stop_agent(self, agent: AgentRecord, actor: Actor, reason: str, scope: str,
                          grace: float) -> AgentResult:
        """SIGTERM every process, wait `grace`, then the kill path for whatever is left."""
        async with self._lock(agent.name):
            state = AgentState(agent.state)
            live = self._live_of(agent)
            if not agent_can(state, "stop") or live is None or live.handle is None:
                self._set_agent_state(agent, "stop", actor, reason)  # raises
                raise IllegalTransition(f"agent {agent.name!r} has no run to stop",
                                        agent=agent.name)
            handle = live.handle
            live.ending = "stop"
            t0 = time.perf_counter()
            for hook in self.revoke_hooks:  # a stopping agent gets no more credentials
                await hook(agent.name, live.record.id)
            if state == AgentState.PAUSED:
                await handle.thaw()
            handle.signal_all(signal.SIGTERM)
            try:
                status = await asyncio.wait_for(asyncio.shield(handle.wait_exit()), grace)
                graceful = True
            except TimeoutError:
                graceful = False
        if not graceful:
            live.ending = None
            result = await self._kill_agent(agent, actor, reason or f"grace {grace:g}s expired",
                                            scope, verb="stop")
            return result
        previous, new = self._set_agent_state(agent, "stop", actor, reason)
        await handle.wait_empty(self.config.kill.confirm_timeout)
        handle.teardown_network()
        time_to_halt_ms = round((time.perf_counter() - t0) * 1000, 3)
        await handle.cleanup()
        run = live.record
        self._set_run_state(run, "exit")
        run.exit_code = status
        run.time_to_halt_ms = time_to_halt_ms
        run.end_reason = f"stop: {reason}" if reason else "stop"
        self._end_run(agent, live)
        live.done.set()
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

    async def act(self, verb: str, request: ActionRequest, actor: Actor) -> ActionResult:
        """Apply `verb` to one agent, a class or every agent.

        A single agent in the wrong state is a 409; in a class or global scope, agents for
        which the verb does not apply are reported as skipped and left untouched."""
        scope = request.scope
        scope_text = scope.describe()
        targets = self._targets(scope)
        reason = request.reason
        if verb == "kill" and scope.kind == "global":
            self.global_halt = True
            self.store.set_meta(GLOBAL_HALT_KEY, f"{actor.label()}: {reason}")
            self.audit.append(actor=actor.label(), verb="global_halt", scope="global",
                              reason=reason, detail={"actor": _who(actor),
                                                     "agents": sorted(a.name for a in targets)})
        if verb == "reactivate" and scope.kind == "global" and self.global_halt:
            self.global_halt = False
            self.store.set_meta(GLOBAL_HALT_KEY, None)
            self.audit.append(actor=actor.label(), verb="lift_global_halt", scope="global",
                              reason=reason, detail={"actor": _who(actor)})

        single = scope.kind == "agent"
        results: list[AgentResult] = []
        jobs: list[Awaitable[AgentResult]] = []
        job_agents: list[str] = []
        for agent in targets:
            state = AgentState(agent.state)
            transition = "release" if verb in ("resume", "reactivate") and _held_pause(
                agent) else verb
            if not agent_can(state, transition) or (verb == "stop" and agent.current_run is None):
                if single:
                    error = IllegalTransition(
                        f"cannot {verb} agent {agent.name!r}: it is {state.value}",
                        agent=agent.name, verb=verb, state=state.value,
                    )
                    raise self._refuse(error, actor, verb, scope_text, agent.name, reason)
                results.append(AgentResult(agent=agent.name, previous_state=state.value,
                                           new_state=state.value, skipped=f"{state.value}"))
                continue
            jobs.append(self._dispatch(verb, agent, actor, reason, scope_text, request.grace))
            job_agents.append(agent.name)
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        errors: list[SupervisorError] = []
        for agent_name, outcome in zip(job_agents, outcomes, strict=True):
            if isinstance(outcome, SupervisorError):
                errors.append(outcome)
                results.append(AgentResult(
                    agent=agent_name, previous_state="?",
                    new_state=self.agents[agent_name].state,
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

    def _dispatch(self, verb: str, agent: AgentRecord, actor: Actor, reason: str, scope: str,
                  grace: float | None) -> Awaitable[AgentResult]:
        if verb == "kill":
            return self._kill_agent(agent, actor, reason, scope)
        if verb == "pause":
            return self._pause_agent(agent, actor, reason, scope)
        if verb == "resume":
            return self._resume_agent(agent, actor, reason, scope)
        if verb == "reactivate":
            return self._reactivate_agent(agent, actor, reason, scope)
        if verb == "stop":
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
            run.ended_at = time.time()
            run.end_reason = "reaped at startup: the previous supervisor instance ended"
            self.store.put_run(run)
            if agent is not None and agent.current_run == run.id:
                previous = agent.state
                agent.current_run = None
                agent.last_run = run.id
                # A paused agent stays paused (a hold until resumed or reactivated).
                if agent.state == AgentState.ACTIVE:
                    agent.state = AgentState.IDLE.value
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
        """Orderly shutdown: every live run goes through the kill path, audited."""
        self.shutting_down = True
        jobs = []
        for live in list(self.live.values()):
            agent = self.agents[live.record.agent]
            if live.ending is None:
                jobs.append(self._kill_agent(agent, SYSTEM, reason, "global", verb="shutdown"))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.critical("shutdown kill failed: %s", result)
        # Kills and exits already in flight (started by an operator, a timeout or break-glass)
        # finish their cleanup before the loop ends; cancelling them would leave state behind.
        in_flight = [live.done.wait() for live in self.live.values()]
        if in_flight:
            try:
                await asyncio.wait_for(asyncio.gather(*in_flight),
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


async def _exit_status(live: LiveRun) -> int | None:
    if live.handle is None:
        return None
    try:
        return await asyncio.wait_for(asyncio.shield(live.handle.wait_exit()), 1.0)
    except TimeoutError:
        return None


def _call_hook(hook: Callable[..., None], *args: Any) -> None:
    """Observers (telemetry, tripwires, seccomp) must never break a launch or a kill."""
    try:
        hook(*args)
    except Exception:
        log.exception("run hook %s failed", getattr(hook, "__qualname__", hook))


def _stats(live: LiveRun | None) -> dict[str, int | None] | None:
    if live is None or live.handle is None or live.ending is not None:
        return None
    try:
        return live.handle.stats()
    except OSError:
        return None


def _held_pause(agent: AgentRecord) -> bool:
    """Paused with no run: the pause outlived its run (a restart) and still holds the agent."""
    return agent.state == AgentState.PAUSED and agent.current_run is None


def _who(actor: Actor) -> dict[str, Any]:
    return actor.model_dump(exclude_defaults=True)
