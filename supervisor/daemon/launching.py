"""Launching a run: the checks that refuse it before anything is registered, the record, the
runtime's create and start, and the kill path's cgroup descriptors held before the agent's
command runs. Runs in the daemon's event loop; touches the kernel only through the Runtime
seam."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING

from supervisor.daemon import ending
from supervisor.daemon.liverun import LiveRun, actor_detail, held_pause
from supervisor.daemon.store import AgentRecord, RunRecord
from supervisor.daemon.workspace_access import AdmittedWorkspace
from supervisor.errors import (
    AgentBusy,
    AgentKilled,
    DiskSpaceLow,
    EgressSetupFailed,
    EnforcementError,
    GlobalHalt,
    IllegalTransition,
    ShuttingDown,
    SupervisorError,
)
from supervisor.models import Actor, RunRequest, RunView
from supervisor.profiles import Profile, load_profile
from supervisor.runtime.base import NetworkAttachment, RunHandle, RunParams
from supervisor.runtime.output import check_free_space
from supervisor.states import RUN_ENDED, AgentState, EndCause, RunState, Verb

if TYPE_CHECKING:
    from supervisor.daemon.arbiter import Arbiter

log = logging.getLogger(__name__)


async def launch(arbiter: Arbiter, request: RunRequest, actor: Actor) -> RunView:
    name = request.name or f"agent-{secrets.token_hex(3)}"
    scope = f"agent:{name}"
    if arbiter.shutting_down:
        raise ShuttingDown("the supervisor is shutting down; no new runs")
    if arbiter.global_halt:
        raise arbiter._refuse(
            GlobalHalt("a global halt is in force; an owner must lift it with "
                       "'agentctl reactivate --all --reason ...'"),
            actor, "launch", scope, name, "")
    known = arbiter.agents.get(name)
    held = arbiter.observers.launch_refusal(
        name, request.agent_class or (known.agent_class if known else "default"))
    if held is not None:  # a fleet hold
        raise arbiter._refuse(held, actor, "launch", scope, name, "")
    try:  # a full disk takes every run's output, the audit log and the state with it
        check_free_space((arbiter.config.daemon.state_dir, arbiter.logs_dir),
                         arbiter.config.disk.min_free_bytes, arbiter.config.disk.min_free_percent)
    except DiskSpaceLow as exc:
        log.error("launch of agent %s refused: %s", name, exc.message)
        raise arbiter._refuse(exc, actor, "launch", scope, name, "") from None
    existing = arbiter.agents.get(name)
    profile_name = request.profile or (existing.profile if existing else
                                       arbiter.config.daemon.default_profile)
    profile = load_profile(profile_name, arbiter.config.daemon.profile_dirs)
    if existing is not None and existing.state == AgentState.KILLED:
        raise arbiter._refuse(
            AgentKilled(f"agent {name!r} was killed ({existing.last_reason or 'no reason'}); "
                        f"an owner must reactivate it first", agent=name,
                        killed_by=existing.last_actor),
            actor, "launch", scope, name, "")
    if existing is not None and held_pause(existing):
        raise arbiter._refuse(
            IllegalTransition(f"agent {name!r} is paused; resume or reactivate it first",
                              agent=name, verb="launch", state=existing.state,
                              paused_by=existing.last_actor),
            actor, "launch", scope, name, "")
    if existing is not None and existing.state != AgentState.IDLE:
        raise AgentBusy(f"agent {name!r} already has a run ({existing.state})", agent=name,
                        run=existing.current_run)
    if arbiter.command_check is not None:
        arbiter.command_check(request.command, profile, request.workspace, request.env,
                           request.image or profile.image)

    async with arbiter._lock(name):
        now = time.time()
        agent = arbiter.agents.get(name) or AgentRecord(
            name=name, agent_class=request.agent_class or "default", profile=profile.name,
            state=AgentState.IDLE.value, created_at=now, updated_at=now,
        )
        if request.agent_class is not None:
            agent.agent_class = request.agent_class
        agent.profile = profile.name
        slot = arbiter._free_slot()
        admitted = await arbiter.admit_workspace(
            request.workspace, actor, arbiter.config,
            lambda error: arbiter._refuse(error, actor, "launch", scope, name, ""))
        previous, _new = arbiter._set_agent_state(agent, Verb.LAUNCH, actor, "")
        run_id = secrets.token_hex(6)
        container_id = f"{arbiter.config.sandbox.name_prefix}-{run_id}"
        run = RunRecord(
            id=run_id, agent=name, state=RunState.STARTING.value, command=request.command,
            profile=profile.name, workspace=request.workspace, container_id=container_id,
            netns=container_id,
            cgroup=f"{arbiter.config.sandbox.cgroup_parent.strip('/')}/{container_id}",
            bundle=str(arbiter.bundles_dir / container_id),
            log_path=str(arbiter.logs_dir / f"{run_id}.log"), uid_slot=slot, started_at=now,
            timeout=(request.timeout if request.timeout is not None
                     else profile.limits.wall_clock),
        )
        agent.current_run = run_id
        live = LiveRun(record=run, profile=profile, tripwires=list(request.tripwires))
        arbiter.agents[name] = agent
        arbiter.live[run_id] = live
        arbiter.store.put_agent(agent)
        arbiter.store.put_run(run)
        try:
            await create_and_start(arbiter, live, profile, request, admitted)
        except BaseException as exc:
            live.ready.set()
            fail_launch(arbiter, agent, live, actor, exc)
            if existing is None and agent.state == AgentState.IDLE:
                # A first launch that failed leaves no agent behind (bad input changes
                # nothing); the run's record and the audit row keep what happened.
                arbiter.agents.pop(name, None)
                arbiter.locks.pop(name, None)
                arbiter.store.delete_agent(name)
            raise
        live.ready.set()
        if agent.state == AgentState.KILLED:
            # A kill raced the launch and owns the run now; the command never started.
            arbiter.audit.append(
                actor=actor.label(), verb="launch", scope=scope, target=name,
                previous_state=previous.value, new_state=agent.state,
                outcome="aborted:killed",
                detail={"run": run_id, "command": request.command, "actor": actor_detail(actor)},
            )
            return arbiter.run_view(run)
        arbiter.audit.append(
            actor=actor.label(), verb="launch", scope=scope, target=name,
            previous_state=previous.value, new_state=agent.state,
            detail={"run": run_id, "command": request.command, "profile": profile.name,
                    "workspace": request.workspace, "timeout": request.timeout,
                    "pid": run.pid, "actor": actor_detail(actor)},
        )
        log.info("launched agent %s run %s pid %s", name, run_id, run.pid)
        return arbiter.run_view(run)


async def create_and_start(arbiter: Arbiter, live: LiveRun, profile: Profile, request: RunRequest,
                           admitted: AdmittedWorkspace | None = None) -> None:
    run = live.record
    network: NetworkAttachment | None = None
    env = dict(request.env)
    if profile.network.mode == "gateway":
        if arbiter.network_provider is None:
            raise EgressSetupFailed(f"profile {profile.name!r} asks for network mode "
                                    f"'gateway' but this supervisor runs no egress gateway",
                                    profile=profile.name)
        network, proxy_env = await arbiter.network_provider(live)
        env.update(proxy_env)
    params = RunParams(
        run_id=run.id, agent=run.agent, container_id=run.container_id, netns=run.netns,
        cgroup=run.cgroup, bundle=Path(run.bundle), log_path=Path(run.log_path),
        profile=profile, command=request.command, uid_slot=run.uid_slot,
        workspace=request.workspace, env=env, network=network,
        workspace_fd=admitted.fd if admitted else None,
        runtime=profile.runtime or arbiter.config.sandbox.runtime,
        image=request.image or profile.image,
    )
    try:
        handle = await arbiter.runtime.launch(params)
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
    held = await hold(arbiter, handle, run, before_start=True)
    if arbiter.before_start is not None:
        try:
            await arbiter.before_start()
        except BaseException:
            with contextlib.suppress(OSError):
                handle.cgroup.kill()
            with contextlib.suppress(Exception):
                await handle.cleanup()
            raise
    if arbiter.agents[run.agent].state == AgentState.KILLED:
        return  # never start the agent's command; the kill path takes it from here
    await handle.start()
    run.pid = handle.pid  # docker: the engine starts the init, so its pid is known only now
    if not held:
        await hold(arbiter, handle, run, before_start=False)
    arbiter._set_run_state(run, Verb.START)
    arbiter.store.put_run(run)
    arbiter.observers.run_started(run)  # tripwires armed, then telemetry
    arbiter.index_run(live)
    live.watcher = arbiter._spawn(ending.watch(arbiter, live))
    if run.timeout is not None:
        loop = asyncio.get_running_loop()
        live.timeout_handle = loop.call_later(
            run.timeout, lambda: arbiter._spawn(ending.expire(arbiter, live, time.perf_counter())))


async def hold(arbiter: Arbiter, handle: RunHandle, run: RunRecord, *, before_start: bool) -> bool:
    """Hold the run's cgroup open for the kill path. A run whose cgroup cannot be held is
    not left running (fail closed): it is killed and the launch fails."""
    try:
        handle.cgroup.hold()
        if arbiter.parent is not None and arbiter.parent.stale():
            # The parent was removed while empty and runc made it again for this run: a
            # global halt's one write must reach the live one.
            log.warning("the runs' parent cgroup was made again; holding the new one")
            arbiter.parent.release()
            arbiter.parent.hold()
            arbiter.kill_index.hold_parent(arbiter.parent)
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


def fail_launch(arbiter: Arbiter, agent: AgentRecord, live: LiveRun, actor: Actor,
                exc: BaseException) -> None:
    run = live.record
    previous = AgentState(agent.state)
    if RunState(run.state) not in RUN_ENDED:  # a kill that raced the launch may have
        live.ending = EndCause.LAUNCH_FAILED
        ending.finalise(arbiter, live, EndCause.LAUNCH_FAILED, reason=f"launch failed: {exc}")
    code = exc.code if isinstance(exc, SupervisorError) else "internal_error"
    arbiter.audit.append(
        actor=actor.label(), verb="launch", scope=f"agent:{agent.name}", target=agent.name,
        previous_state=AgentState.IDLE.value, new_state=agent.state,
        outcome=f"failed:{code}",
        detail={"run": run.id, "error": str(exc), "actor": actor_detail(actor),
                "agent_state_before": previous.value},
    )
    log.error("launch of agent %s failed: %s", agent.name, exc)
