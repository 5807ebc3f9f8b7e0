"""Render a run's OCI bundle (config.json + an empty read-only rootfs) from its profile.
Rendering is pure; `write_bundle` creates the directory (root, 0700)."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.errors import EnforcementError
from supervisor.profiles import Profile
from supervisor.runtime.init import INIT_PATH
from supervisor.sandbox.fstree import remove_tree
from supervisor.sandbox.workspace_binds import Bind

SANDBOX_UID_COUNT = 65536
WORKSPACE_MOUNT = "/workspace"
_MERGED_USR_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# runc's own defaults, kept so the profile only adds to them.
_MASKED = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
]
_READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
_CPU_PERIOD_US = 100_000
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NOTIFY = "SCMP_ACT_NOTIFY"
# The one ABI a run's filter admits, by host machine. A compat ABI (i386 `int 0x80`, x32,
# arm32) reaches the same kernel through other syscall numbers and through multiplexers
# (socketcall, ipc) whose arguments live in memory the filter cannot read; left out of the
# filter, the kernel kills a thread that enters through it (libseccomp's bad-arch action).
_NATIVE_ARCH = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}


@dataclass(frozen=True)
class IdMap:
    """Sandbox ids 0..65535 onto an unprivileged host range; the agent's id may instead map to
    the workspace owner so the agent can write the workspace it was given."""

    host_base: int
    agent_id: int
    agent_host_id: int

    def extents(self) -> list[dict[str, int]]:
        if self.agent_host_id == self.host_base + self.agent_id:
            return [{"containerID": 0, "hostID": self.host_base, "size": SANDBOX_UID_COUNT}]
        after = self.agent_id + 1
        extents = [
            {"containerID": 0, "hostID": self.host_base, "size": self.agent_id},
            {"containerID": self.agent_id, "hostID": self.agent_host_id, "size": 1},
            {
                "containerID": after,
                "hostID": self.host_base + after,
                "size": SANDBOX_UID_COUNT - after,
            },
        ]
        # The kernel rejects an empty extent (agent id 0 or 65535 leaves one side empty).
        return [e for e in extents if e["size"] > 0]


@dataclass(frozen=True)
class BundleSpec:
    """What an OCI bundle for one run is rendered from."""
    run_id: str
    hostname: str
    command: list[str]
    profile: Profile
    seccomp: dict[str, Any]
    uid_map: IdMap
    gid_map: IdMap
    cgroups_path: str
    netns_path: str
    workspace: str | None
    env: dict[str, str] = field(default_factory=dict)
    # The workspace's other binds over it (its read-only paths and their ancestors), each from
    # a staging mount point made from an open file (workspace_binds.stage), parents first.
    workspace_binds: tuple[Bind, ...] = ()
    host_root: Path = Path("/")
    # The daemon's seccomp notify socket (seccomp_notify.py); None: the daemon has none.
    seccomp_listener: str | None = None
    # The host binary bound read-only at /dev/init (runtime/init.py); `command` starts it.
    init_binary: str | None = None


def _host_layout(spec: BundleSpec) -> tuple[dict[str, str], list[str]]:
    return host_layout(spec.profile, spec.host_root)


def host_layout(profile: Profile, host_root: Path = Path("/")
                ) -> tuple[dict[str, str], list[str]]:
    """(symlinks to create in the rootfs, host directories to bind) for root = "host"."""
    links: dict[str, str] = {}
    binds = list(profile.filesystem.host_binds)
    for name in _MERGED_USR_LINKS:
        host_path = host_root / name
        if host_path.is_symlink():
            links[name] = os.readlink(host_path)
        elif host_path.is_dir() and f"/{name}" not in binds:
            binds.append(f"/{name}")
    return links, binds


def render_seccomp(seccomp: dict[str, Any], listener: str | None, run_id: str) -> dict[str, Any]:
    """The profile's `linux.seccomp` for one run. SCMP_ACT_NOTIFY entries report each attempt
    to the daemon's listener, which answers EPERM; without a listener they become plain
    SCMP_ACT_ERRNO EPERM, so the syscalls stay denied either way (fail closed). The listener
    is always the daemon's own, never one a profile names. Only the host's native ABI is
    admitted, whatever the profile lists."""
    rendered = {k: v for k, v in seccomp.items() if k not in ("listenerPath", "listenerMetadata")}
    rendered["architectures"] = [native_arch()]
    rules: list[dict[str, Any]] = []
    notify = False
    for rule in seccomp.get("syscalls", []):
        if rule.get("action") == _NOTIFY:
            if listener is None:
                rule = {**rule, "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM}
            else:
                notify = True
                # errnoRet is the fallback above; runtimes take no errno for NOTIFY.
                rule = {k: v for k, v in rule.items() if k != "errnoRet"}
        rules.append(rule)
    if "syscalls" in seccomp:
        rendered["syscalls"] = rules
    if notify:
        rendered["listenerPath"] = listener
        rendered["listenerMetadata"] = run_id
    return rendered


def native_arch(machine: str | None = None) -> str:
    """The libseccomp name of the host's ABI; a host we have no name for cannot be filtered."""
    machine = machine or os.uname().machine
    try:
        return _NATIVE_ARCH[machine]
    except KeyError:
        raise EnforcementError(f"no seccomp architecture known for machine {machine!r}",
                               machine=machine) from None


def agent_env(run_id: str, has_workspace: bool, profile: Profile, extra: dict[str, str]
              ) -> dict[str, str]:
    """The agent's environment, in both runtimes: a fixed base, the profile's, the run's."""
    return {"PATH": _DEFAULT_PATH, "HOME": WORKSPACE_MOUNT if has_workspace else "/tmp",
            "AGENT_SUPERVISOR_RUN": run_id, **profile.env, **extra}


def render_config(spec: BundleSpec) -> dict[str, Any]:
    profile = spec.profile
    fs = profile.filesystem
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
    ]
    if spec.init_binary is not None:
        mounts.append({"destination": INIT_PATH, "type": "bind", "source": spec.init_binary,
                       "options": ["bind", "ro", "nosuid", "nodev"]})
    # A host directory under /tmp (a checkout or a venv there) is bound after the sandbox's own
    # /tmp, which would hide it otherwise; /tmp itself is always the sandbox's tmpfs.
    under_tmp: list[str] = []
    if fs.root == "host":
        _links, binds = _host_layout(spec)
        for path in binds:
            if not (spec.host_root / path.lstrip("/")).exists():
                continue
            if path.rstrip("/").startswith("/tmp/"):
                under_tmp.append(path)
                continue
            mounts.append({"destination": path, "type": "bind", "source": path,
                           "options": ["bind", "ro", "nosuid", "nodev"]})
    mounts.append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "nodev", "mode=1777", f"size={fs.tmp_size}"]})
    for path in under_tmp:
        mounts.append({"destination": path, "type": "bind", "source": path,
                       "options": ["bind", "ro", "nosuid", "nodev"]})
    if spec.workspace is not None:
        mounts.append({"destination": WORKSPACE_MOUNT, "type": "bind",
                       "source": spec.workspace, "options": ["bind", "rw", "nosuid", "nodev"]})
        for bind in spec.workspace_binds:
            if bind.relative:
                mounts.append({"destination": f"{WORKSPACE_MOUNT}/{bind.relative}",
                               "type": "bind", "source": bind.source,
                               "options": ["bind", "ro" if bind.readonly else "rw",
                                           "nosuid", "nodev"]})
    env = agent_env(spec.run_id, spec.workspace is not None, profile, spec.env)
    quota = round(profile.limits.cpus * _CPU_PERIOD_US)
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False,
            "user": {"uid": spec.uid_map.agent_id, "gid": spec.gid_map.agent_id},
            "args": spec.command,
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": WORKSPACE_MOUNT if spec.workspace else "/tmp",
            "capabilities": {"bounding": [], "effective": [], "inheritable": [],
                             "permitted": [], "ambient": []},
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": profile.limits.nofile,
                 "soft": profile.limits.nofile},
                {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
                {"type": "RLIMIT_FSIZE", "hard": profile.limits.file_size,
                 "soft": profile.limits.file_size},
            ],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs" if fs.root == "host" else fs.root, "readonly": True},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": {
            "uidMappings": spec.uid_map.extents(),
            "gidMappings": spec.gid_map.extents(),
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "cgroup"}, {"type": "user"},
                {"type": "network", "path": spec.netns_path},
            ],
            "cgroupsPath": spec.cgroups_path,
            "resources": {
                # memory.swap is memory+swap on v1 (runc converts for v2): no swap beyond RAM.
                "memory": {"limit": profile.limits.memory, "swap": profile.limits.memory},
                "pids": {"limit": profile.limits.pids},
                "cpu": {"quota": quota, "period": _CPU_PERIOD_US},
            },
            "maskedPaths": _MASKED + list(fs.masked_paths),
            "readonlyPaths": list(_READONLY),
            "seccomp": render_seccomp(spec.seccomp, spec.seccomp_listener, spec.run_id),
        },
    }


def write_bundle(directory: Path, spec: BundleSpec) -> Path:
    """Create `directory` with config.json and, for host roots, the rootfs skeleton."""
    directory.mkdir(mode=0o700, parents=True)
    config = render_config(spec)
    if spec.profile.filesystem.root == "host":
        rootfs = directory / "rootfs"
        rootfs.mkdir(mode=0o755)
        links, _binds = _host_layout(spec)
        for name, target in links.items():
            (rootfs / name).symlink_to(target)
        for mount in config["mounts"]:
            if mount["destination"].startswith(WORKSPACE_MOUNT + "/"):
                continue  # inside the workspace bind, which brings its own mount points
            if mount["destination"] == INIT_PATH:
                continue  # a file on /dev's tmpfs: runc makes the mount point there
            target_dir = rootfs / mount["destination"].lstrip("/")
            if not target_dir.is_symlink():
                target_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        # runc gives a tmpfs the mode of the directory it is mounted on (ignoring mode=), so the
        # mount point of /tmp must itself be 1777 for the agent to write its /tmp.
        (rootfs / "tmp").chmod(0o1777)
        # runc in a user namespace needs to traverse the bundle to reach the rootfs.
        directory.chmod(0o711)
    config_path = directory / "config.json"
    config_path.touch(mode=0o600)
    config_path.write_text(json.dumps(config, indent=1))
    return directory


def remove_bundle(directory: Path) -> None:
    remove_tree(directory)  # in rounds: its rootfs directories were the run's mount points
