"""The supervisor core, assembled once for the daemon and once per embedded CI run: directories,
subreaper, seccomp listener, the runc runtime, the watchdog, state and audit, the arbiter (verbs
and the kill path), telemetry and tripwires. What only a long-lived daemon has (control socket,
metrics, webhooks, drills, break-glass, self-test policy) stays in main.py. Needs root.

Whatever is wired here reaches both modes: the egress gateway goes into `assemble` (kill step
2's credentials, a run observer) and publishes its per-run record through `Core.egress`, which
the CI report reads."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supervisor.audit import AuditLog
from supervisor.audit.reserve import DiskReserve
from supervisor.config import Config
from supervisor.daemon.arbiter import SYSTEM, Arbiter
from supervisor.daemon.containment import Containment
from supervisor.daemon.egress import EgressControl
from supervisor.daemon.observers import RunObservers
from supervisor.daemon.store import Store, connect
from supervisor.daemon.watchdog import Watchdog
from supervisor.errors import EnforcementError
from supervisor.runtime.base import Runtime
from supervisor.runtime.init import SandboxInit
from supervisor.runtime.output import Outputs
from supervisor.runtime.router import RuntimeRouter
from supervisor.runtime.sandboxed import CLEANUP_NICE, RuncRuntime
from supervisor.sandbox import budget, runs_parent, userns
from supervisor.sandbox.cgroups import Cgroup, CgroupMode, detect_mode
from supervisor.sandbox.command import check_command
from supervisor.sandbox.libc import set_child_subreaper
from supervisor.sandbox.seccomp_notify import SeccompListener, unsupported_reason
from supervisor.telemetry.sampler import TelemetryHub
from supervisor.telemetry.store import SummaryStore

if TYPE_CHECKING:
    from supervisor.runtime.containerized import DockerRuntime

log = logging.getLogger(__name__)


def _release_reserve(reserve: DiskReserve, audit: AuditLog, cause: BaseException) -> bool:
    if reserve.release(cause):
        audit.alarms.disk_reserve = f"released at a failed audit write: {cause}"
        return True
    return False


def _take_reserve(reserve: DiskReserve) -> None:
    try:
        taken = reserve.ensure()
    except OSError as exc:
        log.critical("cannot make the disk reserve %s: %s", reserve.path, exc)
        return
    if not taken:
        log.critical("no room for the %d-byte disk reserve in %s", reserve.size,
                     reserve.path.parent)


def docker_runtime_for(config: Config, outputs: Outputs | None = None) -> DockerRuntime:
    """Imported only where docker is enabled: the SDK and its HTTP stack are not small."""
    from supervisor.runtime.containerized import DockerRuntime
    from supervisor.runtime.docker_api import DockerEngine

    return DockerRuntime(
        engine=DockerEngine(config.docker.socket, config.docker.api_timeout),
        streamer=DockerEngine(config.docker.socket, None),
        cgroup_parent=config.sandbox.cgroup_parent, name_prefix=config.sandbox.name_prefix,
        uid_base=config.sandbox.uid_base, agent_uid=config.sandbox.agent_uid,
        workspace_min_owner_uid=config.sandbox.workspace_min_owner_uid,
        max_runs=config.sandbox.max_runs, host_root_image=config.docker.host_root_image,
        state_dir=config.daemon.runtime_dir / "docker",
        outputs=outputs if outputs is not None else Outputs(config.output.max_bytes),
        init=SandboxInit(Path(config.sandbox.init)),
    )


def prepare_directories(config: Config) -> None:
    # runtime_dir is 0751 and bundles 0711: a sandbox's root (an unprivileged host uid) must
    # traverse them to reach its rootfs, but nobody may list them.
    for directory, perms in ((config.daemon.runtime_dir, 0o751),
                             (config.daemon.runtime_dir / "bundles", 0o711),
                             (config.daemon.state_dir, 0o700)):
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(perms)


@dataclass
class RunSampling:
    """Telemetry as the arbiter's `Sampler`: a running run is sampled from its cgroup, with
    the counters the gateway (veth bytes, MCP calls) and its output pipe keep for it."""

    hub: TelemetryHub
    outputs: Outputs
    gateway: EgressControl

    def run_started(self, run_id: str, cgroup: str, started_at: float) -> None:
        self.hub.register(run_id, Cgroup(cgroup), started_at,
                          network_counter=self.gateway.network_counter(run_id),
                          output_counter=self.outputs.counter(run_id),
                          mcp_counter=self.gateway.mcp_counter(run_id))

    def run_ended(self, run_id: str) -> None:
        self.hub.unregister(run_id)


@dataclass
class Core:
    """The supervisor core, assembled: everything the daemon and an embedded run drive."""
    config: Config
    mode: CgroupMode
    seccomp: SeccompListener | None
    runtime: RuntimeRouter
    watchdog: Watchdog
    watchdog_record: Path
    audit: AuditLog
    store: Store
    arbiter: Arbiter
    telemetry: TelemetryHub
    containment: Containment
    summaries: SummaryStore
    # Every run's output on its way to its log file (supervisor/runtime/output.py).
    outputs: Outputs
    # The egress gateway: tokens, approvals, and each run's calls, spend and refusals.
    egress: EgressControl | None = None
    reserve: DiskReserve | None = None
    # The reserve being taken on a thread (assemble's `settle_at_start`); None: taken.
    reserving: asyncio.Future[None] | None = None

    @classmethod
    async def assemble(cls, config: Config, *, ephemeral: bool = False,
                       settle_at_start: bool = False,
                       cleanup_nice: int = CLEANUP_NICE) -> Core:
        """Everything up to (not including) reconcile and the self-test. Appends no audit row,
        so a subscriber attached right after (the webhook outbox) sees every one.
        `ephemeral`: the state directory lives for this process only (an embedded CI run's);
        its database skips what only a long-lived one needs (daemon/store.py `connect`).
        `settle_at_start`: return while the watchdog is still being spawned and moved into
        its cgroup and the disk reserve preallocated; the first run's launch waits for both
        before its command starts (`ready_to_start`). An embedded CI run's: its reconcile,
        bundle and `runc create` go on meanwhile, and runc's own move of the run into its
        cgroups shares the kernel's wait (an RCU grace period) with the watchdog's.
        `cleanup_nice`: the nice value of a run's `runc delete` (runtime/sandboxed.py); an
        embedded CI run's cleanup is on its way to the answer, not background work."""
        if os.geteuid() != 0:
            raise EnforcementError("the supervisor must run as root to contain agents")
        mode = detect_mode()
        if mode is CgroupMode.NONE:
            raise EnforcementError("no cgroup v2 tree: cannot kill a run's cgroup atomically")
        prepare_directories(config)
        # Container inits are orphaned when `runc create` exits; as subreaper we inherit them
        # and waitpid gives each run's true exit status.
        set_child_subreaper()

        # Seccomp notify (supervisor/sandbox/seccomp_notify.py): runc hands each run's notify fd
        # to this socket; every escape-class attempt is answered EPERM, then given to
        # `seccomp.observers`. Off ([telemetry] seccomp_listener = "", or a kernel runc cannot
        # notify on): the filter itself answers the same syscalls EPERM, unreported.
        seccomp: SeccompListener | None = None
        if config.seccomp_listener is not None:
            if (why := unsupported_reason()) is None:
                seccomp = SeccompListener(config.seccomp_listener)
                await seccomp.start()
            else:
                log.warning("no syscall telemetry: %s; escape-class syscalls stay EPERM", why)
        # Kernel resources an agent's runs are charged to: host root's per-user limits and the
        # runs' parent cgroup (supervisor/sandbox/userns.py, budget.py). Fail closed.
        res = config.resources
        run_limits = userns.UsernsLimits.for_runs(res.run_inotify_instances,
                                                  res.run_inotify_watches).present()
        userns.raise_host_limits(run_limits, config.sandbox.max_runs, {
            "max_inotify_instances": res.host_inotify_instances_reserve,
            "max_inotify_watches": res.host_inotify_watches_reserve})
        runs_budget = budget.RunsBudget.for_host(res.runs_pids_max, res.host_pids_reserve,
                                                 res.runs_memory_max, res.host_memory_reserve)
        made = not runs_parent.exists(config.sandbox.cgroup_parent)
        takes = made or runs_parent.holds_runs(config.sandbox.cgroup_parent)
        budget.apply(config.sandbox.cgroup_parent, runs_budget)
        # The parent is the supervisor's from here (the start refused one that was not:
        # sandbox/runs_parent.py); the mark tells a later start so. An existing empty one may
        # be another tool's: left unmarked, judged again at every start.
        if takes:
            runs_parent.mark(config.sandbox.cgroup_parent)
        else:
            log.info("%s existed, empty: not marked as the supervisor's",
                     config.sandbox.cgroup_parent)
        # Output reaches each run's log file through a pipe or stream the supervisor drains,
        # up to the run's cap (supervisor/runtime/output.py).
        outputs = Outputs(config.output.max_bytes)
        runc = RuncRuntime(
            runc_binary=config.sandbox.runc_path, runc_root=config.daemon.runtime_dir / "runc",
            cgroup_parent=config.sandbox.cgroup_parent, name_prefix=config.sandbox.name_prefix,
            uid_base=config.sandbox.uid_base, agent_uid=config.sandbox.agent_uid,
            workspace_min_owner_uid=config.sandbox.workspace_min_owner_uid,
            workspaces_dir=config.daemon.runtime_dir / "workspaces",
            bundles_dir=config.daemon.runtime_dir / "bundles", max_runs=config.sandbox.max_runs,
            outputs=outputs, seccomp_listener=seccomp.path if seccomp else None,
            userns_limits=run_limits, init=SandboxInit(Path(config.sandbox.init)),
            cleanup_nice=cleanup_nice,
        )
        runtimes: dict[str, Runtime] = {"runc": runc}
        # Docker (supervisor/runtime/containerized.py): the engine must answer now, with the
        # cgroupfs driver, or nothing starts (fail closed).
        if config.docker_enabled:
            docker_runtime = docker_runtime_for(config, outputs)
            await docker_runtime.prepare()
            runtimes["docker"] = docker_runtime
        runtime = RuntimeRouter(runtimes, config.sandbox.runtime, config.sandbox.cgroup_parent,
                                runs_budget)
        watchdog_record = config.daemon.state_dir / "watchdog.jsonl"
        runtime.parent_cgroup().mkdir(parents=True, exist_ok=True)
        watchdog = Watchdog(runtime.parent_cgroup(), watchdog_record,
                            config.kill.confirm_timeout,
                            runs_leave_host_memory=budget.leaves_host_memory(
                                config.sandbox.cgroup_parent, runs_budget),
                            settle=False)  # moved into its cgroup while the rest is built

        db = connect(config.daemon.state_dir / "state.db", ephemeral=ephemeral)
        # Audit and state (supervisor/audit/, daemon/store.py): a failed write releases the
        # disk reserve so the kill path's rows fit, and is retried, never lost.
        reserve = DiskReserve(config.daemon.state_dir / "disk-reserve",
                              config.audit.reserve_bytes)
        # Preallocated and fsynced (1-4 ms): beside the rest when the first run waits for it.
        reserving = (asyncio.ensure_future(asyncio.to_thread(_take_reserve, reserve))
                     if settle_at_start else None)
        if reserving is None:
            _take_reserve(reserve)
        audit = AuditLog(db, queue_max=config.audit.queue_max)
        audit.on_write_failure.append(functools.partial(_release_reserve, reserve, audit))
        store = Store(db, reserve=reserve, alarms=audit.alarms)
        # Every run's cgroup lives under the parent, held open from now on: a global halt is
        # one write to its cgroup.kill, which needs no new descriptor.
        parent = Cgroup(config.sandbox.cgroup_parent).hold()
        arbiter = Arbiter(config, store, audit, runtime, parent=parent,
                          command_check=check_command)
        # Telemetry: one sampler thread reads every running run's cgroup and processes and hands
        # the samples to the loop; at a run's end its summary goes to SQLite.
        summaries = SummaryStore(db, batches=store)
        telemetry = TelemetryHub(config.telemetry.rate_hz, config.telemetry.process_every,
                                 config.telemetry.window, asyncio.get_running_loop(),
                                 store=summaries)
        telemetry.start()
        # Tripwires: samples and syscall attempts in, audited firings and pause/kill out.
        containment = Containment(arbiter, counter=telemetry.add_syscall_attempt)
        telemetry.tripwires = containment.on_sample
        audit.subscribe(containment.on_audit)
        outputs.tripwires = containment.output_capped
        if seccomp is not None:
            seccomp.observers.tripwires = containment.on_attempt
        # The egress gateway (supervisor/egress/, supervisor/daemon/egress.py): its own process
        # and cgroup; veth + nftables per gateway run, tokens revoked at kill step 2.
        egress = EgressControl(config, arbiter, containment, audit, db,
                               asyncio.get_running_loop())
        arbiter.network_provider = egress.prepare
        arbiter.credentials = egress  # kill step 2: the gateway's session tokens
        # Who the arbiter tells of a run's start and end, a pause, a resume and reconcile,
        # each by name (daemon/observers.py); main.py adds the fleet.
        arbiter.observers = RunObservers(
            sampler=RunSampling(telemetry, outputs, egress), tripwires=containment,
            seccomp=seccomp, gateway=egress, background=telemetry)
        if not settle_at_start:
            watchdog.settle()  # in its own cgroup (or escape_error says why not) before any run
        core = cls(config=config, mode=mode, seccomp=seccomp, runtime=runtime,
                   watchdog=watchdog, watchdog_record=watchdog_record, audit=audit, store=store,
                   arbiter=arbiter, telemetry=telemetry, containment=containment,
                   summaries=summaries, outputs=outputs, egress=egress,
                   reserve=reserve, reserving=reserving)
        if settle_at_start:
            arbiter.before_start = core.ready_to_start
        return core

    def watch_watchdog(self, on_lost: Callable[[Exception], None] | None = None) -> None:
        """From now on the watchdog's death is noticed on the running loop (its pidfd) and a
        new one spawned at once, logged and audited (`watchdog_respawn`): the daemon's and an
        embedded CI run's, so that a watchdog killed by a bug or an operator never leaves the
        agents without their switch while this process lives. When no new one can be started
        the failure is logged and audited (outcome `failed`) and `on_lost` told (the embedded
        runner kills its run: fail closed); without one the daemon's heartbeat check
        (`watchdog process`, main.py) reports the dead watchdog."""
        watchdog, audit = self.watchdog, self.audit

        def died(code: int | None) -> None:
            log.critical("the watchdog exited (%s); a new one is running as pid %d",
                         code, watchdog.proc.pid)
            audit.append(actor=SYSTEM.label(), verb="watchdog_respawn", scope="global",
                         outcome="ok", detail={"exit_code": code, "new_pid": watchdog.proc.pid})

        def lost(code: int | None, exc: Exception) -> None:
            log.critical("the watchdog exited (%s) and no new one could be started: %s",
                         code, exc)
            audit.append(actor=SYSTEM.label(), verb="watchdog_respawn", scope="global",
                         outcome="failed", detail={"exit_code": code, "error": str(exc)[:500]})
            if on_lost is not None:
                on_lost(exc)

        watchdog.on_death = died
        watchdog.on_lost = lost
        watchdog.watch(asyncio.get_running_loop())

    async def ready_to_start(self) -> None:
        """What a run's command waits for when the core was assembled with
        `settle_at_start`: the disk reserve taken and the watchdog in its cgroup."""
        if self.reserving is not None:
            await self.reserving
        await self.watchdog.settled()

    async def discard_reserve(self) -> None:
        """Once every run has ended, in a core whose state directory goes with it (an embedded
        CI run's): the disk reserve's file removed now, on a thread (unlinking 32 MiB takes
        1-4 ms), rather than with the directory. Its room is given back either way, which is
        all a failed write of the last audit rows would have released it for."""
        if self.reserving is not None:
            await self.reserving
        if self.reserve is not None:
            await asyncio.to_thread(self.reserve.discard)

    def egress_record(self, run_id: str) -> dict[str, Any] | None:
        """The one source of a CI report's egress fields (denied egress, gateway calls, spend).
        None for a run that had no gateway (network mode "none": no egress at all)."""
        return None if self.egress is None else self.egress.run_record(run_id)

    async def stop_observers(self) -> None:
        """After every run has ended: the gateway, the sampler thread, the seccomp listener."""
        if self.egress is not None:
            await self.egress.stop()
        self.telemetry.stop()
        if self.seccomp is not None:
            await self.seccomp.stop()

    def close(self) -> None:
        """Last: the watchdog stands down and the database closes."""
        self.watchdog.disarm()
        self.audit.close()  # the writer drains its queue and signs a last checkpoint
        self.store.flush()
        self.store.db.close()
