"""The init every sandbox runs as its PID 1, in both runtimes: Debian's tini, bound read-only
from the host at /dev/init (the runtime's fresh /dev tmpfs, so no root, host or image, needs a
mount point for it). tini forwards the signals it gets to the agent's whole process group
(`-g`) and reaps orphaned zombies, so an agent without a SIGTERM handler still ends on
`stop --grace` and Ctrl-C, and its exit status is the agent's (128+signal when signalled);
a command it cannot exec ends the run with 126 (not executable) or 127 (not found), as a shell
would. The default binary is the static build, which runs in any root. Reads the host's
binary only; no privilege beyond that."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from supervisor.errors import EnforcementError

INIT_PATH = "/dev/init"  # where the sandbox sees the init (podman binds catatonit there too)
DEFAULT_INIT_BINARY = "/usr/bin/tini-static"  # Debian package `tini`


def host_executable(binary: Path, missing: Callable[[str | None], str], not_executable: str,
                    /, *, hint: str, **detail: str) -> os.stat_result:
    """The stat of a host binary a sandbox binds (the init, uid_drop.py's gosu), or
    EnforcementError with `detail` and `hint`: `missing(strerror)` when it cannot be read,
    `not_executable` when it is not an executable regular file."""
    try:
        info = binary.stat()
    except OSError as exc:
        raise EnforcementError(missing(exc.strerror), **detail, hint=hint) from None
    if not stat.S_ISREG(info.st_mode) or not os.access(binary, os.X_OK):
        raise EnforcementError(not_executable, **detail, hint=hint)
    return info


@dataclass(frozen=True)
class SandboxInit:
    binary: Path = Path(DEFAULT_INIT_BINARY)

    def check(self) -> str:
        """The binary to bind, or EnforcementError: a sandbox without its init would leave
        the agent as PID 1 (signals ignored, zombies kept), so no run starts without it."""
        host_executable(
            self.binary, lambda error: f"the sandbox init {self.binary} is missing ({error}): "
            "install Debian's tini package or set [sandbox] init",
            f"the sandbox init {self.binary} is not an executable file",
            hint="apt-get install tini", init=str(self.binary))
        return str(self.binary)

    def wrap(self, command: list[str]) -> list[str]:
        """The process the runtime starts: tini, forwarding to the command's process group."""
        return [INIT_PATH, "-g", "--", *command]
