"""Why the daemon is being stopped, as systemd sees it: a `systemctl restart` (or an upgrade's
try-restart) or a plain stop. No privilege of its own; asks systemd (systemctl) when the
daemon runs as a systemd service, and says so when it does not.

For the `daemon_stop` row only: what the daemon does is told by the signal (the unit's
RestartKillSignal=SIGUSR2 makes a restart job send SIGUSR2, a stop sends SIGTERM), so this is
asked while the daemon acts, never in front of a kill. A restart job keeps the type `restart`
until the unit has stopped (it becomes a start job only then), so `systemctl list-jobs` names
it meanwhile. The unit is the `.service` in the daemon's own cgroup path (/proc/self/cgroup).
Asked once, bounded in time: no answer is recorded as unknown, never guessed."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from pathlib import Path

from supervisor.sandbox.childenv import child_env

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


async def stop_intent(service: bool) -> dict[str, str | None]:
    """{"unit": ..., "systemd_job": "restart" | "stop" | ... | None}; {} unless `service`
    (systemd started this process as a service: it had an INVOCATION_ID)."""
    unit = own_unit() if service else None
    systemctl = shutil.which("systemctl")
    if unit is None or systemctl is None:
        return {}
    try:
        proc = await asyncio.create_subprocess_exec(
            systemctl, "list-jobs", "--no-legend", "--plain", "--no-pager", unit,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            stdin=asyncio.subprocess.DEVNULL, env=child_env())
    except OSError as exc:
        return {"unit": unit, "systemd_job": None, "error": str(exc)}
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), _ASK_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return {"unit": unit, "systemd_job": None, "error": "systemctl did not answer"}
    return {"unit": unit, "systemd_job": job_type(out.decode(errors="replace"), unit)}
