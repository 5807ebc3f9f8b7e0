"""How a docker run's process becomes the agent's uid: the engine starts it as root holding
CAP_SETUID and CAP_SETGID only, and Debian's gosu drops to the agent's uid and gid (no
supplementary groups) and execs the sandbox's init. Reads the host's binary only.

Why not let the engine start it as the agent's uid, as it did: containerd's shim makes the
process's stdout and stderr pipes itself and fchowns them to the uid the container's process
starts as (go-runc's `NewPipeIO(uid, gid)`, with dockerd's `IoUid`/`IoGid` taken from the
container's user). Owned by the agent's uid, the agent may reopen them through
/proc/self/fd/1 or /proc/1/fd/2 (the kernel checks the pipe's owner and mode, 0600), for
reading too, and take its own output back before the engine reads it into the run's log.
Started as root, the pipes stay root's: the agent, its children and the init hold them, open
and write them, but no open of them by any /proc path passes (EACCES), as under runc, whose
pipe the supervisor makes.

gosu is statically linked, so it runs in any image (bound read-only at `DROP_PATH` like the
init at /dev/init); it sets the groups, the gid, then the uid, and execs. The kernel clears
the permitted and effective capabilities when a root process takes a non-zero uid, so the init
and the agent hold none, under no_new_privs and the profile's seccomp filter as before; what
stays is CAP_SETUID and CAP_SETGID in the bounding set, which no_new_privs keeps out of reach
(no execve can raise a capability again). The profile's seccomp filter must admit setgroups,
setgid and setuid, as the default one does; where it does not, gosu fails and the agent never
runs."""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from supervisor.errors import EnforcementError
from supervisor.runtime.init import host_executable

DROP_PATH = "/dev/drop-to-agent"  # where the container sees gosu (the runtime's /dev tmpfs)
DEFAULT_DROP_BINARY = "/usr/sbin/gosu"  # Debian package `gosu`, statically linked
# What the container's process holds until gosu has dropped to the agent's uid.
DROP_CAPABILITIES = ("SETUID", "SETGID")
START_USER = "0:0"


@dataclass(frozen=True)
class UidDrop:
    binary: Path = Path(DEFAULT_DROP_BINARY)

    def check(self) -> str:
        """The binary to bind, or EnforcementError: without it the agent would start as the
        owner of its own stdio pipes, so no docker run starts."""
        info = host_executable(
            self.binary, lambda error: f"{self.binary}, which drops a docker run to the agent's "
            f"uid, is missing ({error}): install Debian's gosu package",
            f"{self.binary} is not an executable file", hint="apt-get install gosu",
            binary=str(self.binary))
        if info.st_mode & (stat.S_ISUID | stat.S_ISGID):
            raise EnforcementError(f"{self.binary} is setuid or setgid: gosu must not be",
                                   binary=str(self.binary), hint="chmod ug-s " + str(self.binary))
        return str(self.binary)

    def wrap(self, uid: int, gid: int, command: list[str]) -> list[str]:
        """The process the engine starts as root: gosu, which becomes `uid`:`gid` and execs
        `command` (the init's argv)."""
        return [DROP_PATH, f"{uid}:{gid}", *command]
