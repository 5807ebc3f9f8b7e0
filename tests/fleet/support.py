"""A fleet on one machine for tests and the benchmark: a bridge, one network namespace per
member (etcd and each daemon) on veths of our own prefix, a CA with server and client
certificates made with `cryptography`, an etcd with TLS, client-certificate auth and users
and roles, and daemons started inside their namespaces. Needs root. Everything it makes is
named `asf<tag>...` and removed by `Fleet.close()`."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.fleet.etcd import Credentials, Etcd
from supervisor.fleet.model import Keys
from tests.support.daemon import Daemon, new_daemon

PREFIX = "/agent-supervisor/fleet/"
ETCD_PORT = 2379


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class Pki:
    root: Path

    def __post_init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        self._x509, self._hashes, self._ser, self._ec, self._oid = (
            x509, hashes, serialization, ec, NameOID)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.ca_cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.ca_key, hashes.SHA256()))
        self.ca_file = self.root / "ca.pem"
        self.ca_file.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, ips: list[str] | None = None) -> tuple[Path, Path]:
        x509, hashes, ser, ec, oid = (self._x509, self._hashes, self._ser, self._ec, self._oid)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            # No CommonName: etcd's JSON gateway refuses (400) a client certificate that has
            # one when --client-cert-auth is on, since it could not use it as the user; the
            # user comes from the token of the etcd user instead.
            .subject_name(x509.Name([x509.NameAttribute(oid.ORGANIZATION_NAME, name)]))
            .issuer_name(self.ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False))
        if ips:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_file, key_file = self.root / f"{name}.pem", self.root / f"{name}-key.pem"
        cert_file.write_bytes(cert.public_bytes(ser.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                               ser.NoEncryption()))
        key_file.chmod(0o600)
        return cert_file, key_file


@dataclass
class Member:
    name: str
    netns: str
    veth: str  # host side, on the bridge
    ip: str


@dataclass
class Host:
    host_id: str
    member: Member
    daemon: Daemon
    password: str
    cert: tuple[Path, Path]
    labels: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        self.daemon.start(timeout=120.0)

    def creds(self, fleet: Fleet) -> Credentials:
        return fleet.credentials(self.host_id, self.password, self.cert)


class Fleet:
    """The bridge, etcd and the hosts. `close()` undoes all of it (also after a failure)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tag = secrets.token_hex(2)
        self.name = f"asf{self.tag}"
        self.subnet = f"10.{200 + int(self.tag[:2], 16) % 50}.{int(self.tag[2:], 16)}"
        self.bridge = f"{self.name}br"
        self.members: list[Member] = []
        self.hosts: list[Host] = []
        self.pki = Pki(root / "pki")
        self.etcd_proc: subprocess.Popen[bytes] | None = None
        # On tmpfs: the machine's disk is shared with every other test, and etcd fsyncs each
        # write; the tests are about the fleet's behaviour, not the disk's latency.
        self.etcd_data = Path(tempfile.mkdtemp(prefix=f"{self.name}-etcd-", dir="/dev/shm"))
        self.keys = Keys(PREFIX)
        self.root_password = secrets.token_hex(8)
        self.operator_password = secrets.token_hex(8)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self.etcd_member = self._member("etcd", 2)
        self.etcd_server = self.pki.issue("etcd-server", [self.etcd_member.ip])
        self.operator_cert = self.pki.issue("operator")
        self.root_cert = self.pki.issue("root")

    # ------------------------------------------------------------------ network

    def _member(self, name: str, octet: int) -> Member:
        netns = f"{self.name}-{name}"
        veth = f"{self.name}{name}"[:15]
        peer = f"{self.name}p{name}"[:15]
        _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", netns)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        ip = f"{self.subnet}.{octet}"
        _ip("-n", netns, "addr", "add", f"{ip}/24", "dev", peer)
        _ip("-n", netns, "link", "set", peer, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        member = Member(name=name, netns=netns, veth=veth, ip=ip)
        self.members.append(member)
        return member

    def link(self, member: Member, up: bool) -> None:
        """A partition: the member's cable pulled (or put back)."""
        _ip("link", "set", member.veth, "up" if up else "down")

    # ------------------------------------------------------------------ etcd

    @property
    def endpoint(self) -> str:
        return f"{self.etcd_member.ip}:{ETCD_PORT}"

    def start_etcd(self) -> None:
        cert, key = self.etcd_server
        url = f"https://{self.endpoint}"
        log = open(self.root / "etcd.log", "ab")  # noqa: SIM115 - handed to the child
        # nsenter --net only: the daemons' and etcd's mount namespace (and /sys/fs/cgroup)
        # stay the host's, which `ip netns exec` would remount.
        self.etcd_proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.etcd_member.netns}", "etcd",
             "--name", self.name, "--data-dir", str(self.etcd_data),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", "http://127.0.0.1:2380",
             "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
             "--initial-cluster", f"{self.name}=http://127.0.0.1:2380",
             "--cert-file", str(cert), "--key-file", str(key),
             "--trusted-ca-file", str(self.pki.ca_file), "--client-cert-auth",
             "--auth-token", "simple", "--log-level", "warn", "--logger", "zap"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.etcd_proc.poll() is not None:
                raise RuntimeError("etcd exited:\n" + (self.root / "etcd.log").read_text())
            try:
                with self._bootstrap_client() as probe:
                    status, _ = probe._raw("/v3/maintenance/status", {}, None)
                if status == 200:
                    return
            except Exception:
                pass
            time.sleep(0.1)
        raise RuntimeError("etcd not ready:\n" + (self.root / "etcd.log").read_text())

    def stop_etcd(self) -> None:
        if self.etcd_proc is not None and self.etcd_proc.poll() is None:
            self.etcd_proc.terminate()
            try:
                self.etcd_proc.wait(15)
            except subprocess.TimeoutExpired:
                self.etcd_proc.kill()
                self.etcd_proc.wait()

    def credentials(self, user: str, password: str, cert: tuple[Path, Path]) -> Credentials:
        return Credentials(endpoints=(self.endpoint,), ca_file=self.pki.ca_file,
                           cert_file=cert[0], key_file=cert[1], user=user, password=password)

    def _bootstrap_client(self) -> Etcd:
        return Etcd(self.credentials("root", self.root_password, self.root_cert))

    def root_client(self) -> Etcd:
        return Etcd(self.credentials("root", self.root_password, self.root_cert))

    def operator_client(self) -> Etcd:
        return Etcd(self.credentials("operator", self.operator_password,
                                     self.operator_cert))

    def setup_auth(self, host_ids: list[str], passwords: dict[str, str]) -> None:
        """The roles of docs/fleet.md, made through the same gateway calls etcdctl makes."""
        from supervisor.fleet.etcd import b64, prefix_end
        with self._bootstrap_client() as root:
            self._setup_auth(root, host_ids, passwords, b64, prefix_end)

    def enrol(self, host: Host) -> None:
        """A host that joins the fleet later: its etcd user and role, made by root with auth on
        (what an operator runs with etcdctl before the host's first start)."""
        from supervisor.fleet.etcd import b64, prefix_end
        with self.root_client() as root:
            self._setup_auth(root, [host.host_id], {host.host_id: host.password}, b64,
                             prefix_end, hosts_only=True)

    def _setup_auth(self, root: Etcd, host_ids: list[str], passwords: dict[str, str],
                    b64: Any, prefix_end: Any, hosts_only: bool = False) -> None:

        def unauth(path: str, body: dict[str, Any]) -> None:
            if hosts_only:  # auth is on: as root
                root.call(path, body)
                return
            status, answer = root._raw(path, body, None)
            if status != 200:
                raise RuntimeError(f"{path}: {answer}")

        def grant(role: str, key: str, kind: str, prefix: bool = True) -> None:
            perm = {"permType": kind, "key": b64(key)}
            if prefix:
                perm["range_end"] = b64(prefix_end(key))
            unauth("/v3/auth/role/grant", {"name": role, "perm": perm})

        if not hosts_only:
            unauth("/v3/auth/user/add", {"name": "root", "password": self.root_password})
            unauth("/v3/auth/role/add", {"name": "root"})
            unauth("/v3/auth/user/grant", {"user": "root", "role": "root"})
            unauth("/v3/auth/role/add", {"name": "fleet-operator"})
            grant("fleet-operator", self.keys.prefix, "READ")
            grant("fleet-operator", self.keys.control, "READWRITE")
            unauth("/v3/auth/user/add", {"name": "operator",
                                         "password": self.operator_password})
            unauth("/v3/auth/user/grant", {"user": "operator", "role": "fleet-operator"})
        for host in host_ids:
            role = f"fleet-host-{host}"
            unauth("/v3/auth/role/add", {"name": role})
            grant(role, self.keys.control, "READ")
            grant(role, self.keys.host(host), "READWRITE")
            grant(role, self.keys.registration(host), "READWRITE", prefix=False)
            unauth("/v3/auth/user/add", {"name": host, "password": passwords[host]})
            unauth("/v3/auth/user/grant", {"user": host, "role": role})
        if not hosts_only:
            unauth("/v3/auth/enable", {})

    # ------------------------------------------------------------------ hosts

    def add_host(self, index: int, labels: dict[str, str] | None = None,
                 fleet_extra: dict[str, Any] | None = None) -> Host:
        host_id = f"h{index}"
        member = self._member(host_id, 10 + index)
        password = secrets.token_hex(8)
        cert = self.pki.issue(host_id)
        secret = self.root / f"{host_id}.password"
        secret.write_text(password)
        secret.chmod(0o600)
        fleet: dict[str, Any] = {
            "host_id": host_id, "endpoints": [self.endpoint], "ca_file": str(self.pki.ca_file),
            "cert_file": str(cert[0]), "key_file": str(cert[1]), "user": host_id,
            "password_file": str(secret), "prefix": PREFIX, "labels": labels or {},
            "lease_ttl": "4s", "reread_interval": "2s", "anchor_interval": "2s",
        }
        fleet.update(fleet_extra or {})
        # No start-up canary: the self-test is the e2e tier's subject, and here it would add
        # seconds to each of the tier's eight daemon starts on a loaded machine.
        daemon = new_daemon(self.root, fleet=fleet, daemon={"self_test": False})
        daemon.launcher = ["nsenter", f"--net=/run/netns/{member.netns}"]
        host = Host(host_id=host_id, member=member, daemon=daemon, password=password,
                    cert=cert, labels=labels or {})
        self.hosts.append(host)
        return host

    def remove_host(self, host: Host) -> None:
        """A host added by one test leaves the fleet for the next, as docs/fleet.md has an
        operator retire one: its daemon stopped (which revokes its lease, so it is no longer
        a live member), its keys, etcd user and role deleted (else `fleet audit verify`
        reports it unchecked for ever), its cgroups, namespace and veth removed, and it is
        no longer among `hosts`."""
        with contextlib.suppress(Exception):
            host.daemon.stop()
        with contextlib.suppress(Exception):
            host.daemon.cleanup_host()
        with contextlib.suppress(Exception), self.root_client() as root:
            root.delete_prefix(self.keys.host(host.host_id))
            root.call("/v3/auth/user/delete", {"name": host.host_id})
            root.call("/v3/auth/role/delete", {"role": f"fleet-host-{host.host_id}"})
        if host in self.hosts:
            self.hosts.remove(host)
        if host.member in self.members:
            self.members.remove(host.member)
            _ip("link", "del", host.member.veth, check=False)
            _ip("netns", "del", host.member.netns, check=False)

    def agentctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """agentctl fleet as the operator, from the host namespace (the bridge's side)."""
        secret = self.root / "operator.password"
        if not secret.exists():
            secret.write_text(self.operator_password)
            secret.chmod(0o600)
        env = {**os.environ,
               "AGENT_SUPERVISOR_FLEET_ENDPOINTS": self.endpoint,
               "AGENT_SUPERVISOR_FLEET_CA": str(self.pki.ca_file),
               "AGENT_SUPERVISOR_FLEET_CERT": str(self.operator_cert[0]),
               "AGENT_SUPERVISOR_FLEET_KEY": str(self.operator_cert[1]),
               "AGENT_SUPERVISOR_FLEET_USER": "operator",
               "AGENT_SUPERVISOR_FLEET_PASSWORD_FILE": str(secret),
               "AGENT_SUPERVISOR_FLEET_PREFIX": PREFIX}
        return subprocess.run([sys.executable, "-m", "supervisor.cli", "fleet", *args],
                              env=env, capture_output=True, text=True, timeout=timeout)

    def agentctl_json(self, *args: str, timeout: float = 60) -> tuple[int, Any]:
        result = self.agentctl(*args, "--json", timeout=timeout)
        try:
            return result.returncode, json.loads(result.stdout)
        except ValueError:
            raise AssertionError(f"agentctl fleet {args}: {result.returncode}\n"
                                 f"{result.stdout}\n{result.stderr}") from None

    def close(self) -> None:
        def stop(host: Host) -> None:
            with contextlib.suppress(Exception):
                host.daemon.stop()
            with contextlib.suppress(Exception):
                host.daemon.cleanup_host()

        # All at once: each daemon's shutdown kills its agents and flushes to the store.
        if self.hosts:
            with ThreadPoolExecutor(len(self.hosts)) as pool:
                list(pool.map(stop, self.hosts))
        self.stop_etcd()
        for member in self.members:
            _ip("link", "del", member.veth, check=False)
            _ip("netns", "del", member.netns, check=False)
        _ip("link", "del", self.bridge, check=False)
        shutil.rmtree(self.etcd_data, ignore_errors=True)


@contextlib.contextmanager
def fleet_of(root: Path, count: int, labels: list[dict[str, str]] | None = None,
             fleet_extra: list[dict[str, Any]] | None = None) -> Iterator[Fleet]:
    fleet = Fleet(root)
    try:
        hosts = [fleet.add_host(i + 1, (labels or [{}] * count)[i],
                                (fleet_extra or [{}] * count)[i]) for i in range(count)]
        fleet.start_etcd()
        fleet.setup_auth([h.host_id for h in hosts], {h.host_id: h.password for h in hosts})
        yield fleet
    finally:
        fleet.close()
