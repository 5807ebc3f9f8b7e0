"""Whether an agent's command exists in the sandbox's root view, checked before anything of the
run is created, so a missing command is the caller's error (`command_not_found`), not a runtime
failure after a half-built sandbox. The command is resolved as the runtime will resolve it:
against the sandbox's PATH, inside the sandbox's root (for a "host" root: the empty rootfs with
its merged-/usr links and the host directories bound read-only; for a rootfs directory: that
directory), following symlinks as the sandbox would see them. Reads the host filesystem with
the daemon's privilege; answers only yes, no, "not executable" (exit 126, as a shell says) or
"cannot tell" (workspace paths, /dev, /proc: then the sandbox's init execs it and exits 126 or
127 itself, runtime/init.py), never what a path holds."""

from __future__ import annotations

import enum
import posixpath
import stat
from pathlib import Path

from supervisor.errors import CommandNotExecutable, CommandNotFound
from supervisor.profiles import Profile
from supervisor.sandbox.bundle import WORKSPACE_MOUNT, agent_env, host_layout

_SYMLINK_HOPS = 40  # the kernel's own limit (ELOOP)
# Mounted by the runtime, not from the root: what they hold is not known before the run.
_UNKNOWN_MOUNTS = ("/dev", "/proc", "/sys", WORKSPACE_MOUNT)


class Found(enum.Enum):
    YES = "yes"
    NO = "no"
    # There, but not a file exec can run (a directory, no execute bit): exec fails EACCES.
    NOT_EXECUTABLE = "not_executable"
    UNKNOWN = "unknown"


class SandboxRoot:
    """The sandbox's filesystem as the host sees it, before the run exists."""

    def __init__(self, profile: Profile, host_root: Path = Path("/")) -> None:
        self.host_root = host_root
        self.rootfs = None if profile.filesystem.root == "host" else Path(
            profile.filesystem.root)
        links, binds = host_layout(profile, host_root) if self.rootfs is None else ({}, [])
        self.links = links
        self.binds = [b.rstrip("/") or "/" for b in binds]

    def _host_path(self, path: str) -> Path | None:
        """The host path behind an absolute, normalised sandbox path; None where the sandbox
        has nothing (the empty rootfs, the fresh /tmp)."""
        if path == "/tmp" or path.startswith("/tmp/"):
            return None
        if self.rootfs is not None:
            return self.rootfs / path.lstrip("/")
        for bind in self.binds:
            if path == bind or path.startswith(bind + "/"):
                return self.host_root / path.lstrip("/")
        return None

    def _skeleton_dir(self, path: str) -> bool:
        """A directory of the empty rootfs that only exists as the parent of a bind."""
        return self.rootfs is None and any(b.startswith(path + "/") for b in self.binds) \
            and self._host_path(path) is None

    def find(self, path: str) -> Found:
        """Whether `path` (absolute, in the sandbox) is an executable file there."""
        pending = [c for c in path.split("/") if c]
        current = "/"
        hops = 0
        while pending:
            part = pending.pop(0)
            if part == ".":
                continue
            if part == "..":
                current = posixpath.dirname(current) if current != "/" else "/"
                continue
            candidate = posixpath.join(current, part)
            if any(candidate == m or candidate.startswith(m + "/") for m in _UNKNOWN_MOUNTS):
                return Found.UNKNOWN
            if candidate == "/tmp" and not pending:
                return Found.NOT_EXECUTABLE  # the sandbox's fresh /tmp: a directory there
            if current == "/" and part in self.links:
                target = self.links[part]
            elif self._skeleton_dir(candidate):
                if not pending:
                    return Found.NOT_EXECUTABLE  # a directory in the sandbox
                current = candidate
                continue
            else:
                host = self._host_path(candidate)
                if host is None:
                    return Found.NO
                try:
                    info = host.lstat()
                except (FileNotFoundError, NotADirectoryError):
                    return Found.NO
                except OSError:
                    return Found.UNKNOWN
                if not stat.S_ISLNK(info.st_mode):
                    if pending and not stat.S_ISDIR(info.st_mode):
                        return Found.NO
                    if not pending and not (stat.S_ISREG(info.st_mode)
                                            and info.st_mode & 0o111):
                        return Found.NOT_EXECUTABLE
                    current = candidate
                    continue
                try:
                    target = str(host.readlink())
                except OSError:
                    return Found.UNKNOWN
            hops += 1
            if hops > _SYMLINK_HOPS:
                return Found.NO
            # The link is followed inside the sandbox: absolute targets start at its root.
            pending = [c for c in target.split("/") if c] + pending
            if target.startswith("/"):
                current = "/"
        return Found.YES


def check_command(command: list[str], profile: Profile, workspace: str | None,
                  env: dict[str, str], run_image: str | None,
                  host_root: Path = Path("/")) -> None:
    """Raise CommandNotFound when the command certainly does not exist in the sandbox, and
    CommandNotExecutable when what it names certainly cannot be executed (as execvp decides:
    a PATH search passes over what it cannot execute, and reports EACCES if that is all it
    found)."""
    if run_image is not None:
        return  # a container image's contents are the engine's to resolve
    name = command[0]
    root = SandboxRoot(profile, host_root)
    cwd = WORKSPACE_MOUNT if workspace is not None else "/tmp"
    if "/" in name:
        candidates = [posixpath.normpath(posixpath.join(cwd, name))]
    else:
        search = agent_env("", workspace is not None, profile, env).get("PATH", "")
        candidates = [posixpath.normpath(posixpath.join(cwd, d or ".", name))
                      for d in search.split(":")]
    found = [root.find(candidate) for candidate in candidates]
    if any(f in (Found.YES, Found.UNKNOWN) for f in found):
        return
    if Found.NOT_EXECUTABLE in found:
        path = candidates[found.index(Found.NOT_EXECUTABLE)]
        raise CommandNotExecutable(
            f"{name!r} is in the sandbox at {path} but cannot be executed (not a file with an "
            f"execute bit)", command=name, path=path, profile=profile.name)
    raise CommandNotFound(
        f"{name!r} is not an executable in the sandbox's root (working directory {cwd})",
        command=name, searched=candidates[:32], working_directory=cwd, profile=profile.name)
