"""Runs contained by the Docker engine, with the same guarantees as runc wherever Docker can
express them, set up as one ordered chain and undone in reverse when a later step fails.
Needs root (the engine's socket, cgroups, /run/netns).

The engine only creates and starts containers. Everything that must hold when the engine does
not goes through the kernel, as with runc: each run's container is placed under a cgroup the
supervisor names (`cgroup_parent` = the run's cgroup), so `cgroup.kill`, `cgroup.freeze` and
`cgroup.events` on that cgroup kill, pause and confirm the whole run even while dockerd is down
or hung. `docker kill` is only the fallback when the cgroup cannot be written.

The output goes into the engine's bounded log of the run (engine_log.py), which the supervisor
follows with timestamps; so the container survives an orderly restart of the daemon whole:
the old daemon hands over where it read to (`DockerRunHandle.hand_over`), the next one checks
the container (`DockerRuntime.adoptable`) and reads on from there (`DockerRuntime.adopted`).

What Docker cannot give: seccomp user notification (the engine takes no listener), so
notified syscalls are rendered as plain EPERM and their attempts are not reported; and no
per-container user namespace (the agent runs as an unprivileged host uid instead)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from docker.types import LogConfig, Mount, Ulimit

from supervisor.errors import (
    EnforcementError,
    EngineUnavailable,
    ImageNotFound,
    RuntimeFailure,
    RuntimeUnsupported,
)
from supervisor.profiles import Profile, load_seccomp
from supervisor.runtime.base import Leftover, NotAdopted, RunParams
from supervisor.runtime.control import (
    CgroupControl,
    UndoStep,
    kill_and_confirm,
    quiet,
    undo_all,
)
from supervisor.runtime.docker_api import (
    LABEL_AGENT,
    LABEL_PREFIX,
    LABEL_RUN,
    DockerEngine,
    OutputStream,
    tar_of,
)
from supervisor.runtime.engine_log import (
    ENGINE_LOG_DRIVER,
    ENGINE_LOG_FILE_SIZE,
    ENGINE_LOG_FILES,
    LogCursor,
)
from supervisor.runtime.init import INIT_PATH, SandboxInit
from supervisor.runtime.network_gate import GATE_PATH, SHELL_PATH, Gate, NetworkGate
from supervisor.runtime.output import OUTPUT_FINISH_TIMEOUT, OutputRecorder, Outputs
from supervisor.runtime.uid_drop import DROP_CAPABILITIES, DROP_PATH, START_USER, UidDrop
from supervisor.runtime.workspace import (
    off_loop,
    pin_workspace,
    stage_workspace,
    workspace_owner,
)
from supervisor.sandbox import netns, workspace_binds
from supervisor.sandbox.bundle import (
    SANDBOX_UID_COUNT,
    WORKSPACE_MOUNT,
    agent_env,
    host_layout,
    render_seccomp,
)
from supervisor.sandbox.cgroups import Cgroup, detect_mode, unified_root
from supervisor.sandbox.workspace_fs import fd_path

log = logging.getLogger(__name__)
T = TypeVar("T")

_CPU_NANOS = 1_000_000_000
# Engine sockets the agent must never reach: a bind of any directory holding one is refused.
_ENGINE_SOCKETS = ("/run/containerd/containerd.sock", "/var/run/docker/containerd")
_EXIT_STATUS_TIMEOUT = 5.0
_EXITING_GRACE = 1.0


class DockerRunHandle(CgroupControl):
    def __init__(self, runtime: DockerRuntime, params: RunParams, container: str,
                 output: OutputRecorder, gate: Gate | None = None) -> None:
        self.runtime = runtime
        # A gateway run's network gate (network_gate.py): opened once the link is attached.
        self.gate = gate
        self.params = params
        self.container = container
        self.cgroup = Cgroup(params.cgroup)
        self.pid: int | None = None
        # The container's network namespace, named under /run/netns once it runs: where the
        # egress gateway wires its veth (see `start`).
        self.netns_path: Path | None = None
        self.output = output
        self._pidfd: int | None = None
        self._exit: asyncio.Future[int | None] | None = None
        self._status_task: asyncio.Future[None] | None = None
        self._cleaned = False
        # How far the engine's log of the run was read (engine_log.py): what a restart
        # hands over so that the next daemon reads on from there.
        self.cursor = LogCursor()

    async def start(self) -> None:
        """Start the container, then prove it is where the kill path expects it: its init in
        the run's cgroup on the v2 tree. Any failure removes the container (fail closed)."""
        try:
            await self.runtime.call(self.runtime.engine.start, self.container)
            if self.gate is not None:
                self.gate.unlink()  # bound into the container now: nothing left on the host
            # From the log's first line: the engine keeps the output from the start on.
            self.follow(await self.runtime.open_log(self.container, self.cursor))
            state = await self.runtime.call(self.runtime.engine.inspect, self.container)
            pid = int(((state or {}).get("State") or {}).get("Pid") or 0)
            if pid:
                # Off the loop: an init that is exiting can hold `_adopt` for up to
                # _EXITING_GRACE, and nothing a run does may hold up another run's kill.
                await asyncio.get_running_loop().run_in_executor(None, self._adopt, pid)
            if self.pid is not None and (wrong := self._misplaced_binds()):
                raise EnforcementError(
                    f"the workspace binds {wrong} are not where the engine was told to mount "
                    f"them (a path in the workspace changed during the launch)",
                    misplaced=wrong)
            if self.params.network is not None and self.netns_path is not None:
                # The engine makes the namespace with the container: the veth and its rules
                # come after the start, while the container's process waits at the gate.
                await asyncio.get_running_loop().run_in_executor(
                    None, self.params.network.attach, self.params.netns)
            if self.gate is not None and self.netns_path is not None:
                self.gate.open()  # the agent starts now, its network in place
        except BaseException:
            if self.params.network is not None:
                quiet(self.params.network.detach)
            await self._abort()
            raise

    def follow(self, stream: OutputStream) -> None:
        """Record the engine's log of the run (`stream`, from `DockerRuntime.open_log`) from
        where the cursor stands."""
        current = [stream]
        self.output.follow(self._frames(current), lambda: current[0].close())

    def _frames(self, current: list[OutputStream]) -> Iterator[bytes]:
        yield from self.cursor.frames(current[0], self._gap)
        # The engine ends a followed log when the container stops, at times before its last
        # lines are read (dockerd 20.10): what is left is read once more, without following,
        # from the cursor (so nothing twice). A stop (close) never gets here: it raises.
        current[0] = self.runtime.streamer.logs(self.container, self.cursor.since(), False)
        yield from self.cursor.frames(current[0])

    def _gap(self) -> None:
        self.output.note("output the agent wrote while no daemon held the run may be missing "
                         "here: the engine's log of it had rotated past the last line recorded")

    async def hand_over(self, timeout: float) -> dict[str, Any] | None:
        """An orderly restart (daemon/handover.py): stop following the engine's log, and say
        where the next daemon reads on (None: the drain did not stop, the run cannot go whole).
        The container runs on, the engine's child, not the daemon's."""
        if not await self.output.hand_over_stream(timeout):
            return None
        return {"runtime": "docker", "output_since": self.cursor.as_wire()}

    def release(self) -> None:
        """Handed over to the next daemon: stop watching the init (its pidfd) and let go of
        the held cgroup files; the container is left exactly as it is."""
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            if self._exit is not None:
                with contextlib.suppress(RuntimeError, ValueError):
                    asyncio.get_running_loop().remove_reader(pidfd)
            os.close(pidfd)
        if self._status_task is not None:
            self._status_task.cancel()
        if self.gate is not None:
            self.gate.close()
        self.cgroup.release()

    def _misplaced_binds(self) -> list[str]:
        """The engine mounts and starts in one step, so this checks just after the start (the
        sources are staged inodes either way: a misplaced destination can only put the
        workspace's own files elsewhere in the container, never a host directory)."""
        assert self.pid is not None
        try:
            return workspace_binds.misplaced(
                self.pid, self.runtime.staged_binds(self.container), WORKSPACE_MOUNT)
        except (FileNotFoundError, ProcessLookupError):
            return []  # the command already ended, and its mount namespace with it

    def _adopt(self, pid: int) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return  # the command already ended; wait_exit asks the engine for its status
        # Read after pidfd_open, so a recycled pid cannot pass as the container's init.
        try:
            in_cgroup = _v2_cgroup_of(pid)
        except (FileNotFoundError, ProcessLookupError):
            # The command already ended and was reaped: before the open (ENOENT), or
            # between the open and the read (the kernel answers ESRCH).
            os.close(pidfd)
            return
        wanted = "/" + self.params.cgroup
        if not (in_cgroup == wanted or in_cgroup.startswith(wanted + "/")):
            os.close(pidfd)
            raise EnforcementError(
                f"container {self.container} runs in cgroup {in_cgroup}, not under {wanted}: "
                f"the kill path could not reach it (is the engine's cgroup driver cgroupfs?)",
                container=self.container, cgroup=in_cgroup, expected=wanted)
        self.pid, self._pidfd = pid, pidfd
        try:
            self.netns_path = netns.adopt(self.params.netns, pid)
        except OSError as exc:
            # An exiting process loses its namespaces before its pidfd turns readable; give
            # the exit a moment to complete before calling this a failure.
            if _alive(pidfd, _EXITING_GRACE):
                raise EnforcementError(
                    f"container {self.container}: cannot name its network namespace for the "
                    f"kill path's teardown: {exc.strerror or exc}",
                    container=self.container, netns=self.params.netns) from exc
            return  # a short command ended meanwhile, and its namespace with it
        # The egress gateway's veth hook belongs here: the namespace exists and is named, the
        # agent holds no CAP_NET_ADMIN in it (Docker made it in the host's user namespace).

    async def _abort(self) -> None:
        """A start that failed: the run killed and removed. What cleanup cannot undo is
        logged, so that the start's own error (what the caller is told) is never replaced."""
        with contextlib.suppress(OSError):
            self.cgroup.kill()
        try:
            await self.cleanup()
        except Exception:
            log.exception("container %s: its removal after a failed start failed",
                          self.container)

    def kill(self, *, force_fallback: bool = False) -> str:
        try:
            return self.cgroup.kill(force_fallback=force_fallback)
        except FileNotFoundError:
            if self.pid is None:
                return "none: the run had no processes"
            # The cgroup vanished under a live run: only the engine can still reach it.
            self.runtime.engine.kill(self.container)
            return "docker-kill"

    def wait_exit(self) -> asyncio.Future[int | None]:
        """Resolve with the command's exit status once the kernel reports the init gone (a
        pidfd, so it holds with the engine down); the status itself comes from the engine,
        None when it cannot say (the arbiter then records 137 for a kill)."""
        if self._exit is not None:
            return self._exit
        loop = asyncio.get_running_loop()
        self._exit = loop.create_future()
        future = self._exit
        pidfd = self._pidfd

        async def status() -> None:
            code = await loop.run_in_executor(
                None, self.runtime.engine.wait, self.container,
                _EXIT_STATUS_TIMEOUT if pidfd is not None else 365 * 86400.0)
            # The engine's log is read a little behind the agent: the run ends once its
            # output is in (bounded), so its end's counts (telemetry, the audit) are whole.
            await self.output.ended(OUTPUT_FINISH_TIMEOUT)
            if not future.done():
                future.set_result(code)

        def exited() -> None:
            assert pidfd is not None
            loop.remove_reader(pidfd)
            self._status_task = asyncio.ensure_future(status())

        if pidfd is None:
            self._status_task = asyncio.ensure_future(status())
        else:
            loop.add_reader(pidfd, exited)
        return future

    async def cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        if self.gate is not None:
            self.gate.close()
        await self.output.finish(OUTPUT_FINISH_TIMEOUT)  # the stream ends with the container
        try:
            await self.runtime.call(self.runtime.engine.delete, self.container)
        except (EngineUnavailable, RuntimeFailure) as exc:
            # The run is dead (the cgroup says so); the stopped container is removed by the
            # next reconcile once the engine answers again.
            log.error("container %s stays until the engine is back: %s", self.container,
                      exc.message)
        self.cgroup.remove()
        if self.params.network is not None:
            self.params.network.detach()
        with contextlib.suppress(OSError):
            netns.remove(self.params.netns)
        quiet(workspace_binds.unstage, self.runtime.workspace_mount(self.container))
        if self._pidfd is not None:
            with contextlib.suppress(OSError, ValueError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def residue(self) -> dict[str, Any]:
        left = self.kernel_residue()
        with contextlib.suppress(EngineUnavailable, RuntimeFailure):
            if self.runtime.engine.inspect(self.container) is not None:
                left["container"] = self.container
        if self.runtime.workspace_mount(self.container).exists():
            left["workspace_mount"] = str(self.runtime.workspace_mount(self.container))
        return left


class DockerRuntime:
    name = "docker"

    def __init__(self, engine: DockerEngine, streamer: DockerEngine, cgroup_parent: str,
                 name_prefix: str, uid_base: int, agent_uid: int, workspace_min_owner_uid: int,
                 max_runs: int, host_root_image: str, state_dir: Path, outputs: Outputs,
                 init: SandboxInit | None = None, uid_drop: UidDrop | None = None,
                 network_gate: NetworkGate | None = None) -> None:
        self.engine = engine
        # Our own tini rather than the engine's --init: the same binary and flags as runc runs,
        # checked by the daemon (fail closed) whatever the engine's init-path says.
        self.init = init if init is not None else SandboxInit()
        # gosu, which takes the container's process from root to the agent's uid: see `launch`.
        self.uid_drop = uid_drop if uid_drop is not None else UidDrop()
        # busybox, which holds a gateway run's process until its network is attached.
        self.network_gate = network_gate if network_gate is not None else NetworkGate()
        self.outputs = outputs
        # A second client without a read timeout: a quiet agent must not end its log stream.
        self.streamer = streamer
        self.cgroup_parent = cgroup_parent.strip("/")
        self.name_prefix = name_prefix
        self.uid_base = uid_base
        self.uid_limit = uid_base + max_runs * SANDBOX_UID_COUNT
        self.agent_uid = agent_uid
        self.workspace_min_owner_uid = workspace_min_owner_uid
        self.host_root_image = host_root_image
        state_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        # Each run's workspace binds, staged from open files (workspace_binds.py).
        self.workspaces_dir = state_dir / "workspaces"
        self.workspaces_dir.mkdir(mode=0o700, exist_ok=True)
        # Each gateway run's gate (network_gate.py), until its container has started.
        self.gates_dir = state_dir / "network-gates"
        self.gates_dir.mkdir(mode=0o700, exist_ok=True)
        for stale in self.gates_dir.iterdir():  # a crash's, between a gate and its start
            with contextlib.suppress(OSError):
                stale.unlink()
        # Bound read-only over masked paths (/etc/shadow, ...): the agent reads it as empty.
        self.empty_file = state_dir / "empty"
        self.empty_file.touch(mode=0o444, exist_ok=True)
        self.empty_file.chmod(0o444)
        self.engine_sockets = [Path(engine.base_url.removeprefix("unix://")).resolve(),
                               *(Path(p) for p in _ENGINE_SOCKETS)]

    async def call(self, func: Callable[..., T], *args: Any) -> T:
        """An engine call off the event loop (the SDK blocks)."""
        return await asyncio.get_running_loop().run_in_executor(None, func, *args)

    def describe(self) -> dict[str, Any]:
        return {"runtime": "docker", "engine": self.engine.base_url,
                "cgroup_mode": detect_mode().value, "cgroup_parent": self.cgroup_parent}

    async def prepare(self) -> None:
        """At daemon start: the engine answers, places containers where the kill path finds
        them, and has the host-root image, and gosu is on the host. Raises (fail closed)
        otherwise."""
        self.uid_drop.check()
        info = await self.call(self.engine.info)
        driver = info.get("CgroupDriver")
        if driver != "cgroupfs":
            raise EnforcementError(
                f"the docker engine uses the {driver!r} cgroup driver; the supervisor needs "
                f"'cgroupfs' to place each run under its own cgroup and kill it there",
                cgroup_driver=driver)
        await self._host_root_image()

    async def _host_root_image(self) -> str:
        """The skeleton image of "host" roots, imported from a tarball made here (no
        registry): merged-/usr links and mount points; the host directories come as binds."""
        if await self.call(self.engine.inspect_image, self.host_root_image) is None:
            links, _binds = host_layout(Profile())
            entries: dict[str, str | None] = {name: None for name in
                                              ("usr", "etc", "tmp", "proc", "dev", "sys",
                                               WORKSPACE_MOUNT.lstrip("/"))}
            entries.update(links)
            repository, _, tag = self.host_root_image.rpartition(":")
            # runc gives a tmpfs the mode of its mount point, whatever mode= says: /tmp must be
            # 1777 in the image for the agent to write its /tmp.
            await self.call(self.engine.import_image, tar_of(entries, {"tmp": 0o1777}),
                            repository, tag)
            log.info("imported the host-root image %s", self.host_root_image)
        return self.host_root_image

    def workspace_mount(self, container_id: str) -> Path:
        return self.workspaces_dir / container_id

    def staged_binds(self, container_id: str) -> list[workspace_binds.Bind]:
        return workspace_binds.load(self.workspace_mount(container_id)).binds

    def _user(self, params: RunParams, workspace_fd: int | None) -> tuple[int, int]:
        base = self.uid_base + params.uid_slot * SANDBOX_UID_COUNT
        uid = gid = base + self.agent_uid
        if params.workspace is not None:
            owner = workspace_owner(params.workspace, self.workspace_min_owner_uid,
                                    range(self.uid_base, self.uid_limit), workspace_fd)
            uid = owner.uid
            if owner.gid is not None:
                gid = owner.gid
        return uid, gid

    def _refuse_engine_socket(self, source: str) -> None:
        root = Path(source).resolve()
        for sock in self.engine_sockets:
            if sock == root or root in sock.parents:
                raise EnforcementError(
                    f"binding {source} would put the container engine's socket {sock} in the "
                    f"agent's reach", source=source, socket=str(sock))

    async def _mounts(self, params: RunParams, image: str | None,
                      staged: workspace_binds.StagedWorkspace | None
                      ) -> tuple[str, list[Mount]]:
        profile = params.profile
        mounts: list[Mount] = []
        bound: list[str] = []
        if image is None:
            if profile.filesystem.root != "host":
                raise RuntimeUnsupported(
                    f"profile {profile.name!r}: a rootfs directory root is runc-only; on "
                    f"docker name an image (profile 'image' or --image)",
                    profile=profile.name, field="filesystem.root")
            image = await self._host_root_image()
            _links, binds = host_layout(profile)
            for path in binds:
                if Path(path).exists():
                    self._refuse_engine_socket(path)
                    mounts.append(Mount(path, path, type="bind", read_only=True))
                    bound.append(path.rstrip("/") + "/")
        elif await self.call(self.engine.inspect_image, image) is None:
            raise ImageNotFound(f"image {image!r} is not on this host (the supervisor never "
                                f"pulls; load or import it first)", image=image)
        for path in profile.filesystem.masked_paths:
            if any(path.startswith(b) for b in bound) and not Path(path).exists():
                continue  # nothing to mask, and no mount point can be made in a read-only bind
            mounts.append(Mount(path, str(self.empty_file), type="bind", read_only=True))
        if staged is not None:
            for bind in staged.binds:
                mounts.append(Mount(f"{WORKSPACE_MOUNT}/{bind.relative}".rstrip("/"),
                                    bind.source, type="bind", read_only=bind.readonly))
        return image, mounts

    async def launch(self, params: RunParams) -> DockerRunHandle:
        undo: list[UndoStep] = []
        workspace_fd: int | None = None
        try:
            profile = params.profile
            staged: workspace_binds.StagedWorkspace | None = None
            if params.workspace is not None:
                workspace_fd = pin_workspace(params.workspace, params.workspace_fd)
                self._refuse_engine_socket(fd_path(workspace_fd))
            uid, gid = self._user(params, workspace_fd)
            seccomp = render_seccomp(load_seccomp(profile.seccomp.profile), None, params.run_id)
            if params.workspace is not None and workspace_fd is not None:
                staging = self.workspace_mount(params.container_id)
                staged = await off_loop(stage_workspace, params.workspace, workspace_fd,
                                         profile.workspace.readonly, staging)
                undo.append(lambda: quiet(workspace_binds.unstage, staging))
            init_binary = self.init.check()
            drop_binary = self.uid_drop.check()
            image, mounts = await self._mounts(params, params.image or profile.image, staged)
            mounts.append(Mount(INIT_PATH, init_binary, type="bind", read_only=True))
            mounts.append(Mount(DROP_PATH, drop_binary, type="bind", read_only=True))
            gate: Gate | None = None
            if params.network is not None:
                shell_binary = self.network_gate.check()
                gate = Gate(self.gates_dir / params.container_id)
                undo.append(gate.close)
                mounts.append(Mount(SHELL_PATH, shell_binary, type="bind", read_only=True))
                mounts.append(Mount(GATE_PATH, str(gate.path), type="bind", read_only=True))
            host_config = self.engine.host_config(
                read_only=True, mounts=mounts,
                tmpfs={"/tmp": f"rw,exec,nosuid,nodev,mode=1777,"
                             f"size={profile.filesystem.tmp_size}"},
                # Until gosu drops to the agent's uid (uid_drop.py), and only for that.
                cap_drop=["ALL"], cap_add=list(DROP_CAPABILITIES),
                security_opt=["no-new-privileges:true", f"seccomp={json.dumps(seccomp)}"],
                network_mode="none", ipc_mode="private", cgroupns="private",
                cgroup_parent="/" + params.cgroup,
                mem_limit=profile.limits.memory, memswap_limit=profile.limits.memory,
                pids_limit=profile.limits.pids,
                nano_cpus=round(profile.limits.cpus * _CPU_NANOS),
                ulimits=[Ulimit(name="nofile", soft=profile.limits.nofile,
                                hard=profile.limits.nofile),
                         Ulimit(name="core", soft=0, hard=0),
                         Ulimit(name="fsize", soft=profile.limits.file_size,
                                hard=profile.limits.file_size)],
                # The engine keeps the output in a bounded log of its own, which the
                # supervisor follows: what a restart's next daemon reads on from.
                log_config=LogConfig(type=ENGINE_LOG_DRIVER,
                                     config={"max-size": ENGINE_LOG_FILE_SIZE,
                                             "max-file": str(ENGINE_LOG_FILES)}),
            )
            output = self.outputs.open(params.run_id, params.log_path, profile)
            undo.append(output.abort)
            undo.append(lambda: self._undo_container(params))
            # The engine starts the container's process as root, so that containerd's shim
            # gives root, not the agent, the stdout and stderr pipes it makes (and fchowns to
            # that uid): the agent could reopen pipes of its own uid by /proc/self/fd and read
            # its output back before the engine records it. gosu drops to the agent's uid and
            # execs the init, which stays PID 1 (uid_drop.py says why this design).
            command = self.uid_drop.wrap(uid, gid, self.init.wrap(params.command))
            if gate is not None:
                command = self.network_gate.wrap(command)
            await self.call(lambda: self.engine.create(
                params.container_id, image, command, host_config=host_config,
                user=START_USER, environment=agent_env(
                    params.run_id, params.workspace is not None, profile, params.env),
                working_dir=WORKSPACE_MOUNT if params.workspace else "/tmp",
                hostname=f"agent-{params.agent}"[:63], network_disabled=True,
                labels={LABEL_PREFIX: self.name_prefix, LABEL_RUN: params.run_id,
                        LABEL_AGENT: params.agent}))
            return DockerRunHandle(self, params, params.container_id, output, gate)
        except BaseException:
            await undo_all(undo)
            raise
        finally:
            if workspace_fd is not None:
                os.close(workspace_fd)

    async def open_log(self, container: str, cursor: LogCursor) -> OutputStream:
        """The engine's log of `container`, followed, from where `cursor` stands."""
        return await self.call(self.streamer.logs, container, cursor.since())

    async def adoptable(self, container: str, pid: int, cgroup: Cgroup) -> str:
        """A restart's next daemon: the container handed over is still the one it was, its
        init `pid` running; its state ("running", or "paused" if the engine paused it). Else
        NotAdopted, with the engine's exit code when the container ended and the kernel says
        its cgroup is empty (it ended by itself while no daemon held it)."""
        try:
            found = await self.call(self.engine.inspect, container)
        except (EngineUnavailable, RuntimeFailure) as exc:
            raise NotAdopted("engine_unavailable", f"the docker engine cannot say what became "
                             f"of container {container}: {exc.message}") from exc
        if found is None:
            raise NotAdopted("container_missing", f"container {container} is gone from the "
                             f"docker engine")
        state = found.get("State") or {}
        if not state.get("Running"):
            code = state.get("ExitCode")
            code = code if isinstance(code, int) and not isinstance(code, bool) else None
            ended = f"container {container} is {state.get('Status')} (exit code {code})"
            if not cgroup.exists():  # someone else's doing: the code is only noted
                raise NotAdopted("cgroup_missing", f"{ended}; its cgroup {cgroup.path} is gone",
                                 exit_code=code)
            if cgroup.populated():
                raise NotAdopted("runtime_state", f"{ended}, yet its cgroup has processes")
            raise NotAdopted("no_processes", f"{ended} and its cgroup is empty", exit_code=code)
        if state.get("Pid") != pid:
            raise NotAdopted("init_changed", f"the engine names init pid {state.get('Pid')}, "
                             f"the handover {pid}")
        return "paused" if state.get("Paused") else "running"

    def adopted(self, params: RunParams, pid: int, pidfd: int, output: OutputRecorder,
                cursor: LogCursor, stream: OutputStream) -> DockerRunHandle:
        """The handle of a run the previous daemon handed over, checked by `adoptable` and
        the caller (its init, through `pidfd`, in the run's cgroup): its output recorded on
        from `cursor`, with `stream` from `open_log`. Takes `pidfd` and `stream`."""
        handle = DockerRunHandle(self, params, params.container_id, output)
        handle.pid, handle._pidfd, handle.cursor = pid, pidfd, cursor
        if netns.exists(params.netns):
            handle.netns_path = netns.path_of(params.netns)
        handle.follow(stream)
        return handle

    async def _undo_container(self, params: RunParams) -> None:
        with contextlib.suppress(EngineUnavailable, RuntimeFailure):
            await self.call(self.engine.delete, params.container_id)
        Cgroup(params.cgroup).remove()

    async def leftovers(self) -> list[Leftover]:
        """Containers a previous instance started (by label). With the engine down there are
        none to list; their cgroups are still found by name and killed (runc's listing)."""
        try:
            containers = await self.call(self.engine.list, f"{LABEL_PREFIX}={self.name_prefix}")
        except EngineUnavailable as exc:
            log.error("cannot list leftover containers: %s", exc.message)
            return []
        found: list[Leftover] = []
        for container in containers:
            name = str((container.get("Names") or ["/?"])[0]).lstrip("/")
            cgroup = f"{self.cgroup_parent}/{name}"
            found.append(Leftover(
                container_id=name, runtime="docker",
                netns=name if netns.exists(name) else None,
                cgroup=cgroup if Cgroup(cgroup).exists() else None,
                pids=Cgroup(cgroup).pids() if Cgroup(cgroup).exists() else []))
        listed = {item.container_id for item in found}
        for staging in self.workspaces_dir.iterdir():  # staged before a container was made
            if staging.name.startswith(f"{self.name_prefix}-") and staging.name not in listed:
                found.append(Leftover(container_id=staging.name, runtime="docker"))
        return found

    async def reap(self, leftover: Leftover, timeout: float) -> dict[str, Any]:
        done: dict[str, Any] = {}
        if leftover.cgroup:
            done.update(await kill_and_confirm(Cgroup(leftover.cgroup), timeout))
        if leftover.container_id:
            try:
                await self.call(self.engine.delete, leftover.container_id)
                done["container_deleted"] = leftover.container_id
            except (EngineUnavailable, RuntimeFailure) as exc:
                done["container_left"] = exc.message
        if leftover.cgroup:
            Cgroup(leftover.cgroup).remove()
        if leftover.netns:
            netns.remove(leftover.netns)
            done["netns_removed"] = leftover.netns
        if leftover.container_id and self.workspace_mount(leftover.container_id).exists():
            left = workspace_binds.unstage(self.workspace_mount(leftover.container_id))
            done["workspace_unmounted"] = str(self.workspace_mount(leftover.container_id))
            if left:
                done["placeholders_left"] = left
        return done

    def parent_cgroup(self) -> Path:
        return unified_root() / self.cgroup_parent


def _alive(pidfd: int, within: float) -> bool:
    """False once the process has exited (its pidfd polls readable), waiting up to `within`."""
    return not select.select([pidfd], [], [], within)[0]


def _v2_cgroup_of(pid: int) -> str:
    """The pid's cgroup on the v2 tree, from /proc (the "0::" line)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise FileNotFoundError(f"/proc/{pid}/cgroup has no v2 entry")
