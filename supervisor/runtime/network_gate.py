"""A docker run's network gate: the container's first process waits until the daemon has
attached the run's link to the egress gateway, so the agent never runs before its network.

runc runs join a network namespace the daemon wired before the start. A docker run's
namespace is the engine's own, made when the container starts (network mode "none"), and the
engine starts the command with it: the veth and its nft rules can only come after. Without
the gate the agent's first connections found loopback only (ENETUNREACH).

The gate is a FIFO the daemon makes for the run (root's, 0600) and binds read-only into the
container, and Debian's busybox (its static build, so it runs in any image, bound read-only
like the init and gosu): the container's process, still root holding CAP_SETUID and
CAP_SETGID only, is `busybox sh -c 'read -r _ < GATE && exec "$@"'` followed by gosu, the init
and the agent. The daemon holds the FIFO open for reading and writing from before the
start, so the shell's open never waits for a writer and its read waits for the daemon's one
line, written once the link and its rules are in place (`open`); a failed attach removes the
container with the shell still waiting. The host's path of the FIFO is unlinked as soon as
the container has started (the bind keeps the inode): nothing of it is left on the host.
The agent, past gosu, cannot open the FIFO (root's, 0600); it could only have opened its own
gate anyway. Runs without a gateway have no network to wait for and no gate."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from supervisor.runtime.init import host_executable

# Where the container sees busybox and its run's FIFO (the runtime's /dev tmpfs). busybox
# takes the applet from the name it is run by: the bind's name is `busybox`.
SHELL_PATH = "/dev/busybox"
GATE_PATH = "/dev/network-gate"
DEFAULT_SHELL_BINARY = "/bin/busybox"  # Debian package `busybox-static`, statically linked
_WAIT = 'read -r _ < "$0" && exec "$@"'


@dataclass(frozen=True)
class NetworkGate:
    binary: Path = Path(DEFAULT_SHELL_BINARY)

    def check(self) -> str:
        """The binary to bind, or EnforcementError: without it a docker run with a gateway
        would start before its network, so none starts."""
        host_executable(
            self.binary, lambda error: f"{self.binary}, which holds a docker run until its "
            f"network is attached, is missing ({error}): install Debian's busybox-static "
            "package", f"{self.binary} is not an executable file",
            hint="apt-get install busybox-static", binary=str(self.binary))
        return str(self.binary)

    def wrap(self, command: list[str]) -> list[str]:
        """The container's command: wait at the gate, then exec `command` (gosu's argv)."""
        return [SHELL_PATH, "sh", "-c", _WAIT, GATE_PATH, *command]


class Gate:
    """One run's FIFO: made before the container, held open by the daemon until the run is
    cleaned up or handed over."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a previous daemon's, of a run that never started
        os.mkfifo(path, 0o600)
        try:
            # Read and write: never blocks, and the shell's open finds a writer at once.
            self._fd: int | None = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            path.unlink()
            raise

    def unlink(self) -> None:
        """The container started (its bind holds the FIFO): the host's path goes."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def open(self) -> None:
        """The network is in place: let the container's process go on."""
        if self._fd is not None:
            os.write(self._fd, b"\n")

    def close(self) -> None:
        self.unlink()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
