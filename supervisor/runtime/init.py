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
import struct
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
    loader = needs_loader(binary)
    if loader is not None:
        raise EnforcementError(
            f"{binary} {loader}: bound into a sandbox it would run the image's own loader and "
            "libraries before the agent's uid is taken; only a statically linked build may be "
            "bound", **detail, hint=hint)
    return info


_PT_INTERP = 3
_MAX_HEADERS = 512


def needs_loader(binary: Path) -> str | None:
    """Why `binary` cannot run by itself in a root it does not come from, or None: a script
    (`#!` names an interpreter in the sandbox's root) or an ELF with a PT_INTERP program header
    (dynamically linked: the root's ld.so and libc). A file too short to read as either is left
    to the kernel, whose exec fails closed."""
    try:
        with binary.open("rb") as file:
            head = file.read(64)
            if head[:2] == b"#!":
                return "is a script"
            if head[:4] != b"\x7fELF" or len(head) < 52 or head[5] not in (1, 2):
                return None
            order = "<" if head[5] == 1 else ">"
            if head[4] == 2:  # ELF64
                (offset,) = struct.unpack_from(order + "Q", head, 32)
                size, count = struct.unpack_from(order + "HH", head, 54)
            elif head[4] == 1:  # ELF32
                (offset,) = struct.unpack_from(order + "I", head, 28)
                size, count = struct.unpack_from(order + "HH", head, 42)
            else:
                return None
            if size < 4 or count > _MAX_HEADERS:
                return None
            file.seek(offset)
            table = file.read(size * count)
    except OSError:
        return None
    for at in range(0, len(table) - size + 1, size):
        if struct.unpack_from(order + "I", table, at)[0] == _PT_INTERP:
            return "is dynamically linked"
    return None


@dataclass(frozen=True)
class SandboxInit:
    """The init binary every sandbox runs as its pid 1."""
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
