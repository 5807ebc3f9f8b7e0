"""The console's gate (token, sessions, Host and Origin) and its bounded event streams, without
a browser or a daemon. No privilege."""

from __future__ import annotations

import asyncio

from supervisor.console.guard import MAX_SESSIONS, Gate
from supervisor.console.live import Live, Stream
from supervisor.console.upstream import Upstream


def bound_gate(port: int = 8123) -> Gate:
    gate = Gate("127.0.0.1", token="t0ken")
    gate.bind(port)
    return gate


def test_the_token_buys_one_session_once() -> None:
    gate = bound_gate()
    assert gate.exchange("wrong") is None
    session = gate.exchange("t0ken")
    assert session and gate.has_session(session)
    assert gate.exchange("t0ken") is None, "spent"
    assert not gate.has_session(None) and not gate.has_session("") and not gate.has_session("x")


def test_sessions_are_capped_oldest_first() -> None:
    gate = bound_gate()
    first = gate.exchange("t0ken")
    later = [gate.new_session() for _ in range(MAX_SESSIONS)]
    assert not gate.has_session(first)
    assert all(gate.has_session(s) for s in later)


def test_only_the_consoles_own_host_names() -> None:
    gate = bound_gate(8123)
    assert gate.host_ok("127.0.0.1:8123") and gate.host_ok("localhost:8123")
    assert gate.host_ok("LOCALHOST:8123")
    for host in (None, "127.0.0.1", "127.0.0.1:8124", "evil.example:8123", "localhost",
                 "127.0.0.1:8123.evil.example", "[::1]:8123"):
        assert not gate.host_ok(host), host
    assert gate.cookie == "agent_supervisor_console_8123"


def test_nothing_passes_before_the_port_is_known() -> None:
    gate = Gate("127.0.0.1", token="t0ken")
    assert not gate.host_ok("127.0.0.1:0")
    assert not gate.origin_ok("POST", {"Origin": "http://127.0.0.1:0"})


def test_state_changes_need_the_consoles_origin() -> None:
    gate = bound_gate(8123)
    own = "http://127.0.0.1:8123"
    assert gate.origin_ok("POST", {"Origin": own, "Sec-Fetch-Site": "same-origin"})
    assert gate.origin_ok("POST", {"Origin": "http://localhost:8123"})
    assert not gate.origin_ok("POST", {}), "a POST must say where it comes from"
    for origin in ("http://evil.example", "http://127.0.0.1:8124", "https://127.0.0.1:8123",
                   "null", "http://127.0.0.1:8123.evil.example"):
        assert not gate.origin_ok("POST", {"Origin": origin}), origin
        assert not gate.origin_ok("GET", {"Origin": origin}), origin
    assert gate.origin_ok("GET", {})
    assert gate.origin_ok("GET", {"Sec-Fetch-Site": "none"}), "typed into the address bar"
    assert not gate.origin_ok("GET", {"Sec-Fetch-Site": "cross-site"})
    assert not gate.origin_ok("POST", {"Origin": own, "Sec-Fetch-Site": "same-site"})


def test_a_stream_that_falls_behind_is_told_to_start_over() -> None:
    stream = Stream(3)
    assert all(stream.offer(("agents", str(i))) for i in range(3))
    assert not stream.offer(("agents", "3"))
    assert stream.queue.qsize() == 1 and stream.queue.get_nowait() is None


def test_live_streams_are_capped_and_dropped_when_full() -> None:
    async def scenario() -> None:
        live = Live(Upstream("/nonexistent.sock"), max_streams=2, queue_size=8)
        first, second = live.subscribe(), live.subscribe()
        assert first is not None and second is not None
        assert live.subscribe() is None, "capped"
        assert first.queue.qsize() == 4, "a new stream starts with the snapshot"
        for i in range(8):
            live._publish("agents", {"agents": [], "n": i})
        assert not live.streams, "both fell behind and were dropped"
        assert live.subscribe() is not None, "which frees their slots"
        live.close()
        assert not live.streams

    asyncio.run(scenario())


def test_an_unchanged_state_is_not_sent_again() -> None:
    async def scenario() -> None:
        live = Live(Upstream("/nonexistent.sock"), queue_size=16)
        stream = live.subscribe()
        assert stream is not None
        before = stream.queue.qsize()
        live._publish("agents", {"agents": [1]})
        live._publish("agents", {"agents": [1]})
        live._publish("agents", {"agents": [2]})
        assert stream.queue.qsize() == before + 2

    asyncio.run(scenario())


def test_a_missing_daemon_is_a_structured_error() -> None:
    async def scenario() -> None:
        upstream = Upstream("/nonexistent/control.sock")
        await upstream.start()
        try:
            reply = await upstream.call("GET", "/v1/health")
        finally:
            await upstream.close()
        assert reply.status == 503
        assert reply.body["error"]["code"] == "daemon_unavailable"
        assert reply.body["error"]["detail"]["hint"]

    asyncio.run(scenario())


def test_the_fleet_view_names_the_credentials_it_lacks() -> None:
    from click.testing import CliRunner

    from supervisor.cli.main import cli

    env = {k: "" for k in ("AGENT_SUPERVISOR_FLEET_ENDPOINTS", "AGENT_SUPERVISOR_FLEET_CA",
                           "AGENT_SUPERVISOR_FLEET_CERT", "AGENT_SUPERVISOR_FLEET_KEY",
                           "AGENT_SUPERVISOR_FLEET_USER",
                           "AGENT_SUPERVISOR_FLEET_PASSWORD_FILE")}
    env["AGENT_SUPERVISOR_FLEET_ENDPOINTS"] = "etcd.example:2379"
    result = CliRunner().invoke(cli, ["console", "--fleet"], env=env)
    assert result.exit_code == 2
    assert "AGENT_SUPERVISOR_FLEET_CA" in result.output
    assert "AGENT_SUPERVISOR_FLEET_ENDPOINTS" not in result.output.split("needs", 1)[1]
