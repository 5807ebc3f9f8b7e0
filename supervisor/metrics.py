"""Prometheus metrics of the daemon, served on their own small aiohttp app inside the daemon's
event loop: on a loopback TCP port or a Unix socket (`[metrics] listen`). Runs in the daemon
(root) but needs no privilege of its own beyond binding that address.

Nothing here sits on the kill path. Counters and the time_to_halt histogram move from audit
entries (an audit subscriber that never raises, so a metrics bug cannot roll back an audit row);
everything else is read from the arbiter's state at scrape time. Each daemon has its own
CollectorRegistry, never the process-wide default one."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import re
import socket
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from supervisor.api.server import bind_control_socket
from supervisor.audit import AuditLog
from supervisor.errors import ConfigInvalid
from supervisor.metrics_web import BasicAuth, WebConfig, load_web_config
from supervisor.models import AuditEntry
from supervisor.states import AgentState
from supervisor.telemetry import SyscallAttempt

log = logging.getLogger(__name__)

PREFIX = "agent_supervisor"
# time_to_halt spans ~1 ms (an idle cgroup) to the kill confirm timeout (5 s by default) and the
# escalation after it; a bucket past 10 s would only say "escalated twice".
HALT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Audit verbs whose time_to_halt_ms is a kill's (label value: the verb). "kill_confirmed" is the
# late confirmation of an unconfirmed kill, whose own row carries no confirmed time.
_HALT_VERBS = {"kill": "kill", "kill_confirmed": "kill", "shutdown": "shutdown",
               "watchdog_kill": "watchdog_kill"}

BacklogFn = Callable[[], int]
OutputTotalsFn = Callable[[], tuple[int, int]]  # bytes produced, recorded
APPROVAL_OUTCOMES = ("approved", "denied", "expired", "cancelled")
_LABEL = re.compile(r"[a-z0-9_.:-]{1,64}")


def _bounded(value: object) -> str:
    """A label value from an audit row's code-like field (a metric name, a syscall, an error
    code), or "other": never free text, never longer than 64 characters."""
    text = str(value)
    return text if _LABEL.fullmatch(text) else "other"


def _count(usage: dict[str, object], key: str) -> float:
    value = usage.get(key)
    return float(value) if isinstance(value, int | float) and value > 0 else 0.0


class AgentLike(Protocol):
    @property
    def state(self) -> str: ...
    @property
    def agent_class(self) -> str: ...


class AttemptObserversLike(Protocol):
    """The seccomp listener's observers (sandbox/seccomp_notify.py AttemptObservers): the
    metrics take their named place while they serve."""

    metrics: Callable[[SyscallAttempt], None] | None


class SeccompSource(Protocol):
    """The seccomp listener, as far as the metrics use it (attempts arrive on the loop)."""

    @property
    def observers(self) -> AttemptObserversLike: ...


class Observed(Protocol):
    """What the metrics read of the daemon's arbiter (the daemon layer sits above this one)."""

    @property
    def agents(self) -> Mapping[str, AgentLike]: ...
    @property
    def global_halt(self) -> bool: ...
    def active_runs(self) -> int: ...


def scope_kind(scope: str) -> str:
    """'agent:x' -> agent, 'class:web' -> class, 'global' -> global ('api': refused before the
    request's scope was read)."""
    return scope.partition(":")[0] or "unknown"


_SYSTEM_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def actor_kind(actor: str) -> str:
    """A bounded label for who acted: "operator" for any person (user names are unbounded and
    personal: they stay in the audit log), "system:NAME" for the daemon's own parts."""
    kind, sep, name = actor.partition(":")
    if kind == "system" and sep and _SYSTEM_NAME.fullmatch(name):
        return actor
    return "system" if kind == "system" else "operator"


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class Metrics(Collector):
    """The daemon's metrics: a registry of its own, fed by the audit log and the arbiter."""

    def __init__(self, observed: Observed, audit: AuditLog | None, version: str,
                 backlog: BacklogFn | None = None, breakers: BacklogFn | None = None,
                 outputs: OutputTotalsFn | None = None) -> None:
        self.observed = observed
        self.version = version
        self.backlog = backlog
        self.breakers = breakers
        self.outputs = outputs
        self.registry = CollectorRegistry(auto_describe=True)
        counter = self._counter
        self.kills = counter(
            "kills", "Agents the kill verb was applied to (a class or global kill counts each "
            "agent), by the scope kind of the command, the kind of actor (operator, or "
            "system:NAME for the daemon's own parts) and the outcome (ok, unconfirmed, refused)",
            ["scope", "actor_kind", "outcome"])
        self.time_to_halt = Histogram(
            f"{PREFIX}_time_to_halt_seconds", "Kill path duration from marking the agent killed "
            "to its network teardown, as audited (verb: kill, shutdown, watchdog_kill)",
            ["verb"], buckets=HALT_BUCKETS, registry=self.registry)
        self.drills = counter("drills", "Completed kill drills by result", ["result"],
                              preset=("pass", "fail"))
        self.gateway_exits = counter(
            "gateway_exits", "Times the egress gateway's process died or was killed and was "
            "replaced (audited as gateway_exited)")
        self.mcp_calls = counter(
            "mcp_calls", "MCP gateway decisions (audited as mcp_call), by server and outcome "
            "(allowed, denied, held, approved)", ["server", "outcome"])
        self.pauses = counter(
            "pauses", "Agents paused (a class or global pause counts each agent), by the scope "
            "kind of the command and the kind of actor", ["scope", "actor_kind"])
        self.tripwire_firings = counter(
            "tripwire_firings", "Tripwire firings by the metric that crossed its threshold and "
            "the action taken (log, pause, kill)", ["metric", "action"])
        self.output_truncations = counter(
            "output_truncations", "Runs whose output passed its cap: the rest was discarded "
            "(and counted)")
        self.approvals_requested = counter(
            "approvals_requested", "Egress requests held for an operator's decision")
        self.approvals_decided = counter(
            "approvals_decided", "Held egress requests decided, by outcome (approved, denied, "
            "expired, cancelled)", ["outcome"], preset=APPROVAL_OUTCOMES)
        self.approvals_pending = 0
        self.gateway_requests = counter(
            "gateway_requests", "Egress gateway requests of ended runs, by decision "
            "(forwarded, denied); counted when the run ends", ["decision"],
            preset=("forwarded", "denied"))
        self.gateway_bytes = counter(
            "gateway_bytes", "Bytes through the egress gateway of ended runs (requests and "
            "responses)")
        self.gateway_spend = counter(
            "gateway_spend", "Spend the egress gateway accounted to ended runs, in the routes' "
            "currency units")
        self.gateway_refusals = counter(
            "gateway_refusals", "Egress requests the gateway refused, by error code, as audited "
            "(at most 50 rows per run: the run's egress_summary has the rest)", ["code"])
        self.seccomp_attempts = counter(
            "seccomp_attempts", "Notified syscalls (answered EPERM), by syscall", ["syscall"])
        self.mcp_cost = counter(
            "mcp_cost", "Cost of the MCP tool calls the gateway let through (the tools' `cost` "
            "in the profile), added as each run ends (egress_summary)")
        self.audit_rows = audit.count() if audit is not None else 0
        self.audit = audit
        self.registry.register(self)
        if audit is not None:
            audit.subscribe(self._on_audit)

    def _counter(self, name: str, doc: str, labels: Sequence[str] = (), *,
                 preset: Iterable[str] = ()) -> Counter:
        """A counter in this registry; a one-label counter shows each `preset` value (at 0)
        from the first scrape."""
        made = Counter(f"{PREFIX}_{name}", doc, list(labels), registry=self.registry)
        for value in preset:
            made.labels(value)
        return made

    # ------------------------------------------------------------------ from the audit log

    def _on_audit(self, _db: sqlite3.Connection, entry: AuditEntry) -> None:
        # Runs on the loop once the row is committed; a metrics bug must not stop the others.
        try:
            self.observe(entry)
        except Exception:
            log.exception("metrics: audit entry %s not counted", entry.seq)

    def observe(self, entry: AuditEntry) -> None:
        """Count one audit entry."""
        self.audit_rows = max(self.audit_rows, entry.seq)
        if entry.verb == "kill":
            outcome = entry.outcome.partition(":")[0]
            self.kills.labels(scope=scope_kind(entry.scope), actor_kind=actor_kind(entry.actor),
                              outcome=outcome).inc()
        halt_verb = _HALT_VERBS.get(entry.verb)
        if (halt_verb is not None and entry.time_to_halt_ms is not None
                and entry.outcome == "ok"):
            self.time_to_halt.labels(verb=halt_verb).observe(entry.time_to_halt_ms / 1000)
        if entry.verb == "pause" and entry.outcome == "ok":
            self.pauses.labels(scope=scope_kind(entry.scope),
                               actor_kind=actor_kind(entry.actor)).inc()
        if entry.verb == "tripwire":
            metric = _bounded(entry.detail.get("metric"))
            self.tripwire_firings.labels(metric=metric, action=_bounded(entry.outcome)).inc()
            if entry.detail.get("rule") == "output_cap":
                self.output_truncations.inc()
        if entry.verb == "approval_requested":
            self.approvals_requested.inc()
            self.approvals_pending += 1
        if entry.verb in ("approval_granted", "approval_denied"):
            outcome = entry.outcome if entry.outcome in APPROVAL_OUTCOMES else "other"
            self.approvals_decided.labels(outcome=outcome).inc()
            # Held requests live in memory only: every one is decided exactly once (a stop
            # cancels them), so requested - decided is what is held now.
            self.approvals_pending = max(0, self.approvals_pending - 1)
        if entry.verb == "egress_denied":
            code = entry.outcome.partition(":")[2]
            self.gateway_refusals.labels(code=_bounded(code)).inc()
        if entry.verb == "egress_summary" and isinstance(entry.detail.get("usage"), dict):
            usage = entry.detail["usage"]
            self.gateway_requests.labels(decision="forwarded").inc(_count(usage, "requests"))
            self.gateway_requests.labels(decision="denied").inc(_count(usage, "denied"))
            self.gateway_bytes.inc(_count(usage, "bytes"))
            self.gateway_spend.inc(_count(usage, "spend"))
        if entry.verb == "mcp_call":
            self.mcp_calls.labels(server=str(entry.detail.get("server", ""))[:64],
                                  outcome=entry.outcome.partition(":")[0]).inc()
        if entry.verb == "egress_summary" and isinstance(entry.detail.get("mcp"), dict):
            self._observe_mcp_summary(entry.detail["mcp"])
        if entry.verb == "gateway_exited":
            self.gateway_exits.inc()
        if entry.verb == "drill" and isinstance(entry.detail.get("passed"), bool):
            self.drills.labels(result="pass" if entry.detail["passed"] else "fail").inc()

    def on_seccomp_attempt(self, attempt: SyscallAttempt) -> None:
        """A (coalesced) notified syscall: the listener's subscriber, on the loop."""
        self.seccomp_attempts.labels(syscall=_bounded(attempt.syscall)).inc(
            max(1, attempt.count))

    def _observe_mcp_summary(self, mcp: dict[str, Any]) -> None:
        """A run's MCP totals: its cost, and the decisions past its audit cap (counted in
        mcp_calls with server "", since the summary keeps only their outcomes)."""
        cost = mcp.get("cost")
        if isinstance(cost, int | float) and math.isfinite(cost) and cost > 0:
            self.mcp_cost.inc(cost)
        excess = mcp.get("unrecorded_by_outcome")
        for key, count in (excess.items() if isinstance(excess, dict) else ()):
            if isinstance(count, int) and count > 0:
                self.mcp_calls.labels(server="", outcome=str(key).partition(":")[0][:16]
                                      ).inc(count)

    # ------------------------------------------------------------------ read at scrape time

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily | InfoMetricFamily]:
        by_class: dict[str, dict[str, int]] = {}
        for agent in self.observed.agents.values():
            counts = by_class.setdefault(agent.agent_class, {s.value: 0 for s in AgentState})
            counts[agent.state] = counts.get(agent.state, 0) + 1
        agents = GaugeMetricFamily(f"{PREFIX}_agents", "Registered agents by state and class",
                                   labels=["state", "class"])
        for agent_class, counts in sorted(by_class.items()):
            for state, count in sorted(counts.items()):
                agents.add_metric([state, agent_class], count)
        yield agents
        yield _gauge("active_runs", "Runs the daemon tracks (live or being killed)",
                     self.observed.active_runs())
        yield _gauge("global_halt", "1 while a global halt blocks new runs",
                     1 if self.observed.global_halt else 0)
        yield _gauge("audit_rows", "Rows in the hash-chained audit log", self.audit_rows)
        if self.audit is not None:
            alarms = GaugeMetricFamily(
                f"{PREFIX}_audit_alarm", "1 while the audit log has this problem (chain, "
                "write_error, store_error, disk_reserve, checkpoint_error, dropped)",
                labels=["kind"])
            active = self.audit.alarms.as_dict()
            for kind in ("chain_problem", "write_error", "store_error", "disk_reserve",
                         "checkpoint_error", "dropped"):
                alarms.add_metric([kind.removesuffix("_problem")], 1 if kind in active else 0)
            yield alarms
        yield _gauge("approvals_pending", "Egress requests held now, waiting for an "
                     "operator's decision", self.approvals_pending)
        yield _gauge("webhook_backlog", "Webhook events in the outbox not yet delivered",
                     self._read(self.backlog, "webhook backlog"))
        yield _gauge("gateway_breakers_open", "Egress gateway runs whose circuit breaker is "
                     "open now (their requests are refused until 'agentctl breaker reset')",
                     self._read(self.breakers, "open breakers"))
        yield from self._output_bytes()
        info = InfoMetricFamily(f"{PREFIX}_build", "The daemon's version")
        info.add_metric([], {"version": self.version})
        yield info

    def _output_bytes(self) -> Iterable[CounterMetricFamily]:
        if self.outputs is None:
            return
        try:
            produced, recorded = self.outputs()
        except Exception:
            # A counter that cannot be read is left out of this scrape: a 0 would read as a
            # reset. The log says why.
            log.exception("metrics: output byte counts unavailable")
            return
        yield CounterMetricFamily(f"{PREFIX}_output_bytes", "Bytes agents wrote to their stdout "
                                  "and stderr since the daemon started, those past a run's "
                                  "output cap included", value=produced)
        yield CounterMetricFamily(f"{PREFIX}_output_recorded_bytes", "Of those bytes, the ones "
                                  "kept in the runs' log files (up to each run's output cap)",
                                  value=recorded)

    @staticmethod
    def _read(count: BacklogFn | None, what: str) -> int:
        if count is None:
            return 0
        try:
            return count()
        except Exception:
            # A scrape must not fail because one count could not be read; the log says why.
            log.exception("metrics: %s unavailable", what)
            return 0

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------------- the endpoint


@dataclass(frozen=True)
class ListenAddress:
    text: str
    host: str = ""
    port: int = 0
    path: Path | None = None


def parse_listen(listen: str, web: WebConfig | None = None) -> ListenAddress | None:
    """`[metrics] listen`: "HOST:PORT" ("[::1]:PORT" for IPv6), "unix:/path", or "" (disabled,
    None). A host beyond loopback only with a web config that sets TLS or basic auth
    (`[metrics] web_config_file`): the metrics name every agent, so nobody off the host reads
    them unchecked. Anything else is a ConfigInvalid."""
    listen = listen.strip()
    if not listen:
        return None

    def invalid(why: str) -> ConfigInvalid:
        return ConfigInvalid(f"[metrics] listen = {listen!r}: {why}", key="metrics.listen",
                             value=listen, reason=why)

    if listen.startswith("unix:"):
        path = Path(listen.removeprefix("unix:"))
        if not path.is_absolute():
            raise invalid("a Unix socket path must be absolute (unix:/run/...)")
        return ListenAddress(text=listen, path=path)
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise invalid('expected "HOST:PORT" on loopback, "unix:/path" or "" to disable')
    host = host.removeprefix("[").removesuffix("]")
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise invalid(f"cannot resolve {host!r}: {exc.strerror}") from None
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not all(a.is_loopback for a in addresses) and (web is None or not web.protected):
        raise invalid("an address beyond loopback (127.0.0.0/8, ::1) needs [metrics] "
                      "web_config_file with tls_server_config and/or basic_auth_users: the "
                      "metrics name every agent")
    return ListenAddress(text=listen, host=host, port=int(port_text))


class MetricsEndpoint:
    """GET /metrics on its own aiohttp runner, in the caller's event loop."""

    def __init__(self, metrics: Metrics, address: ListenAddress, socket_gid: int = -1,
                 web_config: WebConfig | None = None,
                 seccomp: SeccompSource | None = None) -> None:
        self.metrics = metrics
        self.seccomp = seccomp
        self.address = address
        self.socket_gid = socket_gid
        self.web_config = web_config
        middlewares = ([BasicAuth(web_config.users).middleware]
                       if web_config is not None and web_config.users else [])
        app = web.Application(middlewares=middlewares)
        app.router.add_get("/metrics", self._serve)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)

    async def _serve(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        await self._runner.setup()
        site: web.BaseSite
        try:
            if self.address.path is not None:
                # Created 0660 root:<socket group> and moved into place, like the control socket.
                sock = bind_control_socket(self.address.path, self.socket_gid)
                site = web.SockSite(self._runner, sock)
            else:
                tls = (self.web_config.ssl_context()
                       if self.web_config is not None and self.web_config.tls else None)
                site = web.TCPSite(self._runner, self.address.host, self.address.port,
                                   ssl_context=tls)
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            why = exc.strerror or str(exc)
            raise ConfigInvalid(
                f"cannot serve metrics on {self.address.text}: {why} (set [metrics] listen to "
                f'another address, or to "" to disable the endpoint)',
                key="metrics.listen", value=self.address.text, reason=why) from None
        if self.seccomp is not None:
            self.seccomp.observers.metrics = self.metrics.on_seccomp_attempt
        log.info("metrics on %s", ", ".join(self.bound))

    @property
    def bound(self) -> list[str]:
        """The addresses actually listened on, as "HOST:PORT" or "unix:/path" (a port 0 shows
        its real number here)."""
        bound = []
        for address in self._runner.addresses:
            if isinstance(address, tuple):
                host, port = address[0], address[1]
                bound.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            else:
                bound.append(f"unix:{address}")
        return bound

    async def stop(self) -> None:
        if self.seccomp is not None:
            self.seccomp.observers.metrics = None
        await self._runner.cleanup()
        if self.address.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.address.path.unlink()


def check_endpoint(listen: str, web_config_file: Path | None
                   ) -> tuple[ListenAddress | None, WebConfig | None]:
    """`[metrics] listen` and `web_config_file` judged together (config check and start):
    the web config is read and its TLS files loaded; raises ConfigInvalid."""
    web_config = load_web_config(web_config_file) if web_config_file is not None else None
    return parse_listen(listen, web_config), web_config


async def start_metrics(observed: Observed, audit: AuditLog, listen: str, version: str,
                        backlog: BacklogFn | None = None, socket_gid: int = -1,
                        web_config_file: Path | None = None,
                        seccomp: SeccompSource | None = None,
                        breakers: BacklogFn | None = None,
                        outputs: OutputTotalsFn | None = None) -> MetricsEndpoint | None:
    """The daemon's metrics endpoint, already serving; None when `listen` is empty. Raises
    ConfigInvalid naming the address when it is not allowed or cannot be bound."""
    address, web_config = check_endpoint(listen, web_config_file)
    if address is None:
        return None
    endpoint = MetricsEndpoint(Metrics(observed, audit, version, backlog, breakers, outputs),
                               address, socket_gid, web_config, seccomp)
    await endpoint.start()
    return endpoint
