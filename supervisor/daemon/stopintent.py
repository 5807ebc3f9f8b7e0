"""Why the daemon is being stopped, as systemd sees it: a `systemctl restart` (or an upgrade's
try-restart) or a plain stop. No privilege of its own; asks systemd (systemctl) when the
daemon runs as a systemd service, and says so when it does not.

For the `daemon_stop` row only: what the daemon does is told by the signal (the unit's
RestartKillSignal=SIGUSR2 makes a restart job send SIGUSR2, a stop sends SIGTERM), so this is
asked while the daemon acts, never in front of a kill. A restart job keeps the type `restart`
until the unit has stopped (it becomes a start job only then), so `systemctl list-jobs` names
it meanwhile. The unit is the `.service` in the daemon's own cgroup path (/proc/self/cgroup).
Asked once, bounded in time: no answer is recorded as unknown, never guessed.

At the start, `restart_warning` asks the unit's RestartKillSignal once (off the start's path):
on a systemd older than 244, which has no such setting, or a unit that sets another signal, a
restart job sends SIGTERM and `systemctl restart` kills every agent; the daemon says so in its
log then, before anyone restarts it, not only afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import signal
from pathlib import Path

from supervisor.sandbox.childenv import child_env

log = logging.getLogger(__name__)

_ASK_TIMEOUT = 2.0
_SERVICE = re.compile(r"/([^/]+\.service)(?:/|$)")


def own_unit(cgroup_file: Path = Path("/proc/self/cgroup")) -> str | None:
    """The systemd service this process runs in, from its cgroup path; None outside one."""
    with contextlib.suppress(OSError):
        for line in cgroup_file.read_text().splitlines():
            hierarchy, _, path = line.partition(":")[2].partition(":")
            if hierarchy in ("name=systemd", "") and (match := _SERVICE.search(path)):
                return match.group(1)
    return None


def job_type(listing: str, unit: str) -> str | None:
    """The type of `unit`'s job in `systemctl list-jobs --no-legend --plain` output."""
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == unit:
            return fields[2]
    return None


async def _ask(systemctl: str, *args: str) -> tuple[str | None, str | None]:
    """systemctl's stdout, or None and why there is none (bounded by _ASK_TIMEOUT)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            systemctl, *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL,
            env=child_env())
    except OSError as exc:
        return None, str(exc)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), _ASK_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None, "systemctl did not answer"
    return out.decode(errors="replace"), None


async def stop_intent(service: bool) -> dict[str, str | None]:
    """{"unit": ..., "systemd_job": "restart" | "stop" | ... | None}; {} unless `service`
    (systemd started this process as a service: it had an INVOCATION_ID)."""
    unit = own_unit() if service else None
    systemctl = shutil.which("systemctl")
    if unit is None or systemctl is None:
        return {}
    out, error = await _ask(systemctl, "list-jobs", "--no-legend", "--plain", "--no-pager",
                            unit)
    if out is None:
        return {"unit": unit, "systemd_job": None, "error": error}
    return {"unit": unit, "systemd_job": job_type(out, unit)}


def restart_kills(value: str, unit: str) -> str | None:
    """What `systemctl restart` does to the agents, from `systemctl show --value
    --property=RestartKillSignal UNIT`: None when it sends SIGUSR2 (a handover), else why it
    kills them. A systemd before 244 knows no such property and prints an empty line."""
    value = value.strip()
    if value == str(int(signal.SIGUSR2)):
        return None
    how = (f"use `systemctl kill -s USR2 {unit}` to restart with the agents kept "
           f"(docs/runbook.md, \"Restarting or upgrading the daemon\")")
    if not value:
        return (f"this systemd is older than 244 (it has no RestartKillSignal=): "
                f"`systemctl restart {unit}` sends SIGTERM and kills every agent; {how}")
    try:
        name = signal.Signals(int(value)).name
    except ValueError:
        name = value
    return (f"{unit} has RestartKillSignal={name}, not SIGUSR2: `systemctl restart {unit}` "
            f"kills every agent; {how}, or restore the unit's RestartKillSignal=SIGUSR2")


async def restart_warning(service: bool) -> str | None:
    """Logs, and returns, a warning when a restart job of this daemon's unit would kill every
    agent; None when it hands them over, outside systemd, or when systemctl cannot tell."""
    unit = own_unit() if service else None
    systemctl = shutil.which("systemctl")
    if unit is None or systemctl is None:
        return None
    out, _error = await _ask(systemctl, "show", "--value", "--property=RestartKillSignal", unit)
    warning = None if out is None else restart_kills(out, unit)
    if warning is not None:
        log.warning("%s", warning)
    return warning
