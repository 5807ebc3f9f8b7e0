"""The daemon's Prometheus metrics (supervisor/metrics.py): the exposition parses, counters and
the time_to_halt histogram move on audit entries, gauges read the arbiter at scrape time, the
listen address is checked and served in an event loop. No root (Unix-socket serving, which
chowns the socket to root, is covered by tests/e2e/test_metrics.py)."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.audit import AuditLog
from supervisor.errors import ConfigInvalid
from supervisor.metrics import (
    HALT_BUCKETS,
    Metrics,
    MetricsEndpoint,
    actor_kind,
    parse_listen,
    start_metrics,
)
from supervisor.models import ActionRequest, RunRequest, Scope
from tests.unit.conftest import ALICE, ArbiterEnv

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class FakeAgent:
    state: str
    agent_class: str


@dataclass
class FakeArbiter:
    agents: dict[str, FakeAgent] = field(default_factory=dict)
    global_halt: bool = False
    runs: int = 0

    def active_runs(self) -> int:
        return self.runs


def scrape(metrics: Metrics) -> Samples:
    """Every sample of the exposition, parsed the way Prometheus parses it."""
    text = metrics.exposition().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def kill_entry(audit: AuditLog, scope: str, actor: str = "alice(uid=1000)",
               time_to_halt_ms: float | None = 12.5, outcome: str = "ok",
               verb: str = "kill") -> None:
    audit.append(actor=actor, verb=verb, scope=scope, target="a1", reason="test",
                 previous_state="active", new_state="killed", time_to_halt_ms=time_to_halt_ms,
                 outcome=outcome)


def test_the_exposition_parses_and_names_every_family(env: ArbiterEnv) -> None:
    observed = FakeArbiter(agents={"a1": FakeAgent("active", "web"),
                                   "a2": FakeAgent("paused", "web"),
                                   "b1": FakeAgent("killed", "batch")}, runs=2)
    metrics = Metrics(observed, env.audit, "9.9.9", backlog=lambda: 7)
    families = {f.name: f for f in
                text_string_to_metric_families(metrics.exposition().decode())}
    expected = {"agents": "gauge", "active_runs": "gauge", "global_halt": "gauge",
                "audit_rows": "gauge", "webhook_backlog": "gauge", "build_info": "gauge",
                "kills": "counter", "drills": "counter", "time_to_halt_seconds": "histogram"}
    for name, kind in expected.items():
        family = families[f"agent_supervisor_{name}"]
        assert family.type == kind, name
        assert family.documentation, name
    samples = scrape(metrics)
    assert value(samples, "agent_supervisor_agents", state="active", **{"class": "web"}) == 1
    assert value(samples, "agent_supervisor_agents", state="paused", **{"class": "web"}) == 1
    assert value(samples, "agent_supervisor_agents", state="killed", **{"class": "web"}) == 0
    assert value(samples, "agent_supervisor_agents", state="killed", **{"class": "batch"}) == 1
    assert value(samples, "agent_supervisor_agents", state="idle", **{"class": "batch"}) == 0
    assert value(samples, "agent_supervisor_active_runs") == 2
    assert value(samples, "agent_supervisor_global_halt") == 0
    assert value(samples, "agent_supervisor_webhook_backlog") == 7
    assert value(samples, "agent_supervisor_build_info", version="9.9.9") == 1
    assert value(samples, "agent_supervisor_drills_total", result="pass") == 0
    assert value(samples, "agent_supervisor_drills_total", result="fail") == 0


def test_gauges_are_read_at_scrape_time(env: ArbiterEnv) -> None:
    observed = FakeArbiter()
    metrics = Metrics(observed, env.audit, "1")
    assert not any(name == "agent_supervisor_agents" for name, _ in scrape(metrics))
    assert value(scrape(metrics), "agent_supervisor_webhook_backlog") == 0  # no outbox
    observed.agents["a1"] = FakeAgent("active", "default")
    observed.global_halt = True
    observed.runs = 1
    samples = scrape(metrics)
    assert value(samples, "agent_supervisor_agents", state="active", **{"class": "default"}) == 1
    assert value(samples, "agent_supervisor_global_halt") == 1
    assert value(samples, "agent_supervisor_active_runs") == 1


def test_kill_counters_and_time_to_halt_move_on_audit_entries(env: ArbiterEnv) -> None:
    metrics = Metrics(FakeArbiter(), env.audit, "1")
    kill_entry(env.audit, "agent:a1", time_to_halt_ms=3.0)
    kill_entry(env.audit, "class:web", time_to_halt_ms=40.0)
    kill_entry(env.audit, "class:web", time_to_halt_ms=None)  # an idle agent: nothing to halt
    kill_entry(env.audit, "global", actor="system:breakglass", time_to_halt_ms=700.0)
    kill_entry(env.audit, "agent:a1", time_to_halt_ms=5000.0, outcome="unconfirmed")
    kill_entry(env.audit, "agent:a1", time_to_halt_ms=None, outcome="refused:illegal_transition")
    kill_entry(env.audit, "agent:a1", verb="kill_confirmed", time_to_halt_ms=6000.0)
    kill_entry(env.audit, "global", verb="shutdown", actor="system:supervisor",
               time_to_halt_ms=2.0)
    kill_entry(env.audit, "agent:a1", verb="pause", time_to_halt_ms=None)
    samples = scrape(metrics)
    kills = "agent_supervisor_kills_total"
    person = "operator"  # alice(uid=1000): no user names in labels
    assert value(samples, kills, scope="agent", actor_kind=person, outcome="ok") == 1
    assert value(samples, kills, scope="agent", actor_kind=person, outcome="unconfirmed") == 1
    assert value(samples, kills, scope="agent", actor_kind=person, outcome="refused") == 1
    assert value(samples, kills, scope="class", actor_kind=person, outcome="ok") == 2
    assert value(samples, kills, scope="global", actor_kind="system:breakglass",
                 outcome="ok") == 1
    assert not any("alice" in str(labels) for (_name, labels) in samples)
    assert sum(v for (name, _), v in samples.items() if name == kills) == 6

    halt = "agent_supervisor_time_to_halt_seconds"
    # Confirmed kills only: 3 ms, 40 ms, 700 ms and the late confirmation after 6 s.
    assert value(samples, f"{halt}_count", verb="kill") == 4
    assert value(samples, f"{halt}_sum", verb="kill") == pytest.approx(6.743)
    assert value(samples, f"{halt}_bucket", verb="kill", le="0.005") == 1
    assert value(samples, f"{halt}_bucket", verb="kill", le="0.05") == 2
    assert value(samples, f"{halt}_bucket", verb="kill", le="1.0") == 3
    assert value(samples, f"{halt}_bucket", verb="kill", le="10.0") == 4
    assert value(samples, f"{halt}_count", verb="shutdown") == 1
    assert HALT_BUCKETS[0] == 0.001 and HALT_BUCKETS[-1] == 10.0


def test_drill_results_are_counted_by_outcome(env: ArbiterEnv) -> None:
    metrics = Metrics(FakeArbiter(), env.audit, "1")
    for passed in (True, True, False):
        env.audit.append(actor="system:drill", verb="drill", scope="agent:drill-x",
                         outcome="ok" if passed else "failed", detail={"passed": passed})
    env.audit.append(actor="system:drill", verb="drill", scope="agent:drill-y",
                     outcome="failed", detail={"error": "no passed key"})
    samples = scrape(metrics)
    assert value(samples, "agent_supervisor_drills_total", result="pass") == 2
    assert value(samples, "agent_supervisor_drills_total", result="fail") == 1


def test_gateway_worker_exits_are_counted(env: ArbiterEnv) -> None:
    metrics = Metrics(FakeArbiter(), env.audit, "1")
    assert value(scrape(metrics), "agent_supervisor_gateway_exits_total") == 0
    for _ in range(2):
        env.audit.append(actor="system:supervisor", verb="gateway_exited", scope="global",
                         target="egress-gateway", outcome="restarting")
    env.audit.append(actor="system:supervisor", verb="reap", scope="global")
    assert value(scrape(metrics), "agent_supervisor_gateway_exits_total") == 2


def test_audit_rows_start_from_the_log_and_follow_it(env: ArbiterEnv) -> None:
    for _ in range(3):
        env.audit.append(actor="system", verb="daemon_start", scope="global")
    metrics = Metrics(FakeArbiter(), env.audit, "1")
    assert value(scrape(metrics), "agent_supervisor_audit_rows") == 3
    env.audit.append(actor="system", verb="self_test", scope="global")
    env.audit.append(actor="system", verb="self_test", scope="global")
    assert value(scrape(metrics), "agent_supervisor_audit_rows") == env.audit.count() == 5


def test_a_metrics_failure_never_rolls_back_an_audit_row(env: ArbiterEnv,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = Metrics(FakeArbiter(), env.audit, "1")

    def broken(_entry: Any) -> None:
        raise RuntimeError("metrics bug")

    monkeypatch.setattr(metrics, "observe", broken)
    entry = env.audit.append(actor="alice", verb="kill", scope="agent:a1")
    assert env.audit.list(limit=1)[0].hash == entry.hash


def test_a_failing_backlog_reads_as_zero(env: ArbiterEnv) -> None:
    def backlog() -> int:
        raise OSError("outbox unreadable")

    metrics = Metrics(FakeArbiter(), env.audit, "1", backlog=backlog)
    assert value(scrape(metrics), "agent_supervisor_webhook_backlog") == 0


def test_several_daemons_in_one_process_have_separate_registries(env: ArbiterEnv) -> None:
    first = Metrics(FakeArbiter(), env.audit, "1")
    second = Metrics(FakeArbiter(), None, "2")
    kill_entry(env.audit, "agent:a1")
    assert sum(v for (n, _), v in scrape(first).items()
               if n == "agent_supervisor_kills_total") == 1
    assert not any(n == "agent_supervisor_kills_total" for n, _ in scrape(second))


def test_metrics_follow_the_real_arbiter(env: ArbiterEnv) -> None:
    async def body() -> None:
        arbiter = env.arbiter()
        metrics = Metrics(arbiter, env.audit, "1")
        for name, agent_class in (("w1", "web"), ("w2", "web"), ("b1", "batch")):
            await arbiter.launch(RunRequest.model_validate(
                {"name": name, "class": agent_class, "command": ["sleep", "1"]}), ALICE)
        await arbiter.act("pause", ActionRequest(scope=Scope(agent="b1")), ALICE)
        await arbiter.act("kill", ActionRequest(scope=Scope.model_validate({"class": "web"}),
                                                reason="bad push"), ALICE)
        samples = scrape(metrics)
        web, batch = {"class": "web"}, {"class": "batch"}
        assert value(samples, "agent_supervisor_agents", state="killed", **web) == 2
        assert value(samples, "agent_supervisor_agents", state="active", **web) == 0
        assert value(samples, "agent_supervisor_agents", state="paused", **batch) == 1
        assert value(samples, "agent_supervisor_active_runs") == 1
        assert value(samples, "agent_supervisor_kills_total", scope="class",
                     actor_kind="operator", outcome="ok") == 2
        assert value(samples, "agent_supervisor_time_to_halt_seconds_count", verb="kill") == 2
        assert value(samples, "agent_supervisor_audit_rows") == env.audit.count()
        await arbiter.act("kill", ActionRequest(scope=Scope(all=True)), ALICE)
        assert value(scrape(metrics), "agent_supervisor_global_halt") == 1
        await arbiter.shutdown("test over")

    asyncio.run(body())


# ----------------------------------------------------------------------------- the address


@pytest.mark.parametrize("listen", ["127.0.0.1:9464", "127.0.0.2:1", "[::1]:9464",
                                    "localhost:9464", " 127.0.0.1:0 "])
def test_loopback_addresses_are_accepted(listen: str) -> None:
    address = parse_listen(listen)
    assert address is not None and address.path is None
    assert address.host in ("127.0.0.1", "127.0.0.2", "::1", "localhost")


def test_an_empty_address_disables_and_unix_paths_must_be_absolute() -> None:
    assert parse_listen("") is None
    address = parse_listen("unix:/run/agent-supervisor/metrics.sock")
    assert address is not None and str(address.path) == "/run/agent-supervisor/metrics.sock"
    with pytest.raises(ConfigInvalid, match="absolute"):
        parse_listen("unix:metrics.sock")


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "192.0.2.10:9464", "[::]:9464",
                                    "[2001:db8::1]:9464"])
def test_a_non_loopback_address_is_refused(listen: str) -> None:
    with pytest.raises(ConfigInvalid) as info:
        parse_listen(listen)
    assert info.value.detail["key"] == "metrics.listen"
    assert listen in info.value.message and "loopback" in info.value.message


@pytest.mark.parametrize("listen", ["9464", "127.0.0.1", "127.0.0.1:port", "127.0.0.1:70000",
                                    ":9464", "http://127.0.0.1:9464"])
def test_a_malformed_address_is_refused(listen: str) -> None:
    with pytest.raises(ConfigInvalid, match="metrics"):
        parse_listen(listen)


# ----------------------------------------------------------------------------- serving


def _get(url: str) -> tuple[int, str, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    with opener.open(url, timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


def test_the_endpoint_serves_metrics_from_the_event_loop(env: ArbiterEnv) -> None:
    async def body() -> None:
        observed = FakeArbiter(agents={"a1": FakeAgent("active", "web")})
        endpoint = await start_metrics(observed, env.audit, "127.0.0.1:0", "1.2.3")
        assert endpoint is not None
        try:
            [bound] = endpoint.bound
            assert bound.startswith("127.0.0.1:") and not bound.endswith(":0")
            status, content_type, text = await asyncio.to_thread(
                _get, f"http://{bound}/metrics")
        finally:
            await endpoint.stop()
        assert status == 200
        assert content_type.startswith("text/plain; version=")
        names = {f.name for f in text_string_to_metric_families(text)}
        assert "agent_supervisor_agents" in names
        assert 'agent_supervisor_build_info{version="1.2.3"} 1.0' in text

    asyncio.run(body())


def test_disabled_metrics_serve_nothing(env: ArbiterEnv) -> None:
    assert asyncio.run(start_metrics(FakeArbiter(), env.audit, "", "1")) is None


def test_a_busy_port_is_a_clear_error_naming_the_address(env: ArbiterEnv) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        listen = f"127.0.0.1:{taken.getsockname()[1]}"

        async def body() -> None:
            address = parse_listen(listen)
            assert address is not None
            endpoint = MetricsEndpoint(Metrics(FakeArbiter(), env.audit, "1"), address)
            with pytest.raises(ConfigInvalid) as info:
                await endpoint.start()
            assert listen in info.value.message
            assert "in use" in info.value.message and "[metrics] listen" in info.value.message

        asyncio.run(body())


@pytest.mark.parametrize(("actor", "kind"), [
    ("alice(uid=1000)", "operator"), ("root(uid=0)", "operator"), ("", "operator"),
    ("break-glass(uid=0)", "operator"), ("system:tripwire", "system:tripwire"),
    ("system:" + "x" * 200, "system"), ("system:Evil Name", "system"), ("system:", "system"),
])
def test_the_actor_label_is_bounded(actor: str, kind: str) -> None:
    assert actor_kind(actor) == kind
