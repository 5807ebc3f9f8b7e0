"""Roles from SO_PEERCRED, for the whole role x verb table, with real non-root users created
for the test and a real daemon. Needs root."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon, running_daemon

ROLES = ("owner", "admin", "auditor", "viewer", "unmapped")
# verb -> the roles that may do it (the table in supervisor/authz.py, stated independently).
ALLOWED = {
    "ls": {"owner", "admin", "auditor", "viewer"},
    "inspect": {"owner", "admin", "auditor", "viewer"},
    "logs": {"owner", "admin", "auditor", "viewer"},
    "status": {"owner", "admin", "auditor", "viewer"},
    "audit": {"owner", "admin", "auditor"},
    "audit verify": {"owner", "admin", "auditor"},
    "run": {"owner", "admin"},
    "pause": {"owner", "admin"},
    "resume": {"owner", "admin"},
    "stop": {"owner", "admin"},
    "kill": {"owner"},
    "reactivate": {"owner"},
    "approvals": {"owner", "admin", "auditor", "viewer"},
    "approve": {"owner", "admin"},
    "deny": {"owner", "admin"},
    "breaker reset": {"owner", "admin"},
    "reload": {"owner"},
}
# Allowed, but with nothing to act on: the answer is that error, never `forbidden`.
ALLOWED_ERROR = {"approve": "approval_not_found", "deny": "approval_not_found",
                 "breaker reset": "illegal_transition"}
# The state the target agent must be in for the verb to be legal when allowed.
NEEDS = {"pause": "active", "resume": "paused", "stop": "active", "kill": "active",
         "reactivate": "killed", "run": "idle"}


@contextlib.contextmanager
def role_users() -> Iterator[dict[str, Any]]:
    """One user per role, all in the socket's group (so the file mode lets them connect and
    only the roles decide); admin is mapped through a group of its own, the rest by name."""
    tag = os.urandom(2).hex()
    sock_group, admin_group = f"ast-sock-{tag}", f"ast-adm-{tag}"
    names = {role: f"ast-{role[:5]}-{tag}" for role in ROLES}
    subprocess.run(["groupadd", sock_group], check=True)
    subprocess.run(["groupadd", admin_group], check=True)
    try:
        for role, name in names.items():
            groups = sock_group + (f",{admin_group}" if role == "admin" else "")
            subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-G", groups,
                            name], check=True)
        yield {"socket_group": sock_group, "admin_group": admin_group,
               "users": {role: pwd.getpwnam(name) for role, name in names.items()}}
    finally:
        for name in names.values():
            subprocess.run(["userdel", name], check=False, capture_output=True)
        subprocess.run(["groupdel", admin_group], check=False, capture_output=True)
        subprocess.run(["groupdel", sock_group], check=False, capture_output=True)


def as_user(daemon: Daemon, user: pwd.struct_passwd, *args: str
            ) -> subprocess.CompletedProcess[str]:
    env = {"AGENT_SUPERVISOR_SOCKET": str(daemon.socket), "PATH": "/usr/bin:/bin", "HOME": "/",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args], env=env, capture_output=True,
        text=True, timeout=60, user=user.pw_uid, group=user.pw_gid,
        extra_groups=os.getgrouplist(user.pw_name, user.pw_gid), cwd="/",
    )


def ensure(daemon: Daemon, name: str, state: str) -> None:
    """Bring agent `name` into `state` as root."""
    agents = {a["name"]: a["state"] for a in daemon.client.agents()["agents"]}
    current = agents.get(name)
    if current == "killed" and state != "killed":
        daemon.agentctl("reactivate", name, check=True)
        current = "idle"
    if current in ("active", "paused") and state in ("idle",):
        daemon.agentctl("stop", name, "--grace", "1s", check=True)
        current = "idle"
    if state in ("active", "paused", "killed") and current in (None, "idle"):
        daemon.agentctl("run", "--detach", "--name", name, "--", "sleep", "600", check=True)
        current = "active"
    if state == "paused" and current == "active":
        daemon.agentctl("pause", name, check=True)
    if state == "active" and current == "paused":
        daemon.agentctl("resume", name, check=True)
    if state == "killed" and current in ("active", "paused"):
        daemon.agentctl("kill", name, "--reason", "test over", check=True)
        daemon.cleanup_audited(name)  # written after the answer: never inside a count below


def invocation(verb: str, target: str) -> list[str]:
    if verb == "run":
        return ["run", "--json", "--detach", "--name", target, "--", "sleep", "600"]
    if verb == "stop":
        return ["stop", target, "--grace", "1s", "--json"]
    if verb in ("ls", "status", "audit", "audit verify", "approvals", "reload"):
        return [*verb.split(), "--json"]
    if verb in ("approve", "deny"):
        return [verb, "00000000", "--reason", "role test", "--json"]
    if verb == "kill":  # a kill needs its reason (reason_required otherwise, for every role)
        return ["kill", target, "--reason", "role test", "--json"]
    if verb == "breaker reset":
        return ["breaker", "reset", target, "--json"]
    return [verb, target, "--json"]


def test_every_role_and_verb(tmp_root: Path) -> None:
    with role_users() as setup:
        users = setup["users"]
        roles = {"owner": [f"user:{users['owner'].pw_name}"],
                 "admin": [f"group:{setup['admin_group']}"],
                 "auditor": [f"user:{users['auditor'].pw_name}"],
                 "viewer": [f"user:{users['viewer'].pw_uid}"]}  # by uid works too
        with running_daemon(tmp_root, daemon={"socket_group": setup["socket_group"]},
                            roles=roles) as daemon:
            outcomes: dict[tuple[str, str], str] = {}
            for role in ROLES:
                target = f"t-{role}"
                ensure(daemon, target, "active")
                for verb, allowed_roles in ALLOWED.items():
                    allowed = role in allowed_roles
                    if allowed and verb in NEEDS:
                        ensure(daemon, target, NEEDS[verb])
                    before = len(daemon.client.audit(limit=10_000)["entries"])
                    result = as_user(daemon, users[role], *invocation(verb, target))
                    if allowed and verb == "kill" and result.returncode == 0:
                        daemon.cleanup_audited(target)
                    if allowed and verb in ALLOWED_ERROR:
                        code = json.loads(result.stdout or "{}").get("error", {}).get("code")
                        outcomes[(role, verb)] = "ok" if code == ALLOWED_ERROR[verb] else (
                            f"rc={result.returncode} {result.stdout} {result.stderr}")
                        continue
                    if allowed:
                        outcomes[(role, verb)] = "ok" if result.returncode == 0 else (
                            f"rc={result.returncode} {result.stdout} {result.stderr}")
                        continue
                    body = json.loads(result.stdout) if result.stdout else {}
                    error = body.get("error", {})
                    audit = daemon.client.audit(limit=10_000)["entries"]
                    refusal = audit[-1] if len(audit) == before + 1 else {}
                    good = (result.returncode == 5 and error.get("code") == "forbidden"
                            and error["detail"]["uid"] == users[role].pw_uid
                            and error["detail"]["needed_role"] in ("viewer", "auditor", "admin",
                                                                   "owner")
                            and refusal.get("outcome") == "refused:forbidden"
                            and refusal["detail"]["actor"]["uid"] == users[role].pw_uid)
                    outcomes[(role, verb)] = "forbidden" if good else (
                        f"rc={result.returncode} {result.stdout} {result.stderr} {refusal}")
            expected = {(role, verb): "ok" if role in allowed else "forbidden"
                        for role in ROLES for verb, allowed in ALLOWED.items()}
            wrong = {k: v for k, v in outcomes.items() if v != expected[k]}
            assert not wrong, json.dumps({f"{r}/{v}": o for (r, v), o in wrong.items()},
                                         indent=1)
            # Every action names its invoker: the admin's pause is on the audit row as them.
            pauses = [e for e in daemon.client.audit(limit=10_000)["entries"]
                      if e["verb"] == "pause" and e["outcome"] == "ok"]
            assert {e["detail"]["actor"]["uid"] for e in pauses} >= {
                users["owner"].pw_uid, users["admin"].pw_uid}


@pytest.mark.parametrize("principal", ["user:root", "bogus", "group:"])
def test_a_bad_role_principal_is_a_config_error(tmp_root: Path, principal: str) -> None:
    from tests.support.daemon import new_daemon

    daemon = new_daemon(tmp_root, roles={"owner": [principal]})
    daemon.write_config()
    result = subprocess.run([sys.executable, "-m", "supervisor.daemon", "--config",
                             str(daemon.config_path), "--check-config"],
                            capture_output=True, text=True)
    if principal == "user:root":
        assert result.returncode == 0  # naming root is allowed (and redundant)
    else:
        assert result.returncode == 78
        assert "roles.owner" in result.stderr
