"""The environment of every program the supervisor executes on the host (runc, nft, nsenter,
its watchdog): a fixed minimal set, never the daemon's own. No privilege; no I/O.

The daemon's environment holds what only the daemon may see or act on: systemd's
NOTIFY_SOCKET (runc, finding it, bind-mounts that socket into the container), WATCHDOG_*,
LISTEN_* (inherited socket activation would make a child claim the daemon's fds),
INVOCATION_ID, CREDENTIALS_DIRECTORY, and secrets that webhooks and routes read by name
(`secret_env`, `env:NAME`). An allow-list closes the whole class at once: a variable added
to the unit or the shell tomorrow reaches no child unless it is named here. What a sandbox
sees is decided separately, by its profile and request (sandbox/bundle.py, agent_env)."""

from __future__ import annotations

import os

# Debian's default root PATH: where runc, nft, nsenter and ip live on every supported host.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Daemon variables a child may inherit: none of them names a resource, a socket or a secret.
_INHERITED = ("TZ",)


def host_path(value: str | None) -> str:
    """$PATH's absolute entries, in order (none: SYSTEM_PATH). An empty entry (`PATH=":$PATH"`,
    or `"$TOOLS:$PATH"` with $TOOLS unset) or a relative one (`.`) names the current directory,
    which for an embedded run is the CI job's checkout: a `runc`, `nsenter` or `cp` an agent
    left there would run as root."""
    entries = [entry for entry in (value or "").split(os.pathsep) if entry.startswith("/")]
    return os.pathsep.join(entries) or SYSTEM_PATH


def confine_path() -> None:
    """The process's own $PATH made host_path's, at a supervisor's entry (the daemon, the
    embedded runner): what it looks up itself (shutil.which) and starts with its environment
    (cp, git, systemctl) is found in absolute directories only, as child_env's programs are."""
    os.environ["PATH"] = host_path(os.environ.get("PATH"))


def child_env() -> dict[str, str]:
    """PATH (the daemon's absolute entries, else the system's), a UTF-8 locale, and nothing
    that is the daemon's own."""
    env = {"PATH": host_path(os.environ.get("PATH")), "LANG": "C.UTF-8"}
    for name in _INHERITED:
        value = os.environ.get(name)
        if value is not None:
            env[name] = value
    return env
