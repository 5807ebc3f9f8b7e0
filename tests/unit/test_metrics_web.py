"""Metrics worth scraping (issue 16): the series for tripwires, pauses, approvals, the egress
gateway, output truncations and seccomp attempts move on what the daemon audits and reports,
with bounded labels; `promtool check metrics` passes on the exposition; and a scrape from
beyond loopback needs a web config in the Prometheus exporter toolkit's format: real TLS (also
with a required client certificate) and basic auth with bcrypt hashes, scraped for real over
TCP. No root."""

from __future__ import annotations

import asyncio
import base64
import datetime
import http.client
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from supervisor.daemon.configcheck import check_config
from supervisor.errors import ConfigInvalid
from supervisor.metrics import Metrics, check_endpoint, parse_listen, start_metrics
from supervisor.metrics_web import load_web_config
from supervisor.telemetry import SyscallAttempt
from tests.unit.conftest import ArbiterEnv
from tests.unit.test_metrics import FakeArbiter, scrape, value

PASSWORD = "correct horse battery staple"


def test_new_series_move_on_audited_events_with_bounded_labels(env: ArbiterEnv) -> None:
    metrics = Metrics(FakeArbiter(), env.audit, "1")
    append = env.audit.append
    append(actor="alice(uid=1000)", verb="pause", scope="class:web", target="a1",
           outcome="ok")
    append(actor="system:tripwire", verb="pause", scope="agent:a2", target="a2", outcome="ok")
    append(actor="alice(uid=1000)", verb="pause", scope="agent:a3", target="a3",
           outcome="refused:illegal_transition")
    append(actor="system:tripwire", verb="tripwire", scope="agent:a1", target="a1",
           outcome="kill", detail={"rule": "cpu", "metric": "cpu_percent"})
    append(actor="system:tripwire", verb="tripwire", scope="agent:a1", target="a1",
           outcome="log", detail={"rule": "output_cap", "metric": "output_bytes"})
    append(actor="system:tripwire", verb="tripwire", scope="agent:a1", target="a1",
           outcome="kill", detail={"rule": "x", "metric": "Robert'); DROP TABLE --"})
    for _ in range(3):
        append(actor="system:gateway", verb="approval_requested", scope="agent:a1",
               outcome="pending")
    append(actor="bob(uid=1001)", verb="approval_granted", scope="agent:a1",
           outcome="approved")
    append(actor="system:gateway", verb="approval_denied", scope="agent:a1", outcome="expired")
    append(actor="system:gateway", verb="egress_denied", scope="agent:a1",
           outcome="refused:route_not_allowed")
    append(actor="system:gateway", verb="egress_summary", scope="agent:a1",
           detail={"run": "r1", "usage": {"requests": 7, "denied": 2, "bytes": 4096,
                                          "spend": 0.25}})
    metrics.on_seccomp_attempt(SyscallAttempt(ts=1.0, container_id="c1", pid=2,
                                              syscall="unshare", number=272, count=5))
    samples = scrape(metrics)
    assert value(samples, "agent_supervisor_pauses_total", scope="class",
                 actor_kind="operator") == 1
    assert value(samples, "agent_supervisor_pauses_total", scope="agent",
                 actor_kind="system:tripwire") == 1
    assert value(samples, "agent_supervisor_tripwire_firings_total", metric="cpu_percent",
                 action="kill") == 1
    assert value(samples, "agent_supervisor_tripwire_firings_total", metric="other",
                 action="kill") == 1
    assert value(samples, "agent_supervisor_output_truncations_total") == 1
    assert value(samples, "agent_supervisor_approvals_requested_total") == 3
    assert value(samples, "agent_supervisor_approvals_decided_total", outcome="approved") == 1
    assert value(samples, "agent_supervisor_approvals_decided_total", outcome="expired") == 1
    assert value(samples, "agent_supervisor_approvals_pending") == 1
    assert value(samples, "agent_supervisor_gateway_refusals_total",
                 code="route_not_allowed") == 1
    assert value(samples, "agent_supervisor_gateway_requests_total", decision="forwarded") == 7
    assert value(samples, "agent_supervisor_gateway_requests_total", decision="denied") == 2
    assert value(samples, "agent_supervisor_gateway_bytes_total") == 4096
    assert value(samples, "agent_supervisor_gateway_spend_total") == 0.25
    assert value(samples, "agent_supervisor_seccomp_attempts_total", syscall="unshare") == 5
    labels = {dict(key[1]).get(name) for key in samples for name in ("actor", "user", "reason")}
    assert labels == {None}  # no user names or free text anywhere
    promtool_check(metrics.exposition())


def test_open_breakers_are_read_at_scrape_time(env: ArbiterEnv) -> None:
    """The gauge of open egress breakers follows the daemon's count at each scrape; a count
    that cannot be read is 0, never a failed scrape."""
    open_now = [2]
    metrics = Metrics(FakeArbiter(), env.audit, "1", breakers=lambda: open_now[0])
    assert value(scrape(metrics), "agent_supervisor_gateway_breakers_open") == 2
    open_now[0] = 0
    assert value(scrape(metrics), "agent_supervisor_gateway_breakers_open") == 0
    promtool_check(metrics.exposition())

    def broken() -> int:
        raise RuntimeError("gateway state unreadable")

    failing = Metrics(FakeArbiter(), env.audit, "1", breakers=broken)
    assert value(scrape(failing), "agent_supervisor_gateway_breakers_open") == 0


def test_output_bytes_are_counters_read_at_scrape_time(env: ArbiterEnv) -> None:
    """Output bytes follow the daemon's totals; totals that cannot be read leave the family
    out of that scrape (a 0 would read as a counter reset)."""
    totals = [(5000, 4096)]
    metrics = Metrics(FakeArbiter(), env.audit, "1", outputs=lambda: totals[0])
    samples = scrape(metrics)
    assert value(samples, "agent_supervisor_output_bytes_total") == 5000
    assert value(samples, "agent_supervisor_output_recorded_bytes_total") == 4096
    totals[0] = (6000, 4096)
    assert value(scrape(metrics), "agent_supervisor_output_bytes_total") == 6000
    promtool_check(metrics.exposition())

    def broken() -> tuple[int, int]:
        raise RuntimeError("outputs unreadable")

    failing = Metrics(FakeArbiter(), env.audit, "1", outputs=broken)
    names = {name for name, _ in scrape(failing)}
    assert "agent_supervisor_output_bytes_total" not in names
    assert "agent_supervisor_build_info" in names  # the rest of the scrape is served


def promtool_check(exposition: bytes) -> None:
    """`promtool check metrics`: exit 0 and no lint complaint (install-deps installs it)."""
    # install-deps puts it in /usr/local/bin, which the unit tier's reset PATH leaves out.
    promtool = shutil.which("promtool") or shutil.which("promtool", path="/usr/local/bin")
    assert promtool is not None, "promtool is missing: run scripts/install-deps.sh"
    done = subprocess.run([promtool, "check", "metrics"], input=exposition,
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout, done.stderr)


# ----------------------------------------------------------------------------- web config


@dataclass
class Pki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _issue(path: Path, common: str, key: ec.EllipticCurvePrivateKey,
           issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, ca: bool = False,
           server: bool = False) -> None:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (_name(common), key)
    builder = (x509.CertificateBuilder().subject_name(_name(common)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        import ipaddress

        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    path.write_bytes(builder.sign(issuer_key, hashes.SHA256())
                     .public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    base = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    _issue(base / "ca.crt", "test ca", ca_key, None, ca=True)
    ca = (_name("test ca"), ca_key)
    made = {}
    for name, server, issuer in (("server", True, ca), ("client", False, ca),
                                 ("stranger", False, None)):
        key = ec.generate_private_key(ec.SECP256R1())
        _write_key(base / f"{name}.key", key)
        _issue(base / f"{name}.crt", name, key, issuer, server=server)
        made[name] = (base / f"{name}.crt", base / f"{name}.key")
    yield Pki(base, base / "ca.crt", *made["server"], *made["client"], *made["stranger"])


def _web_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _hash(password: str) -> str:
    # Cost 4: the least bcrypt allows, so the test spends no time on it; the format is the
    # same as htpasswd -B writes ($2y$ there, $2b$ here; both are read).
    import bcrypt

    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()


@pytest.mark.parametrize(("text", "why"), [
    ("tls_server_config: {cert_file: a.crt}\n", "needs cert_file and key_file"),
    ("tls_server_config: {cert_file: a, key_file: b, client_auth_type: RequireAndVerifyClientCert}"
     "\n", "needs client_ca_file"),
    ("tls_server_config: {cert_file: a, key_file: b, client_auth_type: VerifyClientCertIfGiven}"
     "\n", "client_auth_type must be"),
    ("tls_server_config: {cert_file: a, key_file: b, cipher_suites: [x]}\n",
     "tls_server_config takes"),
    ("http_server_config: {http2: false}\n", "unknown keys"),
    ("basic_auth_users: {prometheus: hunter2}\n", "bcrypt hash"),
    ("basic_auth_users: [prometheus]\n", "maps user names"),
    ("tls_server_config: {cert_file: missing.crt, key_file: missing.key}\n",
     "cannot load the TLS files"),
    ("- [unclosed\n", "not YAML"),
])
def test_a_bad_web_config_is_refused_naming_the_problem(tmp_path: Path, text: str,
                                                        why: str) -> None:
    with pytest.raises(ConfigInvalid, match=why) as caught:
        load_web_config(_web_config(tmp_path / "web.yml", text))
    assert caught.value.detail["key"] == "metrics.web_config_file"


def test_beyond_loopback_only_with_tls_or_basic_auth(tmp_path: Path, pki: Pki) -> None:
    empty = _web_config(tmp_path / "empty.yml", "{}\n")
    for web in (None, empty):
        with pytest.raises(ConfigInvalid, match="needs \\[metrics\\] web_config_file"):
            check_endpoint("0.0.0.0:9464", web)
    auth = _web_config(tmp_path / "auth.yml", f"basic_auth_users: {{p: '{_hash('x')}'}}\n")
    tls = _web_config(tmp_path / "tls.yml", f"tls_server_config: {{cert_file: "
                      f"{pki.server_cert}, key_file: {pki.server_key}}}\n")
    for web in (auth, tls):
        address, config = check_endpoint("0.0.0.0:9464", web)
        assert address is not None and config is not None and config.protected
    assert parse_listen("127.0.0.1:9464") is not None  # loopback needs nothing


def test_the_config_check_refuses_an_open_remote_endpoint(tmp_path: Path) -> None:
    config = tmp_path / "daemon.toml"
    config.write_text('[metrics]\nlisten = "0.0.0.0:9464"\n')
    checked = check_config(config)
    assert [e for e in checked.errors if "web_config_file" in str(e)], checked.errors


def _scrape(port: int, context: ssl.SSLContext | None, auth: str | None
            ) -> tuple[int, str]:
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        headers = {} if auth is None else {
            "Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
        conn.request("GET", "/metrics", headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _client_context(pki: Pki, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def test_a_real_scrape_over_tls_with_basic_auth(env: ArbiterEnv, tmp_path: Path,
                                                pki: Pki) -> None:
    web = _web_config(tmp_path / "web.yml", (
        f"tls_server_config:\n  cert_file: {pki.server_cert.name}\n"
        f"  key_file: {pki.server_key.name}\n"
        f"basic_auth_users:\n  prometheus: '{_hash(PASSWORD)}'\n"))
    for name in ("server.crt", "server.key"):
        shutil.copy(pki.dir / name, tmp_path / name)  # relative paths: beside the file

    async def body() -> None:
        endpoint = await start_metrics(FakeArbiter(), env.audit, "0.0.0.0:0", "1.2.3",
                                       web_config_file=web)
        assert endpoint is not None
        try:
            port = int(endpoint.bound[0].rpartition(":")[2])
            tls = _client_context(pki)
            status, text = await asyncio.to_thread(_scrape, port, tls, f"prometheus:{PASSWORD}")
            assert status == 200 and 'agent_supervisor_build_info{version="1.2.3"}' in text
            promtool_check(text.encode())
            # Again: the verified credential is kept, so bcrypt is not paid per scrape.
            assert (await asyncio.to_thread(_scrape, port, tls, f"prometheus:{PASSWORD}")
                    )[0] == 200
            for auth in (None, "prometheus:wrong", f"nobody:{PASSWORD}", "prometheus"):
                status, text = await asyncio.to_thread(_scrape, port, tls, auth)
                assert status == 401 and "agent_supervisor" not in text
            with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
                await asyncio.to_thread(_scrape, port, None, f"prometheus:{PASSWORD}")
        finally:
            await endpoint.stop()

    asyncio.run(body())


def test_a_required_client_certificate_is_checked(env: ArbiterEnv, tmp_path: Path,
                                                  pki: Pki) -> None:
    web = _web_config(tmp_path / "web.yml", (
        f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
        f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca}\n"
        f"  min_version: TLS13\n"))

    async def body() -> None:
        endpoint = await start_metrics(FakeArbiter(), env.audit, "0.0.0.0:0", "1",
                                       web_config_file=web)
        assert endpoint is not None
        try:
            port = int(endpoint.bound[0].rpartition(":")[2])
            ok = _client_context(pki, (pki.client_cert, pki.client_key))
            assert (await asyncio.to_thread(_scrape, port, ok, None))[0] == 200
            for cert in (None, (pki.stranger_cert, pki.stranger_key)):
                with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                    await asyncio.to_thread(_scrape, port, _client_context(pki, cert), None)
        finally:
            await endpoint.stop()

    asyncio.run(body())
