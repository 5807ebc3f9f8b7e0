"""Kill drills: launch a canary agent that forks N processes and holds network state, kill it
through the same path as a real kill, and prove nothing survived: no process, no network
namespace, no cgroup, no bundle, credentials revoked, time_to_halt within the SLO. Results are
kept in SQLite and audited (verb "drill"). Runs in the daemon; touches the kernel only through
the arbiter and its runtime."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shutil
import sqlite3
import time

from supervisor.config import DrillSection
from supervisor.daemon.arbiter import SYSTEM, Arbiter
from supervisor.daemon.killpath import RevocationCheck
from supervisor.errors import SupervisorError
from supervisor.models import ActionRequest, Actor, DrillResult, RunRequest, Scope

log = logging.getLogger(__name__)

DRILL_CLASS = "drill"
_SPAWN_TIMEOUT = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS drills (
    id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    result TEXT NOT NULL
);
"""

# The canary: every process holds a socket, and the first holds an established loopback TCP
# connection inside the run's network namespace, so the drill kills live network state. The
# others exec `sleep` with their socket inherited: small processes, like an agent's tools,
# rather than N copies of a Python heap for the kernel to free.
_PY_CANARY = r"""
import os, socket, sys, time
n = int(sys.argv[1])
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1)
client = socket.create_connection(server.getsockname()); peer, _ = server.accept()
for _ in range(n - 1):
    if os.fork() == 0:
        held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        held.set_inheritable(True)
        os.execv("/bin/sleep", ["sleep", "3600"])
print("canary ready", n, flush=True)
while True:
    time.sleep(3600)
"""
_SH_CANARY = 'i=1; while [ "$i" -lt "$1" ]; do sleep 3600 & i=$((i+1)); done; echo ready; wait'


def canary_command(processes: int) -> list[str]:
    """The canary as seen from inside the sandbox (the host's /usr is bound read-only)."""
    if shutil.which("python3", path="/usr/bin"):
        return ["/usr/bin/python3", "-c", _PY_CANARY, str(processes)]
    return ["/bin/sh", "-c", _SH_CANARY, "canary", str(processes)]


class Drills:
    def __init__(self, arbiter: Arbiter, db: sqlite3.Connection, config: DrillSection) -> None:
        self.arbiter = arbiter
        self.db = db
        self.config = config
        self._lock = asyncio.Lock()
        db.executescript(SCHEMA)

    def history(self, limit: int = 50) -> list[DrillResult]:
        rows = self.db.execute("SELECT result FROM drills ORDER BY ts DESC LIMIT ?",
                               (limit,)).fetchall()
        return [DrillResult.model_validate_json(r[0]) for r in rows]

    async def run(self, actor: Actor, processes: int | None = None,
                  slo: float | None = None) -> DrillResult:
        async with self._lock:  # one drill at a time
            return await self._run(actor, processes or self.config.processes,
                                   slo if slo is not None else self.config.slo)

    async def _run(self, actor: Actor, processes: int, slo: float) -> DrillResult:
        drill_id = secrets.token_hex(4)
        name = f"drill-{drill_id}"
        checks: dict[str, str] = {}
        survivors: list[int] = []
        time_to_halt_ms: float | None = None
        seen = 0
        error: str | None = None
        check: RevocationCheck | None = None
        try:
            view = await self.arbiter.launch(
                RunRequest.model_validate({"name": name, "class": DRILL_CLASS,
                                           "command": canary_command(processes)}),
                actor)
            live = self.arbiter.live.get(view.id)
            handle = live.handle if live else None
            if handle is None:
                raise RuntimeError("the drill run did not start")
            deadline = time.monotonic() + _SPAWN_TIMEOUT
            while (seen := handle.process_count()) < processes:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {seen} of {processes} canary processes started "
                                       f"within {_SPAWN_TIMEOUT:g}s")
                await asyncio.sleep(0.02)
            # Taken before the kill: the gateway keeps the run's listener for it, so the
            # check after the kill asks the gateway itself whether step 2 revoked the token.
            check = self.arbiter.credentials.revocation_check(view.id)
            try:
                killed = await self.arbiter.act(
                    "kill", ActionRequest(scope=Scope(agent=name), reason=f"drill {drill_id}"),
                    actor)
                time_to_halt_ms = killed.time_to_halt_ms
                checks["kill_confirmed"] = "pass"
            except SupervisorError as exc:
                checks["kill_confirmed"] = f"fail: {exc.code}: {exc.message}"
                survivors = list(exc.detail.get("survivors", []))
            revoked = (await check.result() if check is not None
                       else "n/a: the run held no credentials")
            if checks["kill_confirmed"] == "pass":  # runtime state goes after the answer
                with contextlib.suppress(TimeoutError):
                    await self.arbiter.settled(view.id, _SPAWN_TIMEOUT)
            residue = handle.residue()
            survivors = sorted(set(survivors) | set(residue.get("processes", [])))
            checks["no_processes"] = "pass" if not survivors else f"fail: {survivors}"
            checks["no_network"] = ("pass" if "netns" not in residue
                                    else f"fail: {residue['netns']} still exists")
            checks["no_sandbox_state"] = ("pass" if not set(residue) - {"processes", "netns"}
                                          else f"fail: {sorted(residue)} left")
            checks["credentials_revoked"] = revoked
            if time_to_halt_ms is None:
                checks["slo"] = "fail: no time_to_halt"
            elif time_to_halt_ms <= slo * 1000:
                checks["slo"] = "pass"
            else:
                checks["slo"] = f"fail: {time_to_halt_ms:.1f} ms > {slo * 1000:g} ms"
        except (SupervisorError, RuntimeError, OSError) as exc:
            error = str(exc)
            checks.setdefault("started", f"fail: {exc}")
            with contextlib.suppress(SupervisorError):
                await self.arbiter.act("kill", ActionRequest(scope=Scope(agent=name),
                                                             reason="drill aborted"), SYSTEM)
        finally:
            if check is not None:
                check.release()  # the gateway may close the run's listener
        passed = error is None and all(not v.startswith("fail") for v in checks.values())
        result = DrillResult(
            id=drill_id, ts=time.time(), actor=actor.label(), processes=processes,
            processes_seen=seen, slo_ms=slo * 1000, time_to_halt_ms=time_to_halt_ms,
            passed=passed, checks=checks, survivors=survivors, error=error,
        )
        with self.db:
            self.db.execute("INSERT INTO drills VALUES (?, ?, ?)",
                            (drill_id, result.ts, result.model_dump_json()))
        self.arbiter.audit.append(
            actor=actor.label(), verb="drill", scope=f"agent:{name}", target=name,
            reason=f"drill {drill_id}", time_to_halt_ms=time_to_halt_ms,
            outcome="ok" if passed else "failed", detail=json.loads(result.model_dump_json()),
        )
        if passed and name in self.arbiter.agents:
            # A passed drill leaves nothing behind, not even its agent; a failed one stays
            # (killed, visible in `agentctl ls`) for the on-call engineer to look at.
            self.arbiter.forget_agent(name, SYSTEM, f"drill {drill_id} passed")
        level = logging.INFO if passed else logging.ERROR
        log.log(level, "drill %s %s: time_to_halt_ms=%s slo_ms=%g checks=%s", drill_id,
                "passed" if passed else "FAILED", time_to_halt_ms, slo * 1000, checks)
        return result

    async def schedule(self) -> None:
        """Run a drill every `interval` (actor system) until cancelled."""
        interval = self.config.interval
        if interval is None:
            return
        while True:
            await asyncio.sleep(interval)
            if self.arbiter.global_halt or self.arbiter.shutting_down:
                log.warning("scheduled drill skipped: %s", "global halt in force"
                            if self.arbiter.global_halt else "shutting down")
                continue
            try:
                await self.run(SYSTEM)
            except Exception:
                log.exception("scheduled drill crashed")
