"""Stdio MCP servers started for a run, each in a sandbox of its own: its own runc container,
cgroup (beside the run's under the runs' parent, never inside it, with the server's memory,
pids and CPU limits), empty network namespace (loopback only), user namespace on a uid range
of its own (past every run's), the default seccomp filter, a read-only root; the secrets it
is declared to need as environment variables or files under /run/secrets, and nothing else.
Its stdin and stdout are one end of a socketpair; the other goes to the gateway worker,
which bridges the agent's HTTP to it (supervisor/mcp/stdio.py). Needs root; runs in the
daemon's loop, the blocking steps on threads.

Lifetime: started with the run (before the agent's command), killed when the run's network is
torn down (kill step 5, after the agent's cgroup is confirmed empty, and every other ending),
and reaped (confirmed empty, container, cgroup, namespace and bundle removed) once the run
has ended. The names share the runs' prefix, so a restarted daemon reaps what a dead one
left like any run's leftovers. An orderly restart with agents kept hands them over with the
run (supervisor/daemon/handover.py): the daemon keeps its copy of each server's gateway end
(`gateway_end`) from the launch on for that, and the next daemon adopts them
(EgressControl.adopt)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.egress.secrets import load_secret
from supervisor.errors import EnforcementError, RuntimeFailure
from supervisor.models.mcp import MAX_STDIO_SERVERS, McpServer
from supervisor.profiles import FilesystemPolicy, Limits, Profile, load_seccomp
from supervisor.runtime.control import kill_and_confirm
from supervisor.runtime.init import SandboxInit
from supervisor.runtime.runc import Runc
from supervisor.sandbox import netns
from supervisor.sandbox.bundle import (
    SANDBOX_UID_COUNT,
    BundleSpec,
    IdMap,
    remove_bundle,
    write_bundle,
)
from supervisor.sandbox.cgroups import Cgroup

log = logging.getLogger(__name__)

SECRETS_MOUNT = "/run/secrets"


@dataclass
class StdioServer:
    """One started server: what its kill and its removal act on."""

    name: str
    container_id: str
    bundle: Path
    cgroup: Cgroup
    host_uid: int
    pid: int | None = None
    # The daemon's copy of the gateway's end (the worker has another): kept for a restart's
    # handover, closed when the server is reaped.
    gateway_end: socket.socket | None = None
    log_fd: int | None = None


@dataclass
class RunServers:
    """A run's stdio servers."""

    run_id: str
    servers: list[StdioServer] = field(default_factory=list)
    reaped: bool = False

    def gateway_ends(self) -> dict[str, socket.socket]:
        return {s.name: s.gateway_end for s in self.servers if s.gateway_end is not None}

    def close_gateway_ends(self) -> None:
        """The daemon's copies (at the reaping, or when a launch or adoption failed)."""
        for server in self.servers:
            if server.gateway_end is not None:
                server.gateway_end.close()
                server.gateway_end = None

    def kill(self) -> None:
        """SIGKILL every server (cgroup.kill on the descriptor held since its start); never
        blocks, never raises: the run's kill path calls it after the agent's."""
        for server in self.servers:
            try:
                server.cgroup.kill()
            except OSError as exc:
                log.error("run %s: killing MCP server %s failed: %s", self.run_id,
                          server.name, exc)


class StdioLauncher:
    """Starts and reaps the stdio servers of runs (one per daemon)."""

    def __init__(self, *, runc: Runc, init: SandboxInit, bundles_dir: Path, logs_dir: Path,
                 cgroup_parent: str, name_prefix: str, uid_base: int, agent_uid: int,
                 max_runs: int, secrets_dir: Path, confirm_timeout: float) -> None:
        self.runc = runc
        self.init = init
        self.bundles_dir = bundles_dir
        self.logs_dir = logs_dir
        self.cgroup_parent = cgroup_parent.strip("/")
        self.name_prefix = name_prefix
        self.uid_base = uid_base
        self.agent_uid = agent_uid
        self.max_runs = max_runs
        self.secrets_dir = secrets_dir
        self.confirm_timeout = confirm_timeout

    def host_uid(self, uid_slot: int, index: int) -> int:
        """The server's uid on the host: in a range of its own past every run's slots, so no
        agent (or other server) shares it."""
        slot = self.max_runs + uid_slot * MAX_STDIO_SERVERS + index
        return self.uid_base + slot * SANDBOX_UID_COUNT + self.agent_uid

    async def start(self, run_id: str, uid_slot: int, servers: list[McpServer]) -> RunServers:
        """Every server started, or none (what was made is removed) and the error raised."""
        run = RunServers(run_id)
        if not servers:
            return run
        # Every secret first: a missing one refuses the launch before anything exists.
        secrets = [({k: load_secret(ref, self.secrets_dir) for k, ref in s.secret_env.items()},
                    {k: load_secret(ref, self.secrets_dir) for k, ref in s.secret_files.items()})
                   for s in servers]
        try:
            for index, (server, (env, files)) in enumerate(zip(servers, secrets, strict=True)):
                await self._start_one(run, index, uid_slot, server, env, files)
        except BaseException:
            run.close_gateway_ends()
            await self.reap(run)
            raise
        return run

    async def _start_one(self, run: RunServers, index: int, uid_slot: int, server: McpServer,
                         env: dict[str, str], files: dict[str, str]) -> None:
        assert server.command is not None
        loop = asyncio.get_running_loop()
        container_id = f"{self.name_prefix}-{run.run_id}-mcp{index}"
        host_uid = self.host_uid(uid_slot, index)
        started = StdioServer(name=server.name, container_id=container_id,
                              bundle=self.bundles_dir / container_id,
                              cgroup=Cgroup(f"{self.cgroup_parent}/{container_id}"),
                              host_uid=host_uid)
        run.servers.append(started)  # from here on, reap() removes whatever exists of it
        netns_path = await loop.run_in_executor(None, netns.create, container_id)
        limits = server.limits
        profile = Profile(
            name=f"mcp-{server.name}",
            filesystem=FilesystemPolicy(host_binds=["/usr", "/etc", *server.binds],
                                        tmp_size=limits.tmp_size),
            limits=Limits(memory=limits.memory, pids=limits.pids, cpus=limits.cpus,
                          nofile=limits.nofile, file_size=limits.file_size),
            env=dict(server.env))
        base = host_uid - self.agent_uid
        spec = BundleSpec(
            run_id=container_id, hostname=f"mcp-{server.name}"[:63],
            command=self.init.wrap(list(server.command)), profile=profile,
            seccomp=load_seccomp("default"), init_binary=self.init.check(),
            uid_map=IdMap(base, self.agent_uid, host_uid),
            gid_map=IdMap(base, self.agent_uid, host_uid),
            cgroups_path=f"/{started.cgroup.relative}", netns_path=str(netns_path),
            workspace=None, env=env, seccomp_listener=None)
        await loop.run_in_executor(None, _write_bundle, started.bundle, spec, files, host_uid)
        inner, started.gateway_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.logs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        log_path = self.logs_dir / f"{run.run_id}-mcp-{server.name}.log"
        started.log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                                 0o600)
        try:
            started.pid = await self.runc.create(
                container_id, started.bundle, started.bundle / "init.pid", inner.fileno(),
                started.bundle / "runc.log", stdin=inner.fileno(), stderr=started.log_fd)
        finally:
            inner.close()  # the server holds the only other end now
        if not started.cgroup.exists():
            raise EnforcementError(f"runc created MCP server {container_id} but its cgroup "
                                   f"{started.cgroup.path} is missing",
                                   cgroup=str(started.cgroup.path))
        started.cgroup.hold()  # the kill needs no new descriptor
        await self.runc.start(container_id)
        log.info("run %s: MCP server %s started (pid %s, uid %d)", run.run_id, server.name,
                 started.pid, host_uid)

    async def reap(self, run: RunServers) -> dict[str, Any]:
        """Kill, confirm empty, remove everything of the run's servers. Idempotent."""
        if run.reaped:
            return {}
        run.reaped = True
        run.close_gateway_ends()
        done = await asyncio.gather(*(self._reap_one(s) for s in run.servers),
                                    return_exceptions=True)
        return {s.name: d if isinstance(d, dict) else f"{type(d).__name__}: {d}"
                for s, d in zip(run.servers, done, strict=True)}

    async def _reap_one(self, server: StdioServer) -> dict[str, Any]:
        done: dict[str, Any] = {}
        if server.cgroup.exists():
            done.update(await kill_and_confirm(server.cgroup, self.confirm_timeout))
        if server.pid is not None:
            # The daemon is a subreaper: the server's init is its child once runc exits.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(server.pid, os.WNOHANG)
        with contextlib.suppress(RuntimeFailure):
            await self.runc.delete(server.container_id, force=True)
        server.cgroup.release()
        server.cgroup.remove(strict=False)
        with contextlib.suppress(OSError):
            netns.remove(server.container_id)
        remove_bundle(server.bundle)
        if server.log_fd is not None:
            os.close(server.log_fd)
            server.log_fd = None
        return done


def _write_bundle(directory: Path, spec: BundleSpec, files: dict[str, str],
                  host_uid: int) -> None:
    """The bundle, with the secret files (readable by the server's uid only) bound read-only
    at /run/secrets."""
    write_bundle(directory, spec)
    if not files:
        return
    secrets_dir = directory / "secrets"
    secrets_dir.mkdir(mode=0o500)
    for name, value in files.items():
        path = secrets_dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
        with os.fdopen(fd, "w") as handle:
            handle.write(value)
        os.chown(path, host_uid, host_uid)
    os.chown(secrets_dir, host_uid, host_uid)
    (directory / "rootfs" / SECRETS_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["mounts"].append({"destination": SECRETS_MOUNT, "type": "bind",
                             "source": str(secrets_dir),
                             "options": ["bind", "ro", "nosuid", "nodev", "noexec"]})
    config_path.write_text(json.dumps(config, indent=1))
