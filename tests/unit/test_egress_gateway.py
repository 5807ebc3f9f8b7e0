"""The egress gateway end to end on loopback: a real Gateway (its own thread and loop) in front of
real HTTPS upstreams (tests/support/upstream.py) whose names the gateway pins to 127.0.0.1, and
an agent played by raw sockets. The clock is injected; nothing sleeps for effect and no timing is
asserted (every wait is bounded by WAIT so a hang fails instead of stalling). No privilege.

The fake sink records every call and answers approvals from the test. Every refusal any test
receives is checked to carry the denial header and never the route's secret (see `call`)."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.config import EgressSection
from supervisor.egress.accounting import Usage
from supervisor.egress.gateway import DENIED_HEADER, Gateway, present_token
from supervisor.egress.grant import Carried, Decision, RunGrant, carried_from_wire, carried_to_wire
from supervisor.models.egress import GatewayPolicy
from tests.support import upstream as support
from tests.support.daemon import wait_for
from tests.support.upstream import Upstream, make_ca

WAIT = 10.0
SECRET = "sk-live-route-secret-9f8e7d6c5b4a"
TOKEN = "run-token-0123456789"
RUN = "run-1"
T0 = 1_000_000.0


# ----------------------------------------------------------------------------- plumbing


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Approval:
    run_id: str
    method: str
    host: str
    path: str
    rule: str
    future: concurrent.futures.Future[Decision]


class FakeSink:
    """Records every call (from the gateway's thread). `decide` answers approvals at once;
    when it is None the request is held until the test resolves `approvals[i].future`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.approvals: list[Approval] = []
        self.decide: Callable[[Approval], Decision] | None = None
        self._changed = threading.Condition()

    def _record(self, kind: str, run_id: str, detail: Any) -> None:
        with self._changed:
            self.calls.append((kind, run_id, detail))
            self._changed.notify_all()

    def budget_exceeded(self, run_id: str, detail: dict[str, Any]) -> None:
        self._record("budget_exceeded", run_id, detail)

    def breaker_tripped(self, run_id: str, detail: dict[str, Any]) -> None:
        self._record("breaker_tripped", run_id, detail)

    def denied(self, run_id: str, code: str, detail: dict[str, Any]) -> None:
        self._record("denied", run_id, {"code": code, **detail})

    def request_approval(self, run_id: str, method: str, host: str, path: str, rule: str
                         ) -> concurrent.futures.Future[Decision]:
        future: concurrent.futures.Future[Decision] = concurrent.futures.Future()
        approval = Approval(run_id, method, host, path, rule, future)
        if self.decide is not None:
            future.set_result(self.decide(approval))
        with self._changed:
            self.approvals.append(approval)
        self._record("request_approval", run_id, approval)
        return future

    def of(self, kind: str) -> list[Any]:
        with self._changed:
            return [detail for k, _, detail in self.calls if k == kind]

    def wait_for(self, predicate: Callable[[], bool]) -> None:
        with self._changed:
            assert self._changed.wait_for(predicate, WAIT), f"sink never saw it: {self.calls}"

    def denials(self) -> list[str]:
        return [d["code"] for d in self.of("denied")]


@dataclass
class Reply:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    @property
    def code(self) -> str | None:
        return self.headers.get(DENIED_HEADER.lower())

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = self.json()["error"]
        return error


def read_reply(reader: Any) -> Reply:
    """One HTTP/1.1 response from a file-like (`sock.makefile("rb")`)."""
    status_line = reader.readline()
    if not status_line:
        raise ConnectionError("the gateway closed the connection without answering")
    _version, status, reason = status_line.decode("latin1").rstrip("\r\n").split(" ", 2)
    headers: dict[str, str] = {}
    while (line := reader.readline().decode("latin1").rstrip("\r\n")):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while (size := int(reader.readline().split(b";")[0], 16)):
            chunks.append(read_exactly(reader, size))
            reader.readline()
        reader.readline()
        body = b"".join(chunks)
    elif "content-length" in headers:
        body = read_exactly(reader, int(headers["content-length"]))
    else:
        body = b"" if status == "200" and "Connection Established" in reason else reader.read()
    return Reply(int(status), reason, headers, body)


def read_exactly(reader: Any, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = reader.read(size - len(data))
        if not chunk:
            raise ConnectionError(f"the body ended after {len(data)} of {size} bytes")
        data += chunk
    return data


def check_refusal(reply: Reply) -> None:
    """Every refusal: the structured body, the denial header, and never the secret."""
    assert SECRET not in reply.body.decode(errors="replace")
    assert all(SECRET not in v for v in reply.headers.values())
    if reply.code is not None:
        error = reply.error()
        assert error["code"] == reply.code
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["detail"]["retry"], bool)


def basic(token: str, user: str = "agent") -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def connect_socket(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT)


def exchange(port: int, raw: bytes) -> Reply:
    """Send `raw` on a fresh connection and read one reply."""
    with connect_socket(port) as sock, sock.makefile("rb") as reader:
        sock.sendall(raw)
        reply = read_reply(reader)
    check_refusal(reply)
    return reply


def request_bytes(method: str, url: str, host: str, *, auth: str | None = None,
                  headers: Sequence[tuple[str, str]] = (), body: bytes = b"",
                  close: bool = True) -> bytes:
    lines = [f"{method} {url} HTTP/1.1", f"Host: {host}"]
    if auth is not None:
        lines.append(f"Proxy-Authorization: {auth}")
    lines += [f"{k}: {v}" for k, v in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def assert_cut(sock: socket.socket | ssl.SSLSocket) -> None:
    """The connection was closed or reset under the client: reading sees EOF or an error."""
    sock.settimeout(WAIT)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return
    except (ConnectionError, ssl.SSLError, OSError) as exc:
        assert not isinstance(exc, TimeoutError), "the connection was not cut"


@dataclass
class Env:
    gateway: Gateway
    sink: FakeSink
    clock: Clock
    upstream: Upstream
    ca: support.TestCA
    runs: dict[str, RunGrant] = field(default_factory=dict)

    def policy(self, **fields: Any) -> GatewayPolicy:
        """Routes `llm` (llm.route) and `pay` (pay.route) to the api upstream, and pkg/other
        upstream names on the allow-list, plus `fields`."""
        base: dict[str, Any] = {
            "allow": [f"pkg.upstream.test:{self.upstream.port}"],
            "routes": [
                {"name": "llm", "host": "llm.route", "secret": "env:LLM_KEY",
                 "upstream": f"https://api.upstream.test:{self.upstream.port}"},
                {"name": "pay", "host": "pay.route", "secret": "file:pay",
                 "upstream": f"https://api.upstream.test:{self.upstream.port}/base/",
                 "header": "X-Api-Key", "format": "{secret}"},
            ],
            "breaker": {"enabled": False},
        }
        base.update(fields)
        return GatewayPolicy.model_validate(base)

    def open(self, policy: GatewayPolicy | None = None, *, run_id: str = RUN,
             token: str = TOKEN, expires_at: float = T0 + 3600,
             agent_usage: Usage | None = None, carried: Carried | None = None) -> int:
        grant = RunGrant(run_id=run_id, agent="agent-a", token=token, expires_at=expires_at,
                         policy=policy or self.policy(), host_ip="127.0.0.1",
                         port=free_port(), secrets={"llm": SECRET, "pay": SECRET},
                         agent_usage=agent_usage or Usage())
        asyncio.run(self.gateway.open(grant, carried=carried))
        self.runs[run_id] = grant
        return grant.port

    def close(self, run_id: str = RUN) -> Usage | None:
        return asyncio.run(self.gateway.close(run_id))

    def get(self, port: int, path: str = "/v1/chat", *, host: str = "llm.route",
            method: str = "GET", auth: str | None = None,
            headers: Sequence[tuple[str, str]] = (), body: bytes = b"") -> Reply:
        return exchange(port, request_bytes(method, f"http://{host}{path}", host,
                                            auth=basic(TOKEN) if auth is None else auth,
                                            headers=headers, body=body))

    def tunnel(self, port: int, host: str = "pkg.upstream.test", *,
               target_port: int | None = None, auth: str | None = None
               ) -> tuple[Reply, socket.socket]:
        """CONNECT; the reply and the raw socket (open on 200, for the caller to close)."""
        sock = connect_socket(port)
        target = f"{host}:{self.upstream.port if target_port is None else target_port}"
        sock.sendall(request_bytes("CONNECT", target, target, close=False,
                                   auth=basic(TOKEN) if auth is None else auth))
        reader = sock.makefile("rb", buffering=0)
        reply = read_reply(reader)
        reader.close()
        check_refusal(reply)
        if reply.status != 200:
            sock.close()
        return reply, sock

    def tls(self, sock: socket.socket, host: str = "pkg.upstream.test") -> ssl.SSLSocket:
        context = ssl.create_default_context(cafile=str(self.ca.ca_pem))
        return context.wrap_socket(sock, server_hostname=host)


def tls_get(tls: ssl.SSLSocket, path: str, host: str = "pkg.upstream.test",
            extra: str = "") -> Reply:
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
    with tls.makefile("rb") as reader:
        return read_reply(reader)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> support.TestCA:
    return make_ca(Path(tmp_path_factory.mktemp("egress-ca")))


@pytest.fixture(scope="module")
def upstream(ca: support.TestCA) -> Iterator[Upstream]:
    server = Upstream(ca)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def make_env(ca: support.TestCA, upstream: Upstream, **config: Any) -> Iterator[Env]:
    upstream.seen.clear()
    sink, clock = FakeSink(), Clock()
    section = EgressSection.model_validate({
        "hosts": {name: "127.0.0.1" for name in ("api.upstream.test", "pkg.upstream.test",
                                                 "other.upstream.test", "upstream.test")},
        "ca_file": ca.ca_pem, **config})
    gateway = Gateway(section, sink, clock=clock)
    try:
        gateway.start()
        yield Env(gateway, sink, clock, upstream, ca)
    finally:
        gateway.stop()


@pytest.fixture
def env(ca: support.TestCA, upstream: Upstream) -> Iterator[Env]:
    yield from make_env(ca, upstream)


@pytest.fixture
def small_env(ca: support.TestCA, upstream: Upstream) -> Iterator[Env]:
    """Two connections per run, 2 KiB of request head."""
    yield from make_env(ca, upstream, max_connections_per_run=2, max_header_size=2048)


def usage_once(env: Env, check: Callable[[Usage], bool], run_id: str = RUN) -> Usage:
    """The run's usage once `check` holds. The gateway accounts a forwarded request in its own
    thread as the answer goes out, so the test thread, having read the answer, may look a moment
    before the counters do; this waits (bounded) instead of racing."""
    usage = env.gateway.usage(run_id)
    deadline = time.monotonic() + WAIT
    while usage is None or not check(usage):
        assert time.monotonic() < deadline, f"usage never settled: {usage}"
        time.sleep(0.005)
        usage = env.gateway.usage(run_id)
    return usage


def seen_paths(upstream: Upstream) -> list[str]:
    return [str(r["path"]) for r in upstream.seen]


# ----------------------------------------------------------------------------- tokens


def test_basic_and_bearer_tokens_are_accepted(env: Env) -> None:
    port = env.open()
    assert env.get(port, auth=basic(TOKEN)).status == 200
    assert env.get(port, auth=basic(TOKEN, user="")).status == 200
    assert env.get(port, auth=f"Bearer {TOKEN}").status == 200
    assert env.get(port, auth=f"bearer   {TOKEN}").status == 200
    assert len(env.upstream.seen) == 4
    assert env.sink.denials() == []


@pytest.mark.parametrize("auth", ["", "Basic", "Bearer", "Basic !!!notbase64",
                                  "Basic " + base64.b64encode(b"no-colon").decode(),
                                  "Basic " + base64.b64encode(b"user:").decode(),
                                  f"Digest {TOKEN}", TOKEN])
def test_missing_token_is_407_token_required(env: Env, auth: str) -> None:
    port = env.open()
    raw = request_bytes("GET", "http://llm.route/v1/chat", "llm.route",
                        auth=auth or None)
    reply = exchange(port, raw)
    assert (reply.status, reply.code) == (407, "token_required")
    assert reply.headers["proxy-authenticate"] == 'Basic realm="agent-supervisor"'
    assert reply.error()["detail"]["retry"] is False
    assert env.upstream.seen == []
    assert env.sink.denials() == ["token_required"]
    assert env.gateway.usage(RUN) == Usage(denied=1)


@pytest.mark.parametrize("auth", [basic("wrong-token"), f"Bearer {TOKEN}x", basic(TOKEN[:-1]),
                                  f"Bearer {TOKEN.upper()}"])
def test_wrong_token_is_407_token_invalid(env: Env, auth: str) -> None:
    port = env.open()
    reply = env.get(port, auth=auth)
    assert (reply.status, reply.code) == (407, "token_invalid")
    assert "proxy-authenticate" in reply.headers
    assert env.upstream.seen == []


def test_another_runs_token_is_invalid_on_this_runs_listener(env: Env) -> None:
    port_a = env.open(run_id="run-a", token="token-a")
    port_b = env.open(run_id="run-b", token="token-b")
    assert env.get(port_a, auth=basic("token-b")).code == "token_invalid"
    assert env.get(port_b, auth=basic("token-b")).status == 200


def test_expired_token_is_403_token_expired(env: Env) -> None:
    port = env.open(expires_at=T0 + 60)
    env.clock.now = T0 + 59.999
    assert env.get(port).status == 200
    env.clock.now = T0 + 60
    reply = env.get(port)
    assert (reply.status, reply.code) == (403, "token_expired")
    assert reply.error()["detail"]["expired_at"] == T0 + 60
    reply, _ = env.tunnel(port)
    assert (reply.status, reply.code) == (403, "token_expired")


def test_suspend_refuses_with_retry_then_resume_serves_again(env: Env) -> None:
    port = env.open()
    env.gateway.suspend(RUN)
    reply = env.get(port)
    assert (reply.status, reply.code) == (403, "token_suspended")
    assert reply.error()["detail"]["retry"] is True
    reply, _ = env.tunnel(port)
    assert reply.code == "token_suspended"
    assert env.upstream.seen == []
    env.gateway.resume(RUN)
    assert env.get(port).status == 200
    reply, sock = env.tunnel(port)
    sock.close()
    assert reply.status == 200


def test_revoked_token_is_403_and_resume_does_not_undo_it(env: Env) -> None:
    port = env.open()
    env.gateway.revoke(RUN)
    reply = env.get(port)
    assert (reply.status, reply.code) == (403, "token_revoked")
    assert reply.error()["detail"]["retry"] is False
    env.gateway.resume(RUN)
    env.gateway.suspend(RUN)
    assert env.get(port).code == "token_revoked"
    reply, _ = env.tunnel(port)
    assert reply.code == "token_revoked"


def present(env: Env, token: str = TOKEN, run_id: str = RUN) -> tuple[str, str] | None:
    """A socket handed to the gateway as a connection on the run's listener, the token
    presented over it (as daemon/egress.py's TokenCheck does for a drill)."""
    ours, theirs = socket.socketpair()
    with ours:
        if not env.gateway.accept(run_id, theirs):
            theirs.close()
            raise LookupError(run_id)
        return present_token(ours, "agent-a", token)


def test_a_drill_checks_the_token_on_the_runs_own_listener_without_its_network(
        env: Env) -> None:
    # `agentctl drill`'s credentials_revoked check (daemon/egress.py TokenCheck): the token
    # goes through the run's listener's own handler over a handed-in socket, so it is the
    # gateway that answers, not a missing address; only token_revoked passes the drill.
    env.open()
    working = present(env)
    assert working is not None and working[1] == "egress_denied", working
    env.gateway.revoke(RUN)
    assert present(env) == ("HTTP/1.1 403 Forbidden", "token_revoked")
    forged = present(env, token="forged")
    assert forged is not None and forged[1] == "token_invalid"
    env.close()
    with pytest.raises(LookupError):  # the run's listener is gone: nothing to check against
        present(env)


def test_a_wrong_token_is_invalid_even_for_a_revoked_run(env: Env) -> None:
    port = env.open()
    env.gateway.revoke(RUN)
    assert env.get(port, auth=basic("nope")).code == "token_invalid"
    assert env.get(port, auth="").code == "token_required"


# ----------------------------------------------------------------------------- CONNECT tunnels


def test_connect_to_an_allow_listed_name_tunnels_tls_end_to_end(env: Env) -> None:
    port = env.open()
    reply, sock = env.tunnel(port)
    assert (reply.status, reply.reason) == (200, "Connection Established")
    with env.tls(sock) as tls:
        first = tls_get(tls, "/hello?x=1")
        second = tls_get(tls, "/again")
    assert (first.status, first.json()) == (200, {"method": "GET", "path": "/hello?x=1"})
    assert second.json()["path"] == "/again"
    assert seen_paths(env.upstream) == ["/hello?x=1", "/again"]
    # The gateway never saw inside the tunnel: no token, nothing added.
    assert "Proxy-Authorization" not in env.upstream.seen[0]["headers"]
    usage = env.gateway.usage(RUN)
    assert usage is not None and usage.requests == 1 and usage.bytes > 0


def test_wildcard_allows_subdomains_not_the_domain_or_another_port(env: Env) -> None:
    port = env.open(env.policy(allow=[f"*.upstream.test:{env.upstream.port}"]))
    reply, sock = env.tunnel(port, "other.upstream.test")
    assert reply.status == 200
    with env.tls(sock, "other.upstream.test") as tls:
        assert tls_get(tls, "/w", "other.upstream.test").status == 200
    reply, sock = env.tunnel(port, "OTHER.Upstream.TEST")
    sock.close()
    assert reply.status == 200
    for host, target_port in (("upstream.test", env.upstream.port),
                              ("other.upstream.test", env.upstream.port + 1),
                              ("upstream.test.evil", env.upstream.port),
                              ("evilupstream.test", env.upstream.port)):
        reply, _ = env.tunnel(port, host, target_port=target_port)
        assert (reply.status, reply.code) == (403, "egress_denied"), host
        assert reply.error()["detail"]["host"] == host
        assert reply.error()["detail"]["port"] == target_port
        assert "allow-list" in reply.error()["message"]


def test_connect_to_a_name_off_the_list_or_a_wrong_port_is_denied(env: Env) -> None:
    port = env.open()
    for host, target_port in (("other.upstream.test", env.upstream.port),
                              ("pkg.upstream.test", env.upstream.port + 1),
                              ("pkg.upstream.test", 443),
                              ("api.upstream.test", env.upstream.port)):
        reply, _ = env.tunnel(port, host, target_port=target_port)
        assert (reply.status, reply.code) == (403, "egress_denied")
        assert reply.headers.get("connection", "").lower() == "close"
    assert env.upstream.seen == []
    # The sink hears of the first refusal per host; the tally counts them all.
    assert env.sink.denials() == ["egress_denied"] * 3
    usage = env.gateway.usage(RUN)
    assert usage is not None and usage.denied == 4
    assert usage.refusals == {"egress_denied other.upstream.test": 1,
                              "egress_denied pkg.upstream.test": 2,
                              "egress_denied api.upstream.test": 1}
    usage = env.gateway.usage(RUN)
    assert usage is not None and (usage.requests, usage.denied) == (0, 4)


@pytest.mark.parametrize("literal", ["127.0.0.1", "[::1]", "2130706433", "0x7f.1", "127.1",
                                     "0177.0.0.1", "0x7f000001", "[::ffff:127.0.0.1]",
                                     "127.0.0.1."])
def test_connect_to_an_ip_literal_is_refused_in_every_notation(env: Env, literal: str) -> None:
    # Even with the address's name allow-listed, and a real server listening there.
    port = env.open(env.policy(allow=[f"*.upstream.test:{env.upstream.port}"]))
    reply, _ = env.tunnel(port, literal)
    assert (reply.status, reply.code) == (403, "egress_denied")
    assert "IP address" in reply.error()["message"]
    assert env.upstream.seen == []


def test_plain_http_to_an_ip_literal_or_unrouted_name_is_denied(env: Env) -> None:
    port = env.open()
    for host in ("127.0.0.1", f"127.0.0.1:{env.upstream.port}", "pkg.upstream.test",
                 "api.upstream.test", "2130706433", "evil.route"):
        reply = env.get(port, "/", host=host)
        assert (reply.status, reply.code) == (403, "egress_denied"), host
        assert "no credential route" in reply.error()["message"]
    assert env.upstream.seen == []


def test_connect_without_a_port_is_a_bad_request(env: Env) -> None:
    port = env.open()
    reply = exchange(port, request_bytes("CONNECT", "pkg.upstream.test", "pkg.upstream.test",
                                         auth=basic(TOKEN)))
    assert 400 <= reply.status < 500
    assert env.upstream.seen == []


def test_connect_to_an_unreachable_allowed_name_is_502_and_counts_an_error(env: Env) -> None:
    closed = free_port()
    port = env.open(env.policy(allow=[f"pkg.upstream.test:{closed}"]))
    reply, _ = env.tunnel(port, target_port=closed)
    assert (reply.status, reply.code) == (502, "upstream_unreachable")
    assert reply.error()["detail"]["retry"] is True
    usage = env.gateway.usage(RUN)
    assert usage is not None and usage.errors == 1


def test_revoke_cuts_an_open_tunnel_and_later_requests_are_revoked(env: Env) -> None:
    port = env.open()
    reply, sock = env.tunnel(port)
    assert reply.status == 200
    with env.tls(sock) as tls:
        assert tls_get(tls, "/before").status == 200
        env.gateway.revoke(RUN)
        assert_cut(tls)
    assert env.get(port).code == "token_revoked"
    reply, _ = env.tunnel(port)
    assert reply.code == "token_revoked"
    assert seen_paths(env.upstream) == ["/before"]


def test_suspend_cuts_an_open_tunnel_and_resume_allows_a_new_one(env: Env) -> None:
    port = env.open()
    reply, sock = env.tunnel(port)
    with env.tls(sock) as tls:
        assert tls_get(tls, "/one").status == 200
        env.gateway.suspend(RUN)
        assert_cut(tls)
    assert env.tunnel(port)[0].code == "token_suspended"
    env.gateway.resume(RUN)
    reply, sock = env.tunnel(port)
    assert reply.status == 200
    with env.tls(sock) as tls:
        assert tls_get(tls, "/two").status == 200
    assert seen_paths(env.upstream) == ["/one", "/two"]


def test_revoke_cuts_an_idle_keep_alive_connection(env: Env) -> None:
    port = env.open()
    with connect_socket(port) as sock, sock.makefile("rb") as reader:
        sock.sendall(request_bytes("GET", "http://llm.route/v1/chat", "llm.route",
                                   auth=basic(TOKEN), close=False))
        assert read_reply(reader).status == 200
        env.gateway.revoke(RUN)
        assert_cut(sock)


# ----------------------------------------------------------------------------- credential routes


def test_route_adds_the_secret_and_strips_proxy_auth_and_the_agents_own_header(env: Env) -> None:
    port = env.open()
    reply = env.get(port, "/v1/chat?tokens=7", headers=[
        ("Authorization", "Bearer agent-made-up"), ("AUTHORIZATION", "Bearer shouting"),
        ("X-Trace", "abc"), ("Proxy-Connection", "keep-alive")])
    assert reply.status == 200
    assert reply.json()["usage"] == {"total_tokens": 7}
    [seen] = env.upstream.seen
    assert seen["path"] == "/v1/chat?tokens=7"
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    auth = [v for k, v in seen["headers"].items() if k.lower() == "authorization"]
    assert auth == [f"Bearer {SECRET}"]
    assert "proxy-authorization" not in headers
    assert "proxy-connection" not in headers
    assert headers["x-trace"] == "abc"
    assert headers["host"].startswith("api.upstream.test")
    # The secret goes upstream only: the agent's answer does not carry it.
    assert SECRET not in reply.body.decode() and all(SECRET not in v
                                                      for v in reply.headers.values())


def test_route_with_a_custom_header_and_base_path(env: Env) -> None:
    port = env.open()
    body = b'{"amount": 5}'
    reply = env.get(port, "/charges?id=1", host="pay.route", method="POST", body=body,
                    headers=[("x-api-key", "agent-guess"), ("Content-Type", "application/json")])
    assert reply.status == 200
    [seen] = env.upstream.seen
    assert (seen["method"], seen["path"], seen["body"]) == ("POST", "/base/charges?id=1",
                                                            body.decode())
    keys = [v for k, v in seen["headers"].items() if k.lower() == "x-api-key"]
    assert keys == [SECRET]
    assert not any(k.lower() == "authorization" for k in seen["headers"])


def test_route_accepts_origin_form_with_a_host_header(env: Env) -> None:
    port = env.open()
    reply = exchange(port, request_bytes("GET", "/v1/chat?tokens=3", "llm.route",
                                         auth=basic(TOKEN)))
    assert reply.status == 200
    assert env.upstream.headers_seen("Authorization") == [f"Bearer {SECRET}"]


def test_route_upstream_errors_pass_through(env: Env) -> None:
    port = env.open()
    reply = env.get(port, "/fail")
    assert reply.status == 500 and reply.code is None
    assert reply.json() == {"error": "upstream failure"}
    usage = usage_once(env, lambda u: u.errors == 1)
    assert (usage.requests, usage.errors, usage.denied) == (1, 1, 0)


def test_unreachable_route_is_502_without_the_secret(env: Env) -> None:
    closed = free_port()
    policy = env.policy(routes=[{"name": "llm", "host": "llm.route", "secret": "env:LLM_KEY",
                                 "upstream": f"https://api.upstream.test:{closed}"}])
    port = env.open(policy)
    reply = env.get(port)
    assert (reply.status, reply.code) == (502, "upstream_unreachable")
    assert reply.error()["detail"] == {"retry": True, "method": "GET", "target": "/v1/chat",
                                       "route": "llm"}


def test_the_secret_is_in_no_refusal(env: Env) -> None:
    """Every refusal code a route request can meet, with the secret's route in play; `call`
    checks each body and header for the secret, this also checks the sink's records."""
    policy = env.policy(approvals=["POST /v1/refunds*"], budget={"run": {"requests": 3}})
    env.sink.decide = lambda a: Decision(False, "ap-1", by="op", reason="no")
    port = env.open(policy, expires_at=T0 + 10)
    codes = [env.get(port, auth="").code, env.get(port, auth=basic("x")).code,
             env.get(port, "/", host="nowhere.route").code,
             env.get(port, "/v1/refunds", method="POST").code]
    assert env.get(port, "/v1/chat", headers=[("Authorization", "x")]).status == 200
    assert env.get(port).status == 200
    codes.append(env.get(port).code)
    env.clock.now = T0 + 10
    codes.append(env.get(port).code)
    env.gateway.suspend(RUN)
    codes.append(env.get(port).code)
    env.gateway.revoke(RUN)
    codes.append(env.get(port).code)
    assert codes == ["token_required", "token_invalid", "egress_denied", "approval_denied",
                     "budget_exceeded", "token_expired", "token_suspended", "token_revoked"]
    assert SECRET not in repr(env.sink.calls)


# ----------------------------------------------------------------------------- spend


def test_spend_from_usage_tokens_and_per_call_price(env: Env) -> None:
    port_a = env.open(env.policy(routes=[
        {"name": "llm", "host": "llm.route", "secret": "env:LLM_KEY",
         "upstream": f"https://api.upstream.test:{env.upstream.port}",
         "price_per_token": 0.001},
        {"name": "pay", "host": "pay.route", "secret": "file:pay",
         "upstream": f"https://api.upstream.test:{env.upstream.port}",
         "price_per_call": 0.5, "price_per_token": 0.01}]))
    assert env.get(port_a, "/v1/chat?tokens=250").status == 200
    assert env.get(port_a, "/v1/chat?tokens=50").status == 200
    usage = usage_once(env, lambda u: u.spend >= 0.3 - 1e-9)
    assert (usage.requests, usage.tokens) == (2, 300)
    assert usage.spend == pytest.approx(0.3)
    # Per call plus per token; a non-usage JSON answer costs the call only.
    reply = env.get(port_a, "/v1/chat?tokens=10", host="pay.route")
    assert reply.json()["usage"]["total_tokens"] == 10
    assert env.get(port_a, "/plain", host="pay.route").status == 200
    usage = usage_once(env, lambda u: u.spend >= 1.4 - 1e-9)
    assert usage.tokens == 310
    assert usage.spend == pytest.approx(0.3 + 0.5 + 0.1 + 0.5)
    assert usage.bytes > 0


def test_no_price_means_no_spend(env: Env) -> None:
    port = env.open()
    assert env.get(port, "/v1/chat?tokens=1000").status == 200
    usage = usage_once(env, lambda u: u.tokens == 0 and u.bytes > 0)
    assert usage.spend == 0.0


# ----------------------------------------------------------------------------- budgets


def assert_budget_refusal(reply: Reply, which: str, metric: str) -> None:
    assert (reply.status, reply.code) == (429, "budget_exceeded")
    detail = reply.error()["detail"]
    assert detail["budget"] == which and detail["ceiling"].startswith(metric)
    assert detail["retry"] is False


def test_request_budget_refuses_with_429_and_tells_the_sink_once(env: Env) -> None:
    port = env.open(env.policy(budget={"run": {"requests": 2}, "action": "kill"}))
    assert env.get(port).status == 200
    assert env.get(port).status == 200
    for _ in range(3):
        assert_budget_refusal(env.get(port), "run", "requests")
    reply, _ = env.tunnel(port)
    assert_budget_refusal(reply, "run", "requests")
    [fired] = env.sink.of("budget_exceeded")
    assert fired["budget"] == "run" and fired["metric"] == "requests"
    assert (fired["value"], fired["limit"], fired["action"]) == (2.0, 2.0, "kill")
    assert fired["usage"]["requests"] == 2
    assert len(env.upstream.seen) == 2


def test_byte_budget_refuses_the_next_request(env: Env) -> None:
    port = env.open(env.policy(budget={"run": {"bytes": 100}}))
    assert env.get(port, "/v1/chat", method="POST", body=b"x" * 150).status == 200
    assert_budget_refusal(env.get(port), "run", "bytes")
    assert_budget_refusal(env.get(port), "run", "bytes")
    [fired] = env.sink.of("budget_exceeded")
    assert fired["metric"] == "bytes" and fired["limit"] == 100


def test_spend_budget_refuses_once_spent(env: Env) -> None:
    policy = env.policy(budget={"run": {"spend": 1.0}}, routes=[
        {"name": "llm", "host": "llm.route", "secret": "env:LLM_KEY", "price_per_call": 0.4,
         "upstream": f"https://api.upstream.test:{env.upstream.port}"}])
    port = env.open(policy)
    for _ in range(3):
        assert env.get(port, "/x").status == 200  # 0.4, 0.8, 1.2
    usage_once(env, lambda u: u.spend >= 1.2 - 1e-9)
    assert_budget_refusal(env.get(port, "/x"), "run", "spend")
    [fired] = env.sink.of("budget_exceeded")
    assert fired["metric"] == "spend" and fired["value"] == pytest.approx(1.2)
    assert len(env.upstream.seen) == 3


def test_requests_that_waited_for_approval_are_judged_by_the_budget_again(env: Env) -> None:
    """Two requests held for an operator were both judged within the spend budget when they
    came (nothing was spent then); approved one after the other, the second is judged again
    when its wait ends, by the spend of the first, and refused as any request over budget."""
    policy = env.policy(budget={"run": {"spend": 0.4}}, approvals=["POST /v1/refunds*"],
                        routes=[{"name": "llm", "host": "llm.route", "secret": "env:LLM_KEY",
                                 "price_per_call": 0.4,
                                 "upstream": f"https://api.upstream.test:{env.upstream.port}"}])
    port = env.open(policy)
    replies: list[Reply] = []
    threads = [threading.Thread(target=lambda: replies.append(
        env.get(port, "/v1/refunds", method="POST"))) for _ in range(2)]
    for thread in threads:
        thread.start()
    env.sink.wait_for(lambda: len(env.sink.approvals) == 2)
    env.sink.approvals[0].future.set_result(Decision(True, "ap-1", by="op"))
    # The reply is no sink event: polled, not waited for on the sink's condition (which only
    # wakes on one, and so waited out WAIT whenever the reply came after the last event,
    # while the second request's own read timed out at the same WAIT).
    wait_for(lambda: len(replies) == 1, timeout=WAIT, interval=0.01, what="the first reply")
    env.sink.approvals[1].future.set_result(Decision(True, "ap-2", by="op"))
    for thread in threads:
        thread.join(WAIT)
    assert sorted(r.status for r in replies) == [200, 429]
    assert_budget_refusal(next(r for r in replies if r.status == 429), "run", "spend")
    assert len(env.upstream.seen) == 1
    [fired] = env.sink.of("budget_exceeded")
    assert fired["metric"] == "spend" and fired["value"] == pytest.approx(0.4)
    assert "budget_exceeded" in env.sink.denials()
    usage = usage_once(env, lambda u: u.denied == 1)
    assert usage.spend == pytest.approx(0.4)


def test_agent_budget_counts_earlier_runs(env: Env) -> None:
    port = env.open(env.policy(budget={"agent": {"requests": 5}}),
                    agent_usage=Usage(requests=4))
    assert env.get(port).status == 200
    assert_budget_refusal(env.get(port), "agent", "requests")
    [fired] = env.sink.of("budget_exceeded")
    assert fired["budget"] == "agent"


def test_byte_budget_cuts_an_open_tunnel(env: Env) -> None:
    port = env.open(env.policy(budget={"run": {"bytes": 30000}}))
    cut_after = tunnel_until_cut(env, port)
    assert cut_after is not None, "the tunnel outlived the byte budget"
    [fired] = env.sink.of("budget_exceeded")
    assert fired["metric"] == "bytes"
    assert env.tunnel(port)[0].code == "budget_exceeded"


def test_byte_budget_cuts_an_open_tunnel_even_when_the_request_ceiling_is_reached(
        env: Env) -> None:
    # One request allowed (the CONNECT itself) and 30000 bytes: the bytes must still be judged.
    port = env.open(env.policy(budget={"run": {"requests": 1, "bytes": 30000}}))
    cut_after = tunnel_until_cut(env, port)
    usage = env.gateway.usage(RUN)
    assert usage is not None
    assert cut_after is not None, (f"the tunnel carried {usage.bytes} bytes past a 30000-byte "
                                   f"budget because the request ceiling was reached first")


def tunnel_until_cut(env: Env, port: int) -> int | None:
    """Requests of ~6 KB through one tunnel until it is cut; how many got through, or None if
    twenty (~120 KB) did."""
    reply, sock = env.tunnel(port)
    assert reply.status == 200
    pad = "p" * 6000
    with env.tls(sock) as tls:
        for done in range(20):
            try:
                answer = tls_get(tls, f"/chunk{done}", extra=f"X-Pad: {pad}\r\n")
            except (ConnectionError, ssl.SSLError, OSError, ValueError):
                return done
            assert answer.status == 200
    return None


# ----------------------------------------------------------------------------- the breaker


def test_breaker_trips_on_error_rate_then_503_until_reset(env: Env) -> None:
    port = env.open(env.policy(breaker={"window": 10, "max_rate": None, "min_requests": 3,
                                        "max_error_rate": 0.5}))
    assert env.get(port, "/ok").status == 200
    assert env.get(port, "/fail").status == 500
    assert env.sink.of("breaker_tripped") == []
    assert env.get(port, "/fail").status == 500  # 2/3 errors: trips
    env.sink.wait_for(lambda: bool(env.sink.of("breaker_tripped")))
    [tripped] = env.sink.of("breaker_tripped")
    assert tripped["reason"].startswith("error rate 2/3")
    assert tripped["usage"]["errors"] == 2
    reply = env.get(port, "/ok")
    assert (reply.status, reply.code) == (503, "breaker_open")
    assert tripped["reason"] in reply.error()["message"]
    assert env.tunnel(port)[0].code == "breaker_open"
    assert env.gateway.breaker_open(RUN) == tripped["reason"]
    assert len(env.upstream.seen) == 3
    assert env.gateway.reset_breaker(RUN) == tripped["reason"]
    assert env.gateway.breaker_open(RUN) is None
    assert env.gateway.reset_breaker(RUN) is None
    assert env.get(port, "/ok").status == 200
    assert len(env.sink.of("breaker_tripped")) == 1


def test_breaker_trips_on_request_rate_then_reset(env: Env) -> None:
    port = env.open(env.policy(breaker={"window": 1, "max_rate": 3, "min_requests": 100}))
    for _ in range(4):  # the clock stands still: 4 requests in one second > 3/s
        assert env.get(port).status == 200
    env.sink.wait_for(lambda: bool(env.sink.of("breaker_tripped")))
    [tripped] = env.sink.of("breaker_tripped")
    assert tripped["reason"].startswith("request rate 4.0/s over 3/s")
    assert env.get(port).code == "breaker_open"
    env.clock.now += 5
    assert env.get(port).code == "breaker_open"  # time alone does not close it
    assert env.gateway.reset_breaker(RUN) is not None
    assert env.get(port).status == 200


def test_disabled_breaker_never_trips(env: Env) -> None:
    port = env.open()
    for _ in range(6):
        assert env.get(port, "/fail").status == 500
    assert env.sink.of("breaker_tripped") == []


def test_reset_breaker_for_an_unknown_run(env: Env) -> None:
    assert env.gateway.reset_breaker("nope") is None
    assert env.gateway.breaker_open("nope") is None
    assert env.gateway.usage("nope") is None
    assert env.close("nope") is None


# ----------------------------------------------------------------------------- approvals


def test_approved_request_is_forwarded_after_the_sink_says_yes(env: Env) -> None:
    env.sink.decide = lambda a: Decision(True, "ap-1", by="alice")
    port = env.open(env.policy(approvals=["POST /v1/refunds*"]))
    assert env.get(port, "/v1/refunds/42", method="POST", body=b"{}").status == 200
    assert env.get(port, "/v1/chat").status == 200  # not held
    [approval] = env.sink.approvals
    assert (approval.run_id, approval.method, approval.host, approval.path, approval.rule) == (
        RUN, "POST", "llm.route", "/v1/refunds/42", "POST /v1/refunds*")
    assert seen_paths(env.upstream) == ["/v1/refunds/42", "/v1/chat"]


def test_held_request_waits_for_the_decision(env: Env) -> None:
    port = env.open(env.policy(approvals=["GET /v1/chat"]))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(env.get, port)
        env.sink.wait_for(lambda: bool(env.sink.approvals))
        assert not pending.done()
        assert env.upstream.seen == []
        env.sink.approvals[0].future.set_result(Decision(True, "ap-9"))
        assert pending.result(WAIT).status == 200
    assert len(env.upstream.seen) == 1


def test_denied_approval_is_403_approval_denied(env: Env) -> None:
    env.sink.decide = lambda a: Decision(False, "ap-2", by="bob", reason="not today")
    port = env.open(env.policy(approvals=["POST pay.route/charges*"]))
    reply = env.get(port, "/charges", host="pay.route", method="POST", body=b"{}")
    assert (reply.status, reply.code) == (403, "approval_denied")
    error = reply.error()
    assert "not today" in error["message"] and "POST pay.route/charges*" in error["message"]
    assert (error["detail"]["approval"], error["detail"]["by"]) == ("ap-2", "bob")
    assert env.upstream.seen == []
    # The same path on another route is not held.
    assert env.get(port, "/charges", method="POST", body=b"{}").status == 200


def test_an_expired_approval_reads_as_a_denial(env: Env) -> None:
    env.sink.decide = lambda a: Decision(False, "ap-3", reason="expired")
    port = env.open(env.policy(approvals=["* *"]))
    assert env.get(port).code == "approval_denied"
    reply, _ = env.tunnel(port)
    assert reply.code == "approval_denied"
    assert [a.method for a in env.sink.approvals] == ["GET", "CONNECT"]


def test_approved_connect_tunnels(env: Env) -> None:
    env.sink.decide = lambda a: Decision(True, "ap-4")
    port = env.open(env.policy(approvals=["CONNECT pkg.upstream.test"]))
    reply, sock = env.tunnel(port)
    assert reply.status == 200
    with env.tls(sock) as tls:
        assert tls_get(tls, "/approved").status == 200
    [approval] = env.sink.approvals
    assert (approval.method, approval.host, approval.path) == ("CONNECT", "pkg.upstream.test",
                                                               "")


def test_revoke_while_held_cuts_the_request_and_a_late_approval_sends_nothing(env: Env) -> None:
    port = env.open(env.policy(approvals=["POST /v1/refunds*"]))
    with connect_socket(port) as sock:
        sock.sendall(request_bytes("POST", "http://llm.route/v1/refunds", "llm.route",
                                   auth=basic(TOKEN), body=b"{}"))
        env.sink.wait_for(lambda: bool(env.sink.approvals))
        env.gateway.revoke(RUN)
        assert_cut(sock)
    held = env.sink.approvals[0].future
    # The cut connection cancels the wait: the daemon withdraws the approval, and a late
    # answer has nothing left to release.
    assert eventually(held.cancelled)
    assert env.upstream.seen == []
    assert env.get(port).code == "token_revoked"


@pytest.mark.parametrize(("path", "code"), [
    ("/v1/refunds/1", "approval_denied"), ("/v1/%72efunds/1", "approval_denied"),
    # Dot segments are refused outright: real clients resolve them before sending, and a
    # path the rules judge must be the path the upstream gets.
    ("/v1/./refunds/1", "bad_request"), ("/v1/x/../refunds/1", "bad_request"),
    ("/./v1/refunds/1", "bad_request"), ("/v1/%2e%2e/v1/refunds/1", "bad_request"),
    ("/v1/x/%2E%2E/refunds/1", "bad_request")])
def test_approval_rules_cannot_be_bypassed_by_path_spelling(env: Env, path: str,
                                                            code: str) -> None:
    # Whatever spelling reaches the upstream as /v1/refunds/... must be held like it.
    env.sink.decide = lambda a: Decision(False, "ap-6", reason="no")
    port = env.open(env.policy(approvals=["POST /v1/refunds*"]))
    reply = env.get(port, path, method="POST", body=b"{}")
    assert reply.code == code, (
        f"{path} reached the upstream as {seen_paths(env.upstream)} without an approval")
    assert env.upstream.seen == []


# ----------------------------------------------------------------------------- connections


def test_connection_cap_answers_503_and_frees_up_when_one_closes(small_env: Env) -> None:
    env = small_env
    port = env.open()
    held: list[tuple[socket.socket, Any]] = []
    with contextlib.ExitStack() as stack:
        for _ in range(2):  # two kept-alive connections, each known to have been served
            sock = stack.enter_context(connect_socket(port))
            reader = stack.enter_context(sock.makefile("rb"))
            sock.sendall(request_bytes("GET", "http://llm.route/v1/chat", "llm.route",
                                       auth=basic(TOKEN), close=False))
            assert read_reply(reader).status == 200
            held.append((sock, reader))
        reply = exchange(port, request_bytes("GET", "http://llm.route/v1/chat", "llm.route",
                                             auth=basic(TOKEN)))
        assert (reply.status, reply.code) == (503, "too_many_connections")
        assert reply.error()["detail"]["retry"] is True
        # Another run's listener has its own cap.
        other = env.open(run_id="run-2")
        assert env.get(other).status == 200
        held[0][1].close()
        held[0][0].close()
        assert eventually(lambda: env.get(port).status == 200)
    assert len(env.upstream.seen) == 4


def eventually(check: Callable[[], bool]) -> bool:
    """Poll `check` (the gateway notices a closed connection in its own time), bounded."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET http://llm.route/v1/chat HTTP/9\r\n\r\n",
    b"GET  HTTP/1.1\r\nHost: llm.route\r\n\r\n",
    b"CONNECT :443 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://llm.route/ HTTP/1.1\r\nBad Header\r\n\r\n",
    b"\x16\x03\x01\x00\x05hello\r\n\r\n",
])
def test_malformed_request_is_4xx_and_the_gateway_keeps_serving(small_env: Env,
                                                                raw: bytes) -> None:
    port = small_env.open()
    reply = exchange(port, raw)
    assert 400 <= reply.status < 500
    assert small_env.upstream.seen == []
    assert small_env.get(port).status == 200


def test_oversized_header_is_4xx_and_the_gateway_keeps_serving(small_env: Env) -> None:
    port = small_env.open()
    reply = small_env.get(port, headers=[("X-Big", "b" * 4096)])
    assert 400 <= reply.status < 500
    long_line = small_env.get(port, "/v1/chat?" + "q" * 4096)
    assert 400 <= long_line.status < 500
    assert small_env.upstream.seen == []
    assert small_env.get(port).status == 200


def test_close_returns_the_usage_and_stops_listening(env: Env) -> None:
    port = env.open()
    assert env.get(port, "/v1/chat?tokens=5").status == 200
    assert env.get(port, "/fail").status == 500
    assert env.get(port, auth="").code == "token_required"
    usage_once(env, lambda u: u.errors == 1)
    reply, sock = env.tunnel(port)
    assert reply.status == 200
    with env.tls(sock) as tls:
        assert tls_get(tls, "/t").status == 200
        assert env.gateway.listening(RUN)
        usage = env.close()
        assert_cut(tls)
    assert usage is not None
    assert (usage.requests, usage.errors, usage.denied) == (3, 1, 1)
    assert usage.bytes > 0
    assert env.gateway.usage(RUN) is None
    assert not env.gateway.listening(RUN)
    with pytest.raises(ConnectionRefusedError):
        connect_socket(port).close()
    assert env.close() is None


def test_runs_are_independent(env: Env) -> None:
    port_a = env.open(run_id="run-a", token="token-a")
    port_b = env.open(run_id="run-b", token="token-b")
    env.gateway.revoke("run-a")
    assert env.get(port_a, auth=basic("token-a")).code == "token_revoked"
    assert env.get(port_b, auth=basic("token-b")).status == 200
    usage_b = env.gateway.usage("run-b")
    assert usage_b is not None and usage_b.requests == 1
    usage_a = env.gateway.usage("run-a")
    assert usage_a is not None and (usage_a.requests, usage_a.denied) == (0, 1)


# ----------------------------------------------------------------------------- issue 11: expiry


def test_expiry_cuts_an_idle_tunnel_and_a_keep_alive_connection_by_timer(env: Env) -> None:
    """Nobody sends a byte: the timer alone ends both at the token's expiry."""
    port = env.open(expires_at=env.clock.now + 0.5)
    reply, sock = env.tunnel(port)
    assert reply.status == 200
    with env.tls(sock) as tls, connect_socket(port) as kept, kept.makefile("rb") as reader:
        assert tls_get(tls, "/before").status == 200
        kept.sendall(request_bytes("GET", "http://llm.route/v1/chat", "llm.route",
                                   auth=basic(TOKEN), close=False))
        assert read_reply(reader).status == 200
        env.clock.now += 1.0  # the timer fires in half a second and finds the token expired
        assert_cut(tls)
        assert_cut(kept)
    assert env.get(port).code == "token_expired"
    env.gateway.resume(RUN)  # expiry is final: neither resume nor suspend revives it
    assert env.get(port).code == "token_expired"


def test_expiry_cuts_a_streamed_reply_midway(env: Env) -> None:
    port = env.open(expires_at=env.clock.now + 0.5)
    with connect_socket(port) as sock, sock.makefile("rb") as reader:
        sock.sendall(request_bytes("GET", "http://llm.route/drip?n=600&every=0.05",
                                   "llm.route", auth=basic(TOKEN)))
        assert reader.readline().startswith(b"HTTP/1.1 200")
        env.clock.now += 1.0
        assert_cut(sock)
    assert env.get(port).code == "token_expired"


def test_traffic_after_expiry_is_cut_even_before_the_timer(env: Env) -> None:
    port = env.open()  # the timer is an hour away
    _reply, sock = env.tunnel(port)
    with env.tls(sock) as tls:
        assert tls_get(tls, "/before").status == 200
        env.clock.now = T0 + 3600
        with contextlib.suppress(OSError):
            tls.sendall(b"GET /after HTTP/1.1\r\nHost: pkg.upstream.test\r\n\r\n")
        assert_cut(tls)
    assert seen_paths(env.upstream) == ["/before"]


# ----------------------------------------------------------------------------- reflection


@pytest.mark.parametrize("how", ["json", "header", "reason", "b64", "b64&pad=1", "b64&pad=2",
                                 "b64url&pad=1", "hex", "url"])
def test_a_reply_that_reflects_the_secret_is_withheld(env: Env, how: str) -> None:
    port = env.open()
    for host in ("llm.route", "pay.route"):  # Authorization: Bearer ..., X-Api-Key: ...
        reply = env.get(port, f"/reflect?as={how}", host=host)  # `exchange` checks the secret
        assert (reply.status, reply.code) == (502, "secret_reflected"), reply
        assert reply.error()["detail"]["route"] in ("llm", "pay")
    assert len(env.upstream.seen) == 2, "the upstream was asked; its reply was withheld"
    assert env.sink.denials() == ["secret_reflected"]  # the first of each (code, path)
    assert usage_once(env, lambda u: u.denied == 2).refusals == {
        "secret_reflected /reflect": 2}


@pytest.mark.parametrize("chunk", [1, 1 << 20], ids=["byte-by-byte", "all-at-once"])
def test_a_streamed_reflection_is_cut_before_the_secret_leaves(env: Env, chunk: int) -> None:
    port = env.open()
    with connect_socket(port) as sock:
        sock.sendall(request_bytes(
            "GET", f"http://llm.route/reflect?as=stream&pad=3000&chunk={chunk}", "llm.route",
            auth=basic(TOKEN)))
        received = b""
        sock.settimeout(WAIT)
        with contextlib.suppress(ConnectionError):
            while chunk := sock.recv(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    assert SECRET.encode() not in received
    # All of the pad leaves, however the upstream's bytes were chunked on the way (a loaded
    # host reads fewer, larger chunks; the guard passes on the same bytes either way).
    assert received.count(b"x") >= 3000, "the stream was passed on until the secret came"
    env.sink.wait_for(lambda: "secret_reflected" in env.sink.denials())


def test_an_encoded_reply_is_refused_and_the_upstream_is_asked_for_identity(env: Env) -> None:
    port = env.open()
    reply = env.get(port, "/reflect?as=gzip", headers=[("Accept-Encoding", "gzip, br")])
    assert (reply.status, reply.code) == (502, "upstream_encoding_refused")
    assert env.upstream.seen[-1]["headers"]["Accept-Encoding"] == "identity"


def test_trace_and_unnamed_methods_are_refused_405(env: Env) -> None:
    port = env.open(env.policy(routes=[
        {"name": "llm", "host": "llm.route", "secret": "env:LLM_KEY", "methods": ["GET"],
         "upstream": f"https://api.upstream.test:{env.upstream.port}"}]))
    for method in ("TRACE", "POST", "DELETE", "OPTIONS"):
        reply = env.get(port, "/reflect", method=method)
        assert (reply.status, reply.code) == (405, "method_not_allowed"), method
        assert reply.headers["allow"] == "GET"
    assert env.get(port).status == 200
    assert [r["method"] for r in env.upstream.seen] == ["GET"]


def test_a_route_may_never_name_trace() -> None:
    for method in ("TRACE", "track", "CONNECT"):
        with pytest.raises(ValueError):
            GatewayPolicy.model_validate({"routes": [
                {"name": "r", "host": "r.route", "secret": "env:K", "methods": [method],
                 "upstream": "https://example.com"}]})


@pytest.mark.parametrize(("header", "query"), [
    ("X-HTTP-Method-Override", ""), ("x-http-method", ""), ("X-Method-Override", ""),
    ("", "?_method=POST"), ("", "?a=1&%5Fmethod=DELETE")])
def test_method_overrides_are_refused(env: Env, header: str, query: str) -> None:
    port = env.open()
    headers = [(header, "POST")] if header else []
    reply = env.get(port, "/v1/items" + query, headers=headers)
    assert (reply.status, reply.code) == (400, "method_override_refused")
    assert env.upstream.seen == []


@pytest.mark.parametrize("path", ["//v1/refunds", "/v1//refunds", "/v1/refunds/",
                                  "/V1/refunds", "/v1/REFUNDS", "/v1/r%65funds",
                                  "/v1/refunds?x=1"])
def test_spellings_of_a_held_path_are_held(env: Env, path: str) -> None:
    env.sink.decide = lambda a: Decision(False, "ap-7", reason="no")
    port = env.open(env.policy(approvals=["POST /v1/refunds"]))
    reply = env.get(port, path, method="POST", body=b"{}")
    assert reply.code == "approval_denied", seen_paths(env.upstream)
    assert env.upstream.seen == []


@pytest.mark.parametrize("path", ["/v1/refunds%2f", "/v1/refunds%2F", "/v1/refunds;x=1",
                                  "/v1%2frefunds", "/v1/refunds%252f", "/v1\\refunds",
                                  "/v1/refunds%5c", "/v1/ref%C3%BCnds", "/v1/refunds%00"])
def test_spellings_without_one_meaning_are_refused(env: Env, path: str) -> None:
    env.sink.decide = lambda a: Decision(True, "ap-8")  # an approval would not matter
    port = env.open(env.policy(approvals=["POST /v1/refunds"]))
    reply = env.get(port, path, method="POST", body=b"{}")
    assert (reply.status, reply.code) == (400, "bad_request")
    assert env.upstream.seen == [] and env.sink.approvals == []


def test_an_override_cannot_turn_an_unheld_get_into_a_held_post(env: Env) -> None:
    env.sink.decide = lambda a: Decision(True, "ap-9")
    port = env.open(env.policy(approvals=["POST /v1/refunds"]))
    reply = env.get(port, "/v1/refunds", headers=[("X-HTTP-Method-Override", "POST")])
    assert reply.code == "method_override_refused"
    assert env.upstream.seen == [] and env.sink.approvals == []


# ----------------------------------------------------------------------------- malformed input


MALFORMED = [
    b"CONNECT xn--a.com:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT xn--.com:443 HTTP/1.1\r\n\r\n",
    b"CONNECT xn--ls8h.la:443 HTTP/1.1\r\n\r\n",
    b"CONNECT \xff\xfe.com:443 HTTP/1.1\r\n\r\n",
    b"CONNECT a..b:443 HTTP/1.1\r\n\r\n",
    b"CONNECT host:99999 HTTP/1.1\r\n\r\n",
    b"CONNECT host:-1 HTTP/1.1\r\n\r\n",
    b"CONNECT " + b"a" * 300 + b".com:443 HTTP/1.1\r\n\r\n",
    b"GET http://xn--a.com/ HTTP/1.1\r\nHost: xn--a.com\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: xn--a.com\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
]


def _answer(port: int, raw: bytes, timeout: float = WAIT) -> bytes:
    """The gateway's reply head to `raw` on a fresh connection (b"" if it closed without
    one). Raises TimeoutError when no complete head came within `timeout`."""
    with connect_socket(port) as sock:
        sock.settimeout(timeout)
        with contextlib.suppress(ConnectionError):
            sock.sendall(raw)
        data = b""
        with contextlib.suppress(ConnectionError):
            while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
                data += chunk
        return data


@pytest.mark.parametrize("raw", MALFORMED)
def test_every_malformed_request_gets_a_400(env: Env, raw: bytes,
                                           caplog: pytest.LogCaptureFixture) -> None:
    port = env.open()
    for _ in range(3):
        answer = _answer(port, raw.replace(b"\r\n\r\n", f"\r\nProxy-Authorization: "
                                           f"{basic(TOKEN)}\r\n\r\n".encode(), 1))
        assert answer.startswith(b"HTTP/1.1 400") or answer.startswith(b"HTTP/1.0 400"), answer
        assert b"bad_request" in answer
    assert env.get(port).status == 200
    assert not [r for r in caplog.records if r.name.startswith(("aiohttp", "asyncio"))]


def test_a_flood_of_malformed_requests_logs_a_few_lines(env: Env,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    port = env.open()
    for i in range(150):
        answer = _answer(port, MALFORMED[i % len(MALFORMED)] if i % 2 else b"\x00\xffjunk\r\n\r\n")
        assert answer.startswith((b"HTTP/1.1 4", b"HTTP/1.0 4")), answer
    lines = [r for r in caplog.records if r.name == "supervisor.egress.gateway"]
    # One line per 10 s, whatever the flood; a loaded machine may straddle a few windows.
    assert 1 <= len(lines) <= 5, [r.getMessage() for r in lines]
    assert all(r.exc_info is None for r in caplog.records)
    assert not [r for r in caplog.records if r.name.startswith(("aiohttp", "asyncio"))]
    usage = env.gateway.usage(RUN)
    assert usage is not None and usage.denied == 150


_TOKENISH = st.sampled_from([b"GET", b"POST", b"CONNECT", b"TRACE", b"PUT", b"get", b"", b"\x00",
                             b"G\xffT"])
_TARGETS = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"http://llm.route/v1/chat", b"llm.route:80", b"pkg.upstream.test:443",
                     b"xn--a.com:443", b"xn--:1", b"[::1]:443", b"*", b"/", b"http://[::1/",
                     b"http://llm.route:99999/", b"http://\xc3\xa9.com/", b"%zz", b"a:b:c"]),
    st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")))
_HEADERS = st.lists(st.tuples(st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding",
                                               b"X-HTTP-Method-Override", b"Expect", b"\x01",
                                               b"Upgrade", b"Connection", b"X"]),
                              st.binary(max_size=20)), max_size=4)


# Bounded in examples (a few seconds on a quiet machine), never in time.
@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(_TOKENISH, _TARGETS, st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"", b"X"]),
       _HEADERS, st.booleans())
def test_fuzzed_request_heads_always_get_an_answer(fuzz_env: tuple[Env, int], method: bytes,
                                                   target: bytes, version: bytes,
                                                   headers: list[tuple[bytes, bytes]],
                                                   with_token: bool) -> None:
    _env, port = fuzz_env
    lines = [method + b" " + target + b" " + version]
    if with_token:
        lines.append(b"Proxy-Authorization: " + basic(TOKEN).encode())
    lines += [k + b": " + v for k, v in headers]
    raw = b"\r\n".join(lines) + b"\r\n\r\n"
    try:
        answer = _answer(port, raw, timeout=3.0)
    except TimeoutError:
        # Only a request that declares a body it never sends may wait (for that body).
        assert b"Content-Length" in raw or b"Transfer-Encoding" in raw, raw
        return
    if not answer:
        return  # closed unanswered: a head the header timeout ended
    status = int(answer.split(b" ", 2)[1])
    assert status < 500 or status in (502, 503), answer[:300]
    assert SECRET.encode() not in answer


@pytest.fixture(scope="module")
def fuzz_env(ca: support.TestCA, upstream: Upstream) -> Iterator[tuple[Env, int]]:
    for env in make_env(ca, upstream, header_timeout=1.0):
        port = env.open()
        with _no_loop_errors():
            yield env, port
        assert env.get(port).status == 200, "the gateway stopped serving after the fuzzing"


@contextlib.contextmanager
def _no_loop_errors() -> Iterator[None]:
    """Fails when aiohttp or asyncio logged an error (an unhandled exception per request)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(n) for n in ("aiohttp.server", "aiohttp.web", "asyncio")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert not [r for r in records if r.levelno >= logging.ERROR], records[:3]


# ----------------------------------------------------------------------------- bounds


def test_refusals_of_unique_long_names_stay_bounded(env: Env) -> None:
    port = env.open()
    sent = 400
    for i in range(sent):
        # Names of 250 characters (refused: not on the list) and of 3,000 (not a DNS name).
        labels = 4 if i % 2 else 48
        name = ".".join([f"n{i}"] + ["x" * 60] * labels) + ".com"
        reply, _ = env.tunnel(port, name, target_port=443)
        assert reply.code == ("egress_denied" if len(name) <= 253 else "bad_request")
        assert len(reply.body) < 2048, "a refusal echoes at most a clipped target"
    usage = env.gateway.usage(RUN)
    assert usage is not None and usage.denied == sent
    assert sum(usage.refusals.values()) == sent
    assert len(usage.refusals) <= 66  # 64 targets and one "(other targets)" per code
    assert len(json.dumps(usage.refusals)) < 64 * 300
    reported = env.sink.of("denied")
    assert len(reported) <= 64
    assert max(len(json.dumps(d)) for d in reported) < 1024


def test_refusals_count_toward_the_breaker(env: Env) -> None:
    port = env.open(env.policy(breaker={"window": "60s", "min_requests": 10,
                                        "max_error_rate": 0.5, "max_rate": 1000}))
    codes = [env.tunnel(port, f"h{i}.example.com", target_port=443)[0].code for i in range(12)]
    assert codes[:10] == ["egress_denied"] * 10 and codes[-1] == "breaker_open"
    [tripped] = env.sink.of("breaker_tripped")
    assert "error rate" in tripped["reason"]
    assert env.get(port).code == "breaker_open"


def test_held_approvals_are_capped_and_withdrawn_when_the_agent_hangs_up(env: Env) -> None:
    port = env.open(env.policy(approvals=["POST /v1/refunds"], max_pending_approvals=3))
    held = []
    for _ in range(3):
        sock = connect_socket(port)
        sock.sendall(request_bytes("POST", "http://llm.route/v1/refunds", "llm.route",
                                   auth=basic(TOKEN), body=b"{}"))
        held.append(sock)
    env.sink.wait_for(lambda: len(env.sink.approvals) == 3)
    over = env.get(port, "/v1/refunds", method="POST", body=b"{}")
    assert (over.status, over.code) == (429, "approvals_pending")
    assert over.error()["detail"]["retry"] is True
    assert len(env.sink.approvals) == 3, "past the cap, nobody is asked"
    for sock in held:
        sock.close()
    assert eventually(lambda: all(a.future.cancelled() for a in env.sink.approvals))
    env.sink.decide = lambda a: Decision(False, "ap-10", reason="no")
    assert env.get(port, "/v1/refunds", method="POST", body=b"{}").code == "approval_denied"
    assert env.upstream.seen == []


def test_approvals_asked_per_run_are_capped(env: Env) -> None:
    env.sink.decide = lambda a: Decision(False, "ap-11", reason="no")
    port = env.open(env.policy(approvals=["DELETE *"], max_approval_requests=2))
    codes = [env.get(port, f"/v1/items/{i}", method="DELETE").code for i in range(4)]
    assert codes == ["approval_denied", "approval_denied", "approval_limit", "approval_limit"]
    assert len(env.sink.approvals) == 2


def test_request_bodies_stream_to_the_upstream(env: Env) -> None:
    """The upstream receives the start of a body the agent has not finished sending: the
    gateway holds no request body whole (16 uploads of 60 MB once took 3 GB)."""
    port = env.open()
    env.upstream.uploads.clear()
    total = 4 * 1024 * 1024
    with connect_socket(port) as sock, sock.makefile("rb") as reader:
        head = request_bytes("POST", "http://llm.route/upload", "llm.route",
                             auth=basic(TOKEN), headers=[("Content-Length", str(total))])
        sock.sendall(head + b"u" * (total // 4))
        assert eventually(lambda: sum(env.upstream.uploads) > 0), \
            "nothing reached the upstream before the body was complete"
        assert sum(env.upstream.uploads) < total
        sock.sendall(b"u" * (total - total // 4))
        reply = read_reply(reader)
    assert reply.status == 200 and reply.json() == {"received": total}
    assert usage_once(env, lambda u: u.bytes >= total).bytes >= total


def test_a_declared_body_over_the_limit_is_refused_before_anything_is_sent(env: Env) -> None:
    port = env.open()
    raw = request_bytes("POST", "http://llm.route/upload", "llm.route", auth=basic(TOKEN),
                        headers=[("Content-Length", str(1 << 40))])
    reply = exchange(port, raw)
    assert (reply.status, reply.code) == (413, "body_too_large")
    assert env.upstream.seen == []


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=b"])
def test_a_method_override_in_a_form_body_is_refused(env: Env, content_type: str) -> None:
    env.sink.decide = lambda a: Decision(True, "ap-12")
    port = env.open(env.policy(approvals=["DELETE *"]))
    body = b"a=1&_method=DELETE" if "urlencoded" in content_type else (
        b'--b\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--b--\r\n')
    reply = env.get(port, "/upload", method="POST", body=body,
                    headers=[("Content-Type", content_type)])
    assert (reply.status, reply.code) == (400, "method_override_refused")
    assert not [r for r in env.upstream.seen if r["body"] != "<0 bytes>"], \
        "the upstream must never get the whole body"
    # The same body as JSON is data, not a form field.
    reply = env.get(port, "/v1/items", method="POST", body=b'{"_method": "DELETE"}',
                    headers=[("Content-Type", "application/json")])
    assert reply.status == 200


# ----------------------------------------------------------------------------- the call list


def test_each_route_call_is_listed_with_its_status_bytes_and_tokens(env: Env) -> None:
    """What a CI report lists (supervisor/egress/calls.py): one entry per call through a
    route, JSON and streamed usage read, the query string never kept; refusals and tunnels
    are not model calls."""
    port = env.open()
    assert env.get(port, "/v1/chat?tokens=7").status == 200
    assert env.get(port, "/fail").status == 500
    body = b'{"model": "m", "stream": true}'
    streamed = env.get(port, "/v1/events?key=abc", method="POST", body=body,
                       headers=[("Content-Type", "application/json")])
    assert streamed.status == 200 and b"message_stop" in streamed.body
    assert env.get(port, "/v1/chat", host="unrouted.example").status == 403
    log = env.gateway.gates[RUN].calls
    env.close()
    entries = log.as_dict()
    assert entries["unrecorded"] == 0
    calls = entries["calls"]
    assert [(c["method"], c["route"], c["path"], c["status"], c["tokens"]) for c in calls] == [
        ("GET", "llm", "/v1/chat", 200, 7), ("GET", "llm", "/fail", 500, None),
        ("POST", "llm", "/v1/events", 200, 150)]
    assert calls[2]["request_bytes"] == len(body)
    assert calls[2]["reply_bytes"] == len(streamed.body)
    assert all(c["reply_bytes"] > 0 and c["duration_ms"] >= 0 and c["ts"] > 0
               for c in calls)
    assert "abc" not in json.dumps(calls)


# ----------------------------------------------------------------------------- a restart


def test_an_adopted_runs_gate_goes_on_from_the_counts_it_carried(env: Env) -> None:
    # Handed over at a restart with 2 requests made: a run budget of 3 leaves it one.
    policy = env.policy(budget={"action": "alert", "run": {"requests": 3}})
    port = env.open(policy, carried=Carried(usage=Usage(requests=2, bytes=10, spend=0.5)))
    assert env.get(port).status == 200
    reply = env.get(port)
    assert (reply.status, reply.code) == (429, "budget_exceeded")
    usage = usage_once(env, lambda u: u.denied == 1)
    assert (usage.requests, usage.spend) == (3, 0.5)
    assert len(env.sink.of("budget_exceeded")) == 1


def test_a_budget_that_fired_before_the_restart_does_not_fire_again(env: Env) -> None:
    policy = env.policy(budget={"action": "pause", "run": {"requests": 2}})
    port = env.open(policy, carried=Carried(usage=Usage(requests=2), budget_fired=True))
    assert env.get(port).code == "budget_exceeded"
    assert env.sink.of("budget_exceeded") == []  # its tripwire acted once, before


def test_an_open_breaker_stays_open_until_a_human_resets_it(env: Env) -> None:
    port = env.open(env.policy(breaker={"window": 10, "min_requests": 3}),
                    carried=Carried(breaker="error rate 1.00 over 3 requests"))
    reply = env.get(port)
    assert (reply.status, reply.code) == (503, "breaker_open")
    assert env.upstream.seen == []
    assert env.gateway.reset_breaker(RUN) == "error rate 1.00 over 3 requests"
    assert env.get(port).status == 200


def test_a_paused_run_is_adopted_suspended_and_resumes(env: Env) -> None:
    port = env.open(carried=Carried(suspended=True))
    assert env.get(port).code == "token_suspended"
    env.gateway.resume(RUN)
    assert env.get(port).status == 200


def test_carried_state_crosses_the_wire_and_bad_values_are_refused() -> None:
    carried = Carried(usage=Usage(1, 2, 0.25, 4, 5, 6), breaker="why", budget_fired=True,
                      suspended=True)
    assert carried_from_wire(json.loads(json.dumps(carried_to_wire(carried)))) == carried
    wire = carried_to_wire(Carried())
    for bad in ({"usage": {**wire["usage"], "requests": -1}},
                {"usage": {**wire["usage"], "bytes": True}},
                {"usage": {**wire["usage"], "spend": float("nan")}},
                {"usage": {**wire["usage"], "spend": "1"}},
                {"breaker": 3}, {"budget_fired": 1}, {"suspended": None}):
        with pytest.raises(ValueError):
            carried_from_wire({**wire, **bad})
    with pytest.raises(KeyError):
        carried_from_wire({k: v for k, v in wire.items() if k != "breaker"})
