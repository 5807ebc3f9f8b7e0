"""Which host user an agent writes its workspace as, and which workspaces are refused. Both
runtimes use it: runc maps the agent's uid onto the owner, docker runs the agent as the owner.
Reads the workspace's inode; no privilege beyond that."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from supervisor.errors import WorkspaceInvalid


@dataclass(frozen=True)
class WorkspaceOwner:
    uid: int
    gid: int | None  # None: the group is a system or sandbox group, not one to run as


def workspace_owner(workspace: str, min_owner_uid: int, reserved: range) -> WorkspaceOwner:
    """The owner of `workspace`, refused when it is a system user or inside the host range
    reserved for sandboxes (it could belong to another agent)."""
    try:
        st = os.stat(workspace)
    except OSError as exc:
        raise WorkspaceInvalid(f"workspace {workspace}: {exc.strerror}",
                               workspace=workspace) from exc
    if not Path(workspace).is_dir():
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
