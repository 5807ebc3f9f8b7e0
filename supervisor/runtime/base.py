"""The seam between the daemon and the kernel: a `Runtime` makes contained runs, a `RunHandle`
holds one. The runc implementation is in `sandboxed.py`, the Docker one in `containerized.py`;
`router.py` picks one per run; `fake.py` is the in-memory one that lets the control plane be
unit-tested without root."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from supervisor.profiles import Profile


class NetworkAttachment(Protocol):
    """A run's way out (the egress veth and its firewall rules), plumbed into the run's
    network namespace by the runtime once that exists and before the agent starts."""

    def attach(self, netns: str) -> None:
        """Blocking (netlink, nft); the runtime calls it from a worker thread."""
        ...

    def detach(self) -> None:
        """Remove everything attach made; idempotent, never raises."""
        ...


@dataclass(frozen=True)
class RunParams:
    """What a runtime needs to start one run."""
    run_id: str
    agent: str
    container_id: str
    netns: str
    cgroup: str  # relative to the cgroup root, e.g. "agent-supervisor/as-1a2b"
    bundle: Path
    log_path: Path
    profile: Profile
    command: list[str]
    uid_slot: int
    workspace: str | None = None
    # An O_PATH fd of the workspace directory the caller was admitted to (the daemon's
    # workspace_access); the runtime binds that inode and never resolves `workspace` again.
    # Owned by the caller of `launch`. None: the runtime opens `workspace` itself.
    workspace_fd: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    network: NetworkAttachment | None = None
    runtime: str = "runc"  # which runtime makes the run ("runc" or "docker")
    image: str | None = None  # docker only: the image that is the agent's root


@dataclass
class Leftover:
    """Something a previous daemon instance left running or mounted."""

    container_id: str | None = None
    netns: str | None = None
    runtime: str = "runc"
    cgroup: str | None = None
    pids: list[int] = field(default_factory=list)


class RunCgroup(Protocol):
    """The cgroup that holds every process of a run (supervisor.sandbox.cgroups.Cgroup): what
    the kill path, the watchdog and telemetry act on, whatever runtime made the run."""

    def hold(self) -> object:
        """Open the files a kill needs now, so the kill itself needs no new descriptor."""
        ...

    def release(self) -> None: ...

    def kill(self, *, force_fallback: bool = False) -> str:
        """SIGKILL every process (cgroup.kill, falling back to freeze + SIGKILL); the
        mechanism used. Never blocks for long."""
        ...

    def kill_fallback(self) -> str: ...

    def wait_empty(self, timeout: float) -> bool:
        """Block until the kernel reports the cgroup empty (True) or `timeout` (False)."""
        ...

    def pids(self) -> list[int]: ...


class RunHandle(Protocol):
    pid: int | None

    @property
    def cgroup(self) -> RunCgroup: ...

    async def start(self) -> None: ...

    def kill(self, *, force_fallback: bool = False) -> str:
        """Issue SIGKILL to every process of the run; returns the mechanism. Must not block."""
        ...

    async def wait_empty(self, timeout: float) -> bool: ...

    async def freeze(self, timeout: float) -> bool: ...

    async def thaw(self) -> None: ...

    def signal_all(self, signum: int) -> int: ...

    def process_count(self) -> int: ...

    def stats(self) -> dict[str, int | None]:
        """cpu_usec, memory_bytes, processes of the run right now."""
        ...

    def wait_exit(self) -> Awaitable[int | None]:
        """The exit status of the run's init (128+signal when signalled), None if unknown."""
        ...

    def teardown_network(self) -> bool: ...

    def hush(self) -> None:
        """A scoped halt is about to kill the run: stop reacting to its processes' deaths
        until `cleanup` (which catches up). Never blocks; may do nothing."""
        ...

    async def cleanup(self) -> None:
        """Delete runtime state, bundle and cgroups. Idempotent."""
        ...

    def residue(self) -> dict[str, Any]:
        """What of this run still exists (processes, netns, cgroup, bundle); empty when gone."""
        ...


class Runtime(Protocol):
    name: str

    async def launch(self, params: RunParams) -> RunHandle:
        """Build the sandbox and create the container, stopped before the agent's command."""
        ...

    async def leftovers(self) -> list[Leftover]: ...

    async def reap(self, leftover: Leftover, timeout: float) -> dict[str, Any]: ...

    def describe(self) -> dict[str, Any]: ...


class NotAdopted(Exception):
    """A run handed over at a restart that cannot be adopted whole (daemon/handover.py): a
    stable snake_case `code` for the `adopt` row's outcome, and the run's exit status when
    what refused it knows it (the engine's word for a container that ended meanwhile)."""

    def __init__(self, code: str, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.exit_code = exit_code
