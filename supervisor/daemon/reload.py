"""Reload: apply a changed configuration to the running daemon, every agent kept running.
Reads the configuration as a start would (daemon/configcheck.py) on a thread; no privilege
beyond the daemon's own.

Reloadable, applied at once: [roles] (who may do what on the socket, new connections and
requests alike), [workspaces], [[webhooks]] with their secrets and [webhook_delivery],
[metrics] (the endpoint moves), [drill] (the schedule restarts). Profiles, with their
tripwires and egress routes, and the route secrets they name are read at each launch, so
new runs get them. A running gateway run of a changed profile, or whose routes name a changed
secret, gets the profile's routes, allow list, budgets and approval rules and the secrets as
they are now, for its next request (daemon/egress.py `regrant`; open tunnels are cut); it
keeps its token and expiry, breaker, MCP servers, tripwires and limits. Any other section is
reported as needing a restart and keeps its running value.

A configuration with any error is refused whole (ConfigInvalid listing every error, audited)
and the running one stays. An unusable Docker engine socket (dockerd down) is no such error:
nothing a reload applies talks to the engine ([docker] itself takes a restart), so the reload
applies and reports it in `warnings`; a start still refuses it (fail closed). One reload
at a time; each is one audit row, `config_reload`, naming the sections and profiles that
changed (never a value: secrets live in some of them). SIGHUP, `ExecReload=agentctl reload`
and POST /v1/reload all come here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from supervisor.api.server import RoleTable
from supervisor.audit import AuditLog
from supervisor.config import Config
from supervisor.daemon.arbiter import Arbiter
from supervisor.daemon.configcheck import CheckedConfig, check_config
from supervisor.daemon.drills import Drills
from supervisor.daemon.egress import EgressControl
from supervisor.daemon.notify import Notifier
from supervisor.errors import ReloadRefused, SupervisorError
from supervisor.events import DeliveryWorker, Outbox
from supervisor.metrics import MetricsEndpoint
from supervisor.models import Actor
from supervisor.sandbox import runs_parent

log = logging.getLogger(__name__)

RELOADABLE = ("roles", "workspaces", "webhooks", "webhook_delivery", "metrics", "drill")
# Said of an unusable engine socket at a reload, which it does not refuse.
ENGINE_NOTE = ("; not needed by a reload (applied without it): docker launches are refused "
               "(engine_unavailable) until the engine answers, and a restart would not start")

StartMetrics = Callable[[str], Awaitable[MetricsEndpoint | None]]


class ConfigReloader:
    def __init__(self, path: Path | None, checked: CheckedConfig, *, arbiter: Arbiter,
                 audit: AuditLog, roles: RoleTable, outbox: Outbox,
                 webhook_worker: DeliveryWorker, drills: Drills, notifier: Notifier,
                 start_metrics: StartMetrics, metrics_endpoint: MetricsEndpoint | None,
                 admission_roles: Callable[[Any], None],
                 egress: EgressControl | None = None) -> None:
        assert checked.config is not None
        self.path = path
        self.current: Config = checked.config
        self.profiles = dict(checked.profiles)
        self.secrets = dict(checked.secrets)
        self.endpoints = list(checked.endpoints)
        self.arbiter = arbiter
        self.audit = audit
        self.roles = roles
        self.outbox = outbox
        self.webhook_worker = webhook_worker
        self.drills = drills
        self.notifier = notifier
        self.start_metrics = start_metrics
        self.metrics_endpoint = metrics_endpoint
        self.admission_roles = admission_roles
        self.egress = egress
        self.drill_schedule: asyncio.Task[None] = asyncio.create_task(drills.schedule())
        self._lock = asyncio.Lock()
        self._signalled: set[asyncio.Task[Any]] = set()

    def on_sighup(self) -> None:
        """SIGHUP: the same reload, its outcome in the log and the audit row."""
        task = asyncio.create_task(self._from_signal())
        self._signalled.add(task)
        task.add_done_callback(self._signalled.discard)

    async def _from_signal(self) -> None:
        try:
            await self.reload(Actor(kind="system", name="sighup"), "SIGHUP")
        except SupervisorError as exc:
            log.error("reload on SIGHUP refused: %s", exc.message)

    async def reload(self, actor: Actor, reason: str) -> dict[str, Any]:
        async with self._lock:
            self.notifier.reloading()
            status = "accepting runs; reload refused, previous configuration kept"
            try:
                result = await self._reload(actor, reason)
                status = f"accepting runs; reloaded ({', '.join(result['changed']) or 'no change'})"
                return result
            finally:
                self.notifier.reloaded(status)

    async def _reload(self, actor: Actor, reason: str) -> dict[str, Any]:
        checked = await asyncio.to_thread(check_config, self.path)
        label = actor.label()
        # The engine's socket (dockerd down) stops a start, not a reload: nothing a reload
        # applies talks to the engine. It is reported with the outcome either way.
        warnings = [{**e, "reason": e["reason"] + ENGINE_NOTE} for e in checked.engine_errors]
        if not checked.reloadable:
            errors = checked.reload_errors
            self.audit.append(actor=label, verb="config_reload", scope="global", reason=reason,
                              outcome="refused", detail={"source": checked.source,
                                                         "errors": errors,
                                                         "warnings": warnings})
            log.error("reload refused: %d error(s) in the configuration", len(errors))
            raise ReloadRefused(_summary(errors), source=checked.source, errors=errors,
                                warnings=warnings)
        new = checked.config
        assert new is not None
        old = self.current
        if runs_parent.nested(old.sandbox.cgroup_parent, new.sandbox.cgroup_parent):
            errors = [nested_parent_error(checked.source, old, new)]
            self.audit.append(actor=label, verb="config_reload", scope="global", reason=reason,
                              outcome="refused", detail={"source": checked.source,
                                                         "errors": errors,
                                                         "warnings": warnings})
            log.error("reload refused: %s", errors[0]["reason"])
            raise ReloadRefused(_summary(errors), source=checked.source, errors=errors,
                                warnings=warnings)
        for warning in warnings:
            log.warning("reload: %s: %s", warning["key"], warning["reason"])
        sections = [name for name in type(old).model_fields
                    if getattr(old, name) != getattr(new, name)]
        applied = [s for s in sections if s in RELOADABLE]
        if self.endpoints != checked.endpoints and "webhooks" not in applied:
            applied.append("webhooks")  # a secret file changed: same keys, new secret
        restart_required = [s for s in sections if s not in RELOADABLE]
        if old.sandbox.cgroup_parent != new.sandbox.cgroup_parent:
            warnings.append(parent_change_warning(checked.source, old, new,
                                                  len(self.arbiter.live)))
            log.warning("reload: %s: %s", warnings[-1]["key"], warnings[-1]["reason"])
        secrets = sorted(ref for ref in set(self.secrets) | set(checked.secrets)
                         if self.secrets.get(ref) != checked.secrets.get(ref))
        profiles = sorted(name for name in set(self.profiles) | set(checked.profiles)
                          if self.profiles.get(name) != checked.profiles.get(name))

        if "metrics" in applied:
            try:
                await self._move_metrics(new.metrics.listen)
            except SupervisorError as exc:
                errors = [{"path": checked.source, "key": "metrics.listen",
                           "reason": exc.message}]
                self.audit.append(actor=label, verb="config_reload", scope="global",
                                  reason=reason, outcome="refused",
                                  detail={"source": checked.source, "errors": errors})
                raise ReloadRefused(_summary(errors), source=checked.source,
                                    errors=errors) from exc
        # From here nothing can fail: the rest is assignments.
        updates = {name: getattr(new, name) for name in applied if name in RELOADABLE}
        self.current = old.model_copy(update=updates)
        self.arbiter.config = self.current
        if "roles" in applied:
            self.roles.current = new.roles
            self.admission_roles(new.roles)
        if "webhooks" in applied:
            self.outbox.configure(checked.endpoints)
            self.webhook_worker.start()  # no-op when it runs; the first endpoint starts it
            self.outbox.wake.set()
        self.endpoints = list(checked.endpoints)
        if "webhook_delivery" in applied:
            self.webhook_worker.delivery = new.webhook_delivery
        if "drill" in applied:
            self.drills.config = new.drill
            await self._restart_drill_schedule()
        self.profiles = dict(checked.profiles)
        self.secrets = dict(checked.secrets)

        # Running gateway runs get changed routes and secrets now (a run the new profile
        # cannot serve keeps what it had, and the row says why).
        regranted: list[dict[str, Any]] = []
        if self.egress is not None and (profiles or secrets):
            regranted = await self.egress.regrant(set(profiles), set(secrets))

        changed = (applied + [f"profile:{name}" for name in profiles]
                   + [f"secret:{ref}" for ref in secrets])
        result = {"outcome": "applied" if changed else "unchanged", "source": checked.source,
                  "changed": changed, "restart_required": restart_required,
                  "running": len(self.arbiter.live), "gateway_runs": regranted,
                  "warnings": warnings}
        self.audit.append(actor=label, verb="config_reload", scope="global", reason=reason,
                          outcome="ok", detail=result)
        log.warning("configuration reloaded from %s: %s%s", checked.source,
                    ", ".join(changed) or "no change",
                    f"; at the next restart: {', '.join(restart_required)}"
                    if restart_required else "")
        return result

    async def _move_metrics(self, listen: str) -> None:
        """Stop the old endpoint, then start the new one; if the new one cannot start, the
        old one comes back (same address as before, so it can) and the reload is refused."""
        old = self.metrics_endpoint
        if old is not None:
            await old.stop()
        try:
            self.metrics_endpoint = await self.start_metrics(listen)
        except SupervisorError:
            self.metrics_endpoint = await self.start_metrics(self.current.metrics.listen)
            raise

    async def _restart_drill_schedule(self) -> None:
        self.drill_schedule.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.drill_schedule
        self.drill_schedule = asyncio.create_task(self.drills.schedule())

    async def stop(self) -> None:
        self.drill_schedule.cancel()
        for task in list(self._signalled):
            task.cancel()


def parent_change_warning(source: str, old: Config, new: Config,
                          running: int) -> dict[str, str]:
    """A [sandbox] cgroup_parent change is no ordinary restart-time change: the next daemon
    cannot adopt runs that live under the old parent (daemon/handover.py), so the restart
    kills every agent, and the old parent's cgroups stay behind (runbook)."""
    return {"path": source, "key": "sandbox.cgroup_parent", "reason": (
        f"changed from {old.sandbox.cgroup_parent!r} to {new.sandbox.cgroup_parent!r}: the "
        f"next restart does not adopt the running agents ({running} now), their handover is "
        f"refused and they are killed; stop them first, or set it back before restarting. "
        f"The old parent's cgroups stay until removed (runbook, \"Changing cgroup_parent\")")}


def nested_parent_error(source: str, old: Config, new: Config) -> dict[str, str]:
    """A new [sandbox] cgroup_parent inside or above the running one: after the restart the
    old watchdog (whose runs are not adopted) kills all of its parent, and one daemon's halt
    would kill the other's runs."""
    return {"path": source, "key": "sandbox.cgroup_parent", "reason": (
        f"{new.sandbox.cgroup_parent!r} and the running parent {old.sandbox.cgroup_parent!r} "
        f"lie one inside the other: at the restart the old parent's watchdog would kill the "
        f"new daemon's runs with its own; name a cgroup beside it, e.g. /agent-supervisor-2")}


def _summary(errors: list[dict[str, str]]) -> str:
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"configuration refused: {first['path']}: {first['key'] or '-'}: {first['reason']}{more}"
