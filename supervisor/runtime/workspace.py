"""Which host user an agent writes its workspace as, which workspaces are refused, and the
workspace pinned and staged for a run. Both runtimes use it: runc maps the agent's uid onto the
owner, docker runs the agent as the owner; both bind the staged mounts. Staging needs root."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from supervisor.errors import WorkspaceInvalid
from supervisor.sandbox.workspace_binds import StagedWorkspace, stage


@dataclass(frozen=True)
class WorkspaceOwner:
    """The uid (and gid) that own a run's workspace."""
    uid: int
    gid: int | None  # None: the group is a system or sandbox group, not one to run as


def workspace_owner(workspace: str, min_owner_uid: int, reserved: range,
                    fd: int | None = None) -> WorkspaceOwner:
    """The owner of `workspace` (of the inode `fd` pins, when given), refused when it is a
    system user or inside the host range reserved for sandboxes (it could belong to another
    agent)."""
    try:
        st = os.stat(fd if fd is not None else workspace)
    except OSError as exc:
        raise WorkspaceInvalid(f"workspace {workspace}: {exc.strerror}",
                               workspace=workspace) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise WorkspaceInvalid(f"workspace {workspace} is not a directory", workspace=workspace)
    if st.st_uid < min_owner_uid:
        owner = _user_name(st.st_uid)
        raise WorkspaceInvalid(
            f"workspace {workspace} is owned by {owner} (uid {st.st_uid}); the agent "
            f"writes it as its owner and never as a system user, so chown it to an "
            f"unprivileged user (uid >= {min_owner_uid})",
            workspace=workspace, owner_uid=st.st_uid, min_owner_uid=min_owner_uid,
        )
    if st.st_uid in reserved:
        raise WorkspaceInvalid(
            f"workspace {workspace} is owned by uid {st.st_uid}, inside the host range "
            f"reserved for sandboxes ({reserved.start}-{reserved.stop - 1}); it could "
            f"belong to another agent", workspace=workspace, owner_uid=st.st_uid,
        )
    gid_usable = st.st_gid >= min_owner_uid and st.st_gid not in reserved
    return WorkspaceOwner(st.st_uid, st.st_gid if gid_usable else None)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def pin_workspace(workspace: str, admitted_fd: int | None) -> int:
    """An O_PATH fd of the workspace directory, the caller's to close: a duplicate of the fd
    the caller was admitted to, else the path opened once here (root, following symlinks,
    as the trusted callers that pass no fd expect)."""
    try:
        if admitted_fd is not None:
            return os.dup(admitted_fd)
        return os.open(workspace, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise WorkspaceInvalid(f"workspace {workspace}: {exc.strerror}",
                               workspace=workspace) from exc


def stage_workspace(workspace: str, fd: int, readonly: list[str], directory: Path
                    ) -> StagedWorkspace:
    """The run's workspace binds (workspace_binds.stage), errors named as the workspace's."""
    try:
        return stage(fd, readonly, directory)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno in (errno.ELOOP, errno.EXDEV):
            why = ("a read-only workspace path goes through a symlink or leaves the "
                   "workspace; it must be a real file or directory inside it")
        raise WorkspaceInvalid(f"workspace {workspace}: {exc.filename or ''}: {why}",
                               workspace=workspace, path=exc.filename) from exc


_T = TypeVar("_T")


async def off_loop(call: Callable[..., _T], *args: object) -> _T:
    """Run mount and fd work (staging a workspace's binds, ~140 ms a launch, and checking
    them) in a thread, so concurrent launches never hold the control loop. Threads share the
    mount namespace and fd table, so the work is the same. If the caller is cancelled, the
    thread still finishes before the cancellation goes on: the caller's undo then sees
    everything it did (nothing staged after its cleanup ran)."""
    future = asyncio.get_running_loop().run_in_executor(None, call, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await future
        raise
