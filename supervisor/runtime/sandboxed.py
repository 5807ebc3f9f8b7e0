"""Runs contained by runc: network namespace, bundle, cgroups and container, set up as one
ordered chain and undone in reverse when a later step fails. Needs root."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supervisor.errors import EnforcementError, RuntimeFailure
from supervisor.profiles import load_seccomp
from supervisor.runtime.base import Leftover, RunParams
from supervisor.runtime.control import (
    CgroupControl,
    UndoStep,
    kill_and_confirm,
    quiet,
    undo_all,
)
from supervisor.runtime.init import SandboxInit
from supervisor.runtime.output import OUTPUT_FINISH_TIMEOUT, OutputRecorder, Outputs
from supervisor.runtime.runc import Runc, ensure_root
from supervisor.runtime.workspace import (
    off_loop,
    pin_workspace,
    stage_workspace,
    workspace_owner,
)
from supervisor.sandbox import netns, userns, workspace_binds
from supervisor.sandbox.bundle import (
    SANDBOX_UID_COUNT,
    WORKSPACE_MOUNT,
    BundleSpec,
    IdMap,
    remove_bundle,
    write_bundle,
)
from supervisor.sandbox.cgroups import Cgroup, detect_mode, unified_root
from supervisor.sandbox.proc_exits import Exit, pidfd_exit
from supervisor.sandbox.userns import UsernsLimits

if TYPE_CHECKING:
    from supervisor.sandbox.proc_exits import ExitEvents

log = logging.getLogger(__name__)

# A run's cleanup (step 6, after its kill was answered) is background work: its `runc delete`
# runs at this nice value, so on a host whose daemons kill at once (a fleet halt) the kills
# and their answers get the CPU first.
CLEANUP_NICE = 10


# How long an init SIGKILLed at the owners' acceptor waits unreaped for its kill path.
REAP_DEFER_MAX = 10.0

class RuncRunHandle(CgroupControl):
    def __init__(self, runtime: RuncRuntime, params: RunParams, pid: int, pidfd: int,
                 output: OutputRecorder) -> None:
        self.runtime = runtime
        self.params = params
        self.pid: int | None = pid
        self._pidfd: int | None = pidfd
        self.output = output
        self.cgroup = Cgroup(params.cgroup)
        self._exit: asyncio.Future[int | None] | None = None
        self._cleaned = False
        # An adopted run (daemon/handover.py): its init is not this daemon's child, so its
        # status comes from the kernel's process exit events or, without them (or with the
        # event lost), from its pidfd; why it is unknown if it is.
        self.exits: ExitEvents | None = None
        self.exit_unknown: str | None = None
        self._from_events: asyncio.Task[None] | None = None
        # The loop's reader of the init's pidfd (`wait_exit`), and whether `hush` took it off.
        self._reap: Callable[[], None] | None = None
        self._hushed = False
        # Set by the owners' acceptor's thread before it SIGKILLs this run
        # (sandbox/killindex.py): the init's death is then left unreaped, as `hush` leaves it.
        self.reap_deferred = False

    async def start(self) -> None:
        await self.runtime.runc.start(self.params.container_id, init_pidfd=self._pidfd)

    def wait_exit(self) -> asyncio.Future[int | None]:
        """Resolve with the init's exit status once the kernel reports it gone.

        The daemon is a child subreaper, so the container's init (orphaned when `runc create`
        exits) is our child and waitpid gives its real status; an adopted run's is not."""
        if self._exit is not None:
            return self._exit
        loop = asyncio.get_running_loop()
        self._exit = loop.create_future()
        pidfd = self._pidfd

        def reap() -> None:
            assert self._exit is not None
            if self.reap_deferred and pidfd is not None and not self._hushed:
                # SIGKILLed at the owners' acceptor, before its request reached the loop:
                # hushed now, as the kill's sweep would have, and reaped at step 6; or after
                # REAP_DEFER_MAX if no kill path came (its exit watcher then settles it).
                loop.remove_reader(pidfd)
                self._hushed = True
                loop.call_later(REAP_DEFER_MAX, self._unhush)
                return
            if pidfd is not None:
                loop.remove_reader(pidfd)
            self._reap = None  # it fired: nothing left to hush
            status: int | None = None
            if self.pid is not None:
                try:
                    _pid, raw = os.waitpid(self.pid, 0)
                    status = os.waitstatus_to_exitcode(raw)
                    status = 128 - status if status < 0 else status
                except ChildProcessError:
                    self._from_events = loop.create_task(self._status_of_adopted(self.pid))
                    return
            self._close_pidfd()
            if not self._exit.done():
                self._exit.set_result(status)

        if pidfd is None:
            self._exit.set_result(None)
        else:
            self._reap = reap
            loop.add_reader(pidfd, reap)
        return self._exit

    def hush(self) -> None:
        """A scoped halt is about to kill this run with others: stop watching the init until
        `cleanup` (step 6, after the answer). A hundred inits dying at once otherwise woke the
        loop a hundred times and reaped a hundred pid namespaces (the kernel's release of each,
        on the loop's thread) while the kernel was still killing (docs/benchmarks.md run 12).
        The init waits as a zombie meanwhile; a killed run's status is SIGKILL's until it is
        reaped (liverun.exit_status)."""
        if self._pidfd is None or self._reap is None or self._hushed:
            return
        with contextlib.suppress(RuntimeError):  # no loop: nothing is watching
            asyncio.get_running_loop().remove_reader(self._pidfd)
            self._hushed = True

    def defer_reap(self) -> None:
        """On any thread: the init's death, when it comes, is not reaped before step 6."""
        self.reap_deferred = True

    def _unhush(self) -> None:
        self.reap_deferred = False
        if self._hushed and self._pidfd is not None and self._reap is not None:
            self._hushed = False
            asyncio.get_running_loop().add_reader(self._pidfd, self._reap)

    async def _status_of_adopted(self, pid: int) -> None:
        """The exit events first (as before the pidfd kept statuses), then the pidfd, whose
        status the kernel keeps whoever reaped the init (proc_exits.pidfd_exit)."""
        got = Exit(None, "no exit events were handed over")
        try:
            if self.exits is not None:
                got = await asyncio.to_thread(self.exits.status, pid)
            if got.code is None and self._pidfd is not None:
                by_pidfd = await asyncio.to_thread(pidfd_exit, self._pidfd)
                got = by_pidfd if by_pidfd.code is not None else Exit(
                    None, f"{self.exit_unknown or got.why}; {by_pidfd.why}")
        finally:
            self._close_pidfd()
        self.exit_unknown = got.why or None
        assert self._exit is not None
        if not self._exit.done():
            self._exit.set_result(got.code)

    def _close_pidfd(self) -> None:
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            os.close(pidfd)

    def release(self) -> None:
        """Handed over to the next daemon: stop watching the init (its pidfd) and let go of
        the held cgroup files; the run itself is left exactly as it is."""
        if self.exits is not None and self.pid is not None:
            self.exits.forget(self.pid)
            self.exits = None
        pidfd, self._pidfd = self._pidfd, None
        self._hushed = False
        if pidfd is not None:
            if self._exit is not None:
                with contextlib.suppress(RuntimeError):
                    asyncio.get_running_loop().remove_reader(pidfd)
            os.close(pidfd)
        self.cgroup.release()

    async def cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        self._unhush()  # the init is reaped now, beside the runtime's delete
        delete = asyncio.ensure_future(self._delete())
        try:
            # To delete a container that has stopped, runc reads and removes only its own
            # state (under its --root), never the bundle: once no process of the run is left,
            # the rest goes on beside its delete (an embedded CI run waits for all of it).
            # Otherwise (a run whose delete still kills) the delete comes first.
            if not self._empty():
                await delete
            await self.output.finish(OUTPUT_FINISH_TIMEOUT)  # no writer is left: read to the end
            if self.params.network is not None:
                self.params.network.detach()
            with contextlib.suppress(OSError):
                netns.remove(self.params.netns)
            quiet(workspace_binds.unstage,
                  self.runtime.workspace_mount(self.params.container_id))
            # A bundle is a tree of files: removed off the loop, which may be serving a kill.
            await asyncio.to_thread(remove_bundle, self.params.bundle)
        finally:
            await delete
            self.cgroup.remove()  # after the delete: runc's removes what it made in it

    async def _delete(self) -> None:
        # As runc deletes a stopped container, without a runc process (Runc.remove_stopped);
        # its cgroup goes after, with every run's (cleanup).
        if self._stopped() and await asyncio.to_thread(
                self.runtime.runc.remove_stopped, self.params.container_id):
            return
        with contextlib.suppress(RuntimeFailure):
            await self.runtime.runc.delete(self.params.container_id, force=True,
                                           nice=self.runtime.cleanup_nice)

    def _stopped(self) -> bool:
        """Whether the run has stopped as runc means it: its init dead (its exit seen) and
        no process of the run left in its cgroup."""
        return self._exit is not None and self._exit.done() and self._empty()

    def _empty(self) -> bool:
        """Whether no process of the run is left in its cgroup (False if it cannot be told)."""
        try:
            return not self.cgroup.populated()
        except OSError:
            return False

    def residue(self) -> dict[str, Any]:
        left = self.kernel_residue()
        if self.params.bundle.exists():
            left["bundle"] = str(self.params.bundle)
        if self.runtime.workspace_mount(self.params.container_id).exists():
            left["workspace_mount"] = str(self.runtime.workspace_mount(self.params.container_id))
        return left


class RuncRuntime:
    name = "runc"

    def __init__(self, runc_binary: str, runc_root: Path, cgroup_parent: str, name_prefix: str,
                 uid_base: int, agent_uid: int, workspace_min_owner_uid: int,
                 workspaces_dir: Path, bundles_dir: Path, max_runs: int,
                 outputs: Outputs, seccomp_listener: Path | None = None,
                 userns_limits: UsernsLimits | None = None,
                 init: SandboxInit | None = None, cleanup_nice: int = CLEANUP_NICE) -> None:
        self.runc = Runc(runc_binary, runc_root)
        # The nice value of a run's `runc delete` (0: its cleanup is no background work, as
        # for an embedded CI run, which answers only once it is done).
        self.cleanup_nice = cleanup_nice
        self.init = init if init is not None else SandboxInit()
        self.outputs = outputs
        # Written into each run's user namespace before it starts (sandbox/userns.py).
        self.userns_limits = userns_limits
        # The daemon's seccomp notify socket; None renders notified syscalls as plain EPERM.
        self.seccomp_listener = seccomp_listener
        self.bundles_dir = bundles_dir
        self.workspaces_dir = workspaces_dir
        workspaces_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        workspaces_dir.chmod(0o711)
        self.cgroup_parent = cgroup_parent.strip("/")
        self.name_prefix = name_prefix
        self.uid_base = uid_base
        self.uid_limit = uid_base + max_runs * SANDBOX_UID_COUNT
        self.agent_uid = agent_uid
        self.workspace_min_owner_uid = workspace_min_owner_uid
        ensure_root(runc_root)

    def describe(self) -> dict[str, Any]:
        return {"runtime": "runc", "cgroup_mode": detect_mode().value,
                "cgroup_parent": self.cgroup_parent, "runc_root": str(self.runc.root)}

    def _id_maps(self, slot: int, workspace: str | None, workspace_fd: int | None
                 ) -> tuple[IdMap, IdMap]:
        base = self.uid_base + slot * SANDBOX_UID_COUNT
        agent_uid = agent_gid = base + self.agent_uid
        if workspace is not None:
            owner = workspace_owner(workspace, self.workspace_min_owner_uid,
                                    range(self.uid_base, self.uid_limit), workspace_fd)
            agent_uid = owner.uid
            if owner.gid is not None:
                agent_gid = owner.gid
        return (IdMap(base, self.agent_uid, agent_uid), IdMap(base, self.agent_uid, agent_gid))

    async def launch(self, params: RunParams) -> RuncRunHandle:
        undo: list[UndoStep] = []
        loop = asyncio.get_running_loop()
        workspace_fd: int | None = None
        try:
            if params.workspace is not None:
                workspace_fd = pin_workspace(params.workspace, params.workspace_fd)
            uid_map, gid_map = self._id_maps(params.uid_slot, params.workspace, workspace_fd)
            seccomp = load_seccomp(params.profile.seccomp.profile)
            init_binary = self.init.check()

            netns_path = await loop.run_in_executor(None, netns.create, params.netns)
            undo.append(lambda: quiet(netns.remove, params.netns))
            if (network := params.network) is not None:
                undo.append(network.detach)
                await loop.run_in_executor(None, network.attach, params.netns)

            staged: workspace_binds.StagedWorkspace | None = None
            if params.workspace is not None and workspace_fd is not None:
                staging = self.workspace_mount(params.container_id)
                staged = await off_loop(stage_workspace, params.workspace, workspace_fd,
                                         params.profile.workspace.readonly, staging)
                undo.append(lambda: quiet(workspace_binds.unstage, staging))
            root_bind = staged.binds[0] if staged else None

            spec = BundleSpec(
                run_id=params.run_id, hostname=f"agent-{params.agent}"[:63],
                command=self.init.wrap(params.command), profile=params.profile,
                seccomp=seccomp, init_binary=init_binary,
                uid_map=uid_map, gid_map=gid_map, cgroups_path=f"/{params.cgroup}",
                netns_path=str(netns_path),
                workspace=root_bind.source if root_bind else None, env=params.env,
                workspace_binds=tuple(staged.binds[1:]) if staged else (),
                seccomp_listener=str(self.seccomp_listener) if self.seccomp_listener else None,
            )
            write_bundle(params.bundle, spec)
            undo.append(lambda: quiet(remove_bundle, params.bundle))

            # The agent's stdout and stderr: a pipe the supervisor drains, never the log file.
            output = self.outputs.open(params.run_id, params.log_path, params.profile)
            undo.append(output.abort)
            stdio = output.pipe()

            undo.append(lambda: self._undo_container(params))
            try:
                pid = await self.runc.create(
                    params.container_id, params.bundle, params.bundle / "init.pid", stdio,
                    params.bundle / "runc.log",
                )
            finally:
                os.close(stdio)  # the container's processes and the recorder hold the rest
            if self.userns_limits is not None:  # created, not started: the agent has not run
                await userns.apply(pid, self.userns_limits)
            pidfd = os.pidfd_open(pid)
            undo.append(lambda: quiet(os.close, pidfd))
            if staged is not None and (wrong := await off_loop(
                    workspace_binds.misplaced, pid, staged.binds, WORKSPACE_MOUNT)):
                raise EnforcementError(
                    f"the workspace binds {wrong} are not where runc was told to mount them "
                    f"(a path in the workspace changed during the launch); refusing to start",
                    misplaced=wrong)
            cgroup = Cgroup(params.cgroup)
            if not cgroup.exists():
                raise EnforcementError(
                    f"runc created {params.container_id} but its cgroup {cgroup.path} is missing",
                    cgroup=str(cgroup.path),
                )
            return RuncRunHandle(self, params, pid, pidfd, output)
        except BaseException:
            await undo_all(undo)
            raise
        finally:
            if workspace_fd is not None:
                os.close(workspace_fd)

    def workspace_mount(self, container_id: str) -> Path:
        return self.workspaces_dir / container_id

    async def _undo_container(self, params: RunParams) -> None:
        with contextlib.suppress(RuntimeFailure):
            await self.runc.delete(params.container_id, force=True)
        Cgroup(params.cgroup).remove()

    async def leftovers(self) -> list[Leftover]:
        found: dict[str, Leftover] = {}
        prefix = f"{self.name_prefix}-"
        for state in await self.runc.list():
            found.setdefault(state.id, Leftover()).container_id = state.id
        for name in netns.list_with_prefix(prefix):
            found.setdefault(name, Leftover()).netns = name
        for directory in (self.workspaces_dir, self.bundles_dir):
            if directory.is_dir():
                for path in directory.iterdir():
                    if path.name.startswith(prefix):
                        found.setdefault(path.name, Leftover()).container_id = path.name
        parent = unified_root() / self.cgroup_parent
        if parent.is_dir():
            for child in parent.iterdir():
                if child.is_dir() and child.name.startswith(prefix):
                    entry = found.setdefault(child.name, Leftover())
                    entry.cgroup = f"{self.cgroup_parent}/{child.name}"
                    entry.pids = Cgroup(entry.cgroup).pids()
        return list(found.values())

    async def reap(self, leftover: Leftover, timeout: float) -> dict[str, Any]:
        """Kill and remove what a previous instance left; returns what was done."""
        done: dict[str, Any] = {}
        if leftover.cgroup:
            done.update(await kill_and_confirm(Cgroup(leftover.cgroup), timeout))
        if leftover.container_id:
            with contextlib.suppress(RuntimeFailure):
                await self.runc.delete(leftover.container_id, force=True)
            done["container_deleted"] = leftover.container_id
        if leftover.cgroup:
            Cgroup(leftover.cgroup).remove()
        if leftover.netns:
            netns.remove(leftover.netns)
            done["netns_removed"] = leftover.netns
        if leftover.container_id:
            mount = self.workspace_mount(leftover.container_id)
            if mount.exists():
                if left := workspace_binds.unstage(mount):
                    done["placeholders_left"] = left
                done["workspace_unmounted"] = str(mount)
            bundle = self.bundles_dir / leftover.container_id
            if bundle.exists():
                remove_bundle(bundle)
                done["bundle_removed"] = str(bundle)
        return done

    def parent_cgroup(self) -> Path:
        return unified_root() / self.cgroup_parent
