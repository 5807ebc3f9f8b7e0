"""Roles from the kernel's word: the socket peer's uid and groups (SO_PEERCRED) mapped to roles
by the config, and the one table of which role may do what. No I/O, no privilege.

owner    everything; the only role that may kill, reactivate and run drills
admin    launch, pause, resume, stop; read state and the audit log
auditor  read state and the audit log
viewer   read state
root is always owner. A peer that maps to no role may do nothing."""

from __future__ import annotations

import enum

from supervisor.config import RolesSection
from supervisor.errors import Forbidden
from supervisor.models import Actor


class Role(enum.StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    AUDITOR = "auditor"
    VIEWER = "viewer"


_READERS = frozenset(Role)
_ADMINS = frozenset({Role.OWNER, Role.ADMIN})
_OWNERS = frozenset({Role.OWNER})

PERMISSIONS: dict[str, frozenset[Role]] = {
    "read": _READERS,
    "audit": frozenset({Role.OWNER, Role.ADMIN, Role.AUDITOR}),
    "launch": _ADMINS,
    "pause": _ADMINS,
    "resume": _ADMINS,
    "stop": _ADMINS,
    "kill": _OWNERS,
    "reactivate": _OWNERS,
    "forget": _OWNERS,  # agentctl rm: drops an idle agent's registration
    "drill": _OWNERS,
    "approve": _ADMINS,  # approve or deny a request the egress gateway holds
    "breaker_reset": _ADMINS,
    "reload": _OWNERS,  # apply a changed configuration (daemon/reload.py)
}


def roles_of(actor: Actor, config: RolesSection) -> frozenset[Role]:
    if actor.kind == "system" or actor.uid == 0:
        return frozenset({Role.OWNER})
    user = f"user:{actor.name}" if actor.name else None
    uid = f"user:{actor.uid}"
    groups = {f"group:{g}" for g in actor.groups}
    held = set()
    for role in Role:
        principals = set(getattr(config, role.value))
        if (user in principals) or (uid in principals) or (groups & principals):
            held.add(role)
    return frozenset(held)


def needed_role(permission: str) -> Role:
    """The least role that grants `permission` (for error messages)."""
    for role in (Role.VIEWER, Role.AUDITOR, Role.ADMIN, Role.OWNER):
        if role in PERMISSIONS[permission]:
            return role
    return Role.OWNER


def check(actor: Actor, roles: frozenset[Role], permission: str) -> None:
    """Raise Forbidden naming the peer and the role `permission` needs."""
    if roles & PERMISSIONS[permission]:
        return
    needed = needed_role(permission)
    held = ", ".join(sorted(r.value for r in roles)) or "no role"
    raise Forbidden(
        f"uid {actor.uid} ({actor.name or 'unknown user'}) holds {held}; "
        f"'{permission}' needs {needed.value}",
        uid=actor.uid, user=actor.name, roles=sorted(r.value for r in roles),
        permission=permission, needed_role=needed.value,
    )
