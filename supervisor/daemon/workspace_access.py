"""Who may launch an agent on which workspace, decided by the daemon from the caller's kernel
identity (SO_PEERCRED uid and groups), never by agentctl. The agent writes the workspace as its
owner, so using a directory is writing it as that owner: a caller may use one they can read,
write and search themselves (the path walked with their credentials, ACLs and all), an `owner`
any, and a role any under the roots `[workspaces] roots` grants it. The directory admitted is
kept open and its inode is what the runtime binds, so a path changed after the check changes
nothing. Needs root (the credential switch and the root-side open)."""

from __future__ import annotations

import asyncio
import errno
import grp
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from supervisor.authz import Role, roles_of
from supervisor.config import Config
from supervisor.errors import SupervisorError, WorkspaceForbidden, WorkspaceInvalid
from supervisor.models import Actor
from supervisor.sandbox.workspace_fs import Credentials, fd_path, open_directory_as

_ACCESS = os.R_OK | os.W_OK | os.X_OK


@dataclass
class AdmittedWorkspace:
    """The workspace directory the caller was admitted to, held open (O_PATH)."""

    path: str  # as the kernel names the inode now
    fd: int
    granted_by: str  # "caller_access", "owner" or "root:<dir>"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def credentials(actor: Actor) -> Credentials:
    """The caller's uid, gid and groups, as the API read them from the kernel."""
    if actor.uid is None:
        raise ValueError("an actor without a uid has no credentials")
    gid = actor.gid if actor.gid is not None else actor.uid
    groups: set[int] = {gid}
    for name in actor.groups:
        if name.isdigit():
            groups.add(int(name))
            continue
        try:
            groups.add(grp.getgrnam(name).gr_gid)
        except KeyError:
            continue  # a group the database no longer knows grants nothing
    return Credentials(actor.uid, gid, tuple(sorted(groups)))


def _under(path: str, root: str) -> bool:
    real_root = os.path.realpath(root)
    return path == real_root or path.startswith(real_root.rstrip("/") + "/")


def _open_as_root(workspace: str) -> int:
    try:
        return os.open(workspace, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise WorkspaceInvalid(f"workspace {workspace}: {exc.strerror}",
                               workspace=workspace) from exc


def _decide(workspace: str, actor: Actor, config: Config) -> AdmittedWorkspace:
    roles = roles_of(actor, config.roles)
    if Role.OWNER in roles:
        fd = _open_as_root(workspace)
        return AdmittedWorkspace(fd_path(fd), fd, "owner")
    if actor.uid is None:  # no kernel identity: nothing to walk the path as
        raise WorkspaceForbidden(f"workspace {workspace}: the caller has no uid to check it as",
                                 workspace=workspace, hint="call through the control socket")
    creds = credentials(actor)
    denied: OSError
    try:
        fd = open_directory_as(workspace, creds, _ACCESS)
        return AdmittedWorkspace(fd_path(fd), fd, "caller_access")
    except (PermissionError, FileNotFoundError, NotADirectoryError) as exc:
        denied = exc
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.ELOOP):
            raise WorkspaceInvalid(f"workspace {workspace}: {exc.strerror}",
                                   workspace=workspace) from exc
        denied = exc
    # Not theirs to use as themselves: maybe under a root their role is granted.
    granted = [(role, root) for role in sorted(roles) for root in
               config.workspaces.roots.get(role.value, [])]
    if granted:
        try:
            fd = os.open(workspace, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            fd = -1  # said as a refusal: root's view must not tell what a private dir holds
        if fd >= 0:
            real = fd_path(fd)  # after the open: the inode that will be bound, wherever it is
            for role, root in granted:
                if _under(real, root):
                    return AdmittedWorkspace(real, fd, f"root:{root}({role.value})")
            os.close(fd)
    why = ("does not exist or is not a directory" if isinstance(
        denied, (FileNotFoundError, NotADirectoryError)) else
        "is not readable, writable and searchable by you")
    raise WorkspaceForbidden(
        f"workspace {workspace} {why} (uid {creds.uid}); the agent would read and write it "
        f"as its owner, so you may only launch on a directory you can use yourself",
        workspace=workspace, uid=creds.uid, groups=list(creds.groups),
        roles=sorted(r.value for r in roles),
        hint="use a directory you own, ask its owner for access (group or ACL), or have an "
             "owner grant your role a workspace root ([workspaces] roots in daemon.toml)")


WorkspaceAdmission = Callable[
    [str | None, Actor, Config, Callable[[SupervisorError], SupervisorError]],
    Awaitable[AdmittedWorkspace | None]]


async def admit_workspace(workspace: str | None, actor: Actor, config: Config,
                          refuse: Callable[[SupervisorError], SupervisorError]
                          ) -> AdmittedWorkspace | None:
    """The workspace `actor` may launch on, held open; a refusal goes through `refuse` (the
    arbiter's audit of refusals) and is raised. Off the event loop: the walk may block on a
    slow file system."""
    if workspace is None:
        return None
    if actor.kind == "system":  # the daemon's own runs (self-test, CI mode) are root's
        fd = await asyncio.to_thread(_open_as_root, workspace)
        return AdmittedWorkspace(fd_path(fd), fd, "owner")
    try:
        return await asyncio.to_thread(_decide, workspace, actor, config)
    except WorkspaceForbidden as exc:
        raise refuse(exc) from None
