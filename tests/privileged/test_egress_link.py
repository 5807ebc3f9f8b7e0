"""Network mode `gateway` against the real kernel: a run's veth and nftables table let the
namespace reach the gateway's one address and port and nothing else. Probes run from inside
the namespace (`ip netns exec`, a fork of the test, never of daemon code). Needs root, nft and
ip. Every namespace, link and table made here has a name of this test's own and is removed
afterwards, whatever happens; nothing else on the host is touched."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from supervisor.egress import link, nft
from supervisor.errors import EgressSetupFailed
from supervisor.sandbox import netns
from tests.conftest import require

PREFIX = "astlink"
BLOCKED_TIMEOUT = 1.0  # an nft drop shows as a timeout; short, nothing is measured
REACHABLE_TIMEOUT = 5.0
WAIT = 10.0

PROBE = r"""
import errno, json, socket, sys
out = {}
def attempt(name, fn):
    try:
        out[name] = {"ok": True, "value": fn()}
    except socket.timeout:
        out[name] = {"ok": False, "errno": None, "error": "timeout"}
    except OSError as exc:
        out[name] = {"ok": False, "errno": exc.errno,
                     "error": errno.errorcode.get(exc.errno, str(exc))}
def tcp(host, port, timeout):
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"ping")
        return s.recv(16).decode()
def udp(host, port, timeout):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(b"ping", (host, port))
        return s.recvfrom(16)[0].decode()
for name, kind, host, port, timeout in json.loads(sys.argv[1]):
    attempt(name, lambda: (tcp if kind == "tcp" else udp)(host, port, timeout))
out["ipv6_on_eth0"] = [l.split()[0] for l in open("/proc/net/if_inet6") if l.split()[-1] == "eth0"]
print(json.dumps(out))
"""

FAR_SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 0)); s.listen(8)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    with c:
        c.sendall(c.recv(16))
"""


@pytest.fixture(autouse=True)
def _tools() -> None:
    require(shutil.which("nft") is not None, "needs nft (apt-get install nftables)")
    require(shutil.which("ip") is not None, "needs ip (apt-get install iproute2)")


@dataclass
class Scratch:
    """Names this test made; the fixture removes all of them, in reverse order of layers."""

    token: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    closers: list[Any] = field(default_factory=list)

    def pool(self) -> link.AddressPool:
        # A random /24 of our own, so parallel or leftover runs of this test rarely meet (and
        # the pool skips whatever is on the host anyway).
        return link.AddressPool(f"10.231.{secrets.randbelow(256)}.0/24")

    def namespace(self, role: str) -> str:
        name = f"{PREFIX}-{self.token}-{role}"
        netns.create(name)
        self.namespaces.append(name)
        return name

    def attach(self, role: str, addresses: link.LinkAddresses) -> tuple[str, str]:
        name = self.namespace(role)
        ifname = link.host_ifname(name)
        self.links.append(ifname)
        link.attach(name, ifname, addresses)
        return name, ifname

    def table(self, run: str) -> str:
        name = nft.table_name(f"{PREFIX}-{self.token}", run)
        self.tables.append(name)
        return name

    def cleanup(self) -> None:
        errors: list[BaseException] = []
        for step in ([c.close for c in self.closers]
                     + [lambda t=t: nft.remove(t) for t in self.tables]
                     + [lambda i=i: link.detach(i) for i in self.links]
                     + [lambda n=n: netns.remove(n) for n in self.namespaces]):
            try:
                step()
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def scratch() -> Iterator[Scratch]:
    made = Scratch()
    try:
        yield made
    finally:
        made.cleanup()


class Listener:
    """A TCP or UDP echo server on the host, answering "ping" with "ping"."""

    def __init__(self, kind: str, host: str, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET,
                                  socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port: int = self.sock.getsockname()[1]
        self.kind = kind
        if kind == "tcp":
            self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while True:
                if self.kind == "tcp":
                    conn, _ = self.sock.accept()
                    with conn:
                        conn.settimeout(WAIT)
                        conn.sendall(conn.recv(16))
                else:
                    data, peer = self.sock.recvfrom(16)
                    if peer is None:  # shut down by close()
                        return
                    self.sock.sendto(data, peer)
        except OSError:
            return  # closed by the test

    def close(self) -> None:
        # shutdown wakes the thread blocked in accept/recvfrom; close alone does not.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(WAIT)


def probe(namespace: str, *checks: tuple[str, str, str, int, float]) -> dict[str, Any]:
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", PROBE, json.dumps(checks)],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def host_address() -> str | None:
    """An IPv4 address of a real interface of the host (not loopback, not ours), if any."""
    out = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True,
                         check=True).stdout
    for iface in json.loads(out):
        if iface["ifname"] == "lo" or iface["ifname"].startswith(link.IFNAME_PREFIX):
            continue
        for info in iface.get("addr_info", []):
            return str(info["local"])
    return None


def dropped(table: str, chain: str) -> int:
    """Packets counted by the drop rules of one chain of our table."""
    out = subprocess.run(["nft", "-j", "list", "table", "inet", table], capture_output=True,
                         text=True, check=True).stdout
    total = 0
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if rule and rule["chain"] == chain:
            total += sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    return total


def nft_tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                          check=True).stdout


def test_the_namespace_reaches_the_gateway_port_and_nothing_else(scratch: Scratch) -> None:
    addresses = scratch.pool().allocate()
    name, ifname = scratch.attach("run", addresses)
    host_ip = str(addresses.host_ip)

    gateway = Listener("tcp", host_ip)
    other = Listener("tcp", host_ip)
    scratch.closers += [gateway, other]
    try:
        dns: Listener | None = Listener("udp", host_ip, 53)
        scratch.closers.append(dns)
    except OSError:
        dns = None  # :53 taken on this host: the probe then shows only that nothing answers
    checks = [
        ("gateway", "tcp", host_ip, gateway.port, REACHABLE_TIMEOUT),
        ("other_port", "tcp", host_ip, other.port, BLOCKED_TIMEOUT),
        ("dns", "udp", host_ip, 53, BLOCKED_TIMEOUT),
        ("off_link", "tcp", "192.0.2.1", 80, BLOCKED_TIMEOUT),
        ("off_link_dns", "udp", "192.0.2.53", 53, BLOCKED_TIMEOUT),
    ]
    elsewhere = host_address()
    if elsewhere is not None:
        checks.append(("host_elsewhere", "tcp", elsewhere, gateway.port, BLOCKED_TIMEOUT))

    # Without the table the listeners are all reachable: what fails below fails because of
    # the rules, not because a listener was missing.
    before = probe(name, *[(n, k, h, p, REACHABLE_TIMEOUT) for n, k, h, p, _ in checks[:3]])
    assert before["gateway"] == {"ok": True, "value": "ping"}
    assert before["other_port"] == {"ok": True, "value": "ping"}
    if dns is not None:
        assert before["dns"] == {"ok": True, "value": "ping"}

    table = scratch.table("r1")
    nft.install(table, ifname, addresses.host_ip, gateway.port)
    assert nft.exists(table)
    bytes_before, packets_before = link.counters(ifname)
    after = probe(name, *checks)
    bytes_after, packets_after = link.counters(ifname)
    # What telemetry's network_bytes reads: the probes' traffic, both ways, on the host end.
    assert bytes_after > bytes_before and packets_after > packets_before

    assert after["gateway"] == {"ok": True, "value": "ping"}
    assert after["other_port"]["ok"] is False
    assert after["dns"]["ok"] is False
    # No route but the connected /30: everything off-link fails at once, before any packet.
    assert after["off_link"] == {"ok": False, "errno": 101, "error": "ENETUNREACH"}
    assert after["off_link_dns"] == {"ok": False, "errno": 101, "error": "ENETUNREACH"}
    if elsewhere is not None:
        assert after["host_elsewhere"] == {"ok": False, "errno": 101, "error": "ENETUNREACH"}
    assert after["ipv6_on_eth0"] == []

    assert dropped(table, "input") > 0


def test_pause_takes_the_link_down_and_resume_brings_it_back(scratch: Scratch) -> None:
    addresses = scratch.pool().allocate()
    name, ifname = scratch.attach("run", addresses)
    gateway = Listener("tcp", str(addresses.host_ip))
    scratch.closers.append(gateway)
    nft.install(scratch.table("r1"), ifname, addresses.host_ip, gateway.port)
    reach = ("gateway", "tcp", str(addresses.host_ip), gateway.port, REACHABLE_TIMEOUT)

    assert probe(name, reach)["gateway"]["ok"] is True
    link.set_up(ifname, False)
    assert probe(name, (*reach[:4], BLOCKED_TIMEOUT))["gateway"]["ok"] is False
    link.set_up(ifname, True)
    assert probe(name, reach)["gateway"] == {"ok": True, "value": "ping"}


def test_the_host_never_routes_the_namespace_anywhere(scratch: Scratch) -> None:
    """Forwarding is switched on for our two links only (conf.<if>.forwarding, so the host's
    own setting is left alone) and the sandbox is given a route it would never have: the far
    namespace is reachable through the host until the table is installed, then not."""
    pool = scratch.pool()
    run_addresses, far_addresses = pool.allocate(), pool.allocate()
    name, ifname = scratch.attach("run", run_addresses)
    far, far_ifname = scratch.attach("far", far_addresses)
    for each in (ifname, far_ifname):
        Path(f"/proc/sys/net/ipv4/conf/{each}/forwarding").write_text("1")
    subprocess.run(["ip", "-n", name, "route", "add", str(far_addresses.network), "via",
                    str(run_addresses.host_ip)], check=True)
    subprocess.run(["ip", "-n", far, "route", "add", str(run_addresses.network), "via",
                    str(far_addresses.host_ip)], check=True)
    server = subprocess.Popen(
        ["ip", "netns", "exec", far, sys.executable, "-c", FAR_SERVER,
         str(far_addresses.sandbox_ip)], stdout=subprocess.PIPE, text=True)
    scratch.closers.append(_Stop(server))
    assert server.stdout is not None
    port = int(server.stdout.readline())
    target = ("far", "tcp", str(far_addresses.sandbox_ip), port, REACHABLE_TIMEOUT)

    assert probe(name, target)["far"] == {"ok": True, "value": "ping"}
    table = scratch.table("r1")
    nft.install(table, ifname, run_addresses.host_ip, 1)
    assert probe(name, (*target[:4], BLOCKED_TIMEOUT))["far"]["ok"] is False
    assert dropped(table, "forward") > 0


@dataclass
class _Stop:
    process: subprocess.Popen[str]

    def close(self) -> None:
        self.process.kill()
        self.process.wait(WAIT)
        if self.process.stdout is not None:
            self.process.stdout.close()


def test_teardown_leaves_no_table_link_or_namespace(scratch: Scratch) -> None:
    addresses = scratch.pool().allocate()
    name, ifname = scratch.attach("run", addresses)
    table = scratch.table("r1")
    nft.install(table, ifname, addresses.host_ip, 8443)
    nft.install(table, ifname, addresses.host_ip, 8443)  # a leftover is replaced, not doubled
    listing = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True,
                             text=True, check=True).stdout
    assert listing.count("tcp dport 8443 accept") == 1
    assert nft.tables_with_prefix(f"{PREFIX}-{scratch.token}") == [table]
    assert link.exists(ifname)

    assert nft.remove(table) is True
    assert link.detach(ifname) is True
    assert netns.remove(name) is True

    assert nft.remove(table) is False
    assert link.detach(ifname) is False
    assert not nft.exists(table)
    assert f"inet {table}\n" not in nft_tables()
    assert not link.exists(ifname)
    assert not netns.exists(name)
    assert nft.tables_with_prefix(f"{PREFIX}-{scratch.token}") == []


def test_two_pools_never_hand_out_an_address_already_on_the_host(scratch: Scratch) -> None:
    first_pool = scratch.pool()
    taken = first_pool.allocate()
    scratch.attach("run", taken)
    # Another daemon with the same pool, and this pool after forgetting the /30: both see the
    # address on the host end and pass over it.
    second_pool = link.AddressPool(str(first_pool.network))
    assert second_pool.allocate().network != taken.network
    first_pool.release(taken)
    assert first_pool.allocate().network != taken.network
    assert taken.network not in {first_pool.allocate().network for _ in range(4)}


def test_a_failed_attach_leaves_nothing_behind(scratch: Scratch) -> None:
    good = scratch.pool().allocate()
    name = scratch.namespace("run")
    ifname = link.host_ifname(name)
    scratch.links.append(ifname)
    # The veth is made, then the host address is refused: the link must be gone again.
    bad = link.LinkAddresses(good.host_ip, good.sandbox_ip, prefixlen=33)
    with pytest.raises(EgressSetupFailed) as caught:
        link.attach(name, ifname, bad)
    assert caught.value.detail["step"] == "host_address"
    assert caught.value.detail["errno"] is not None
    assert "undo_error" not in caught.value.detail
    assert not link.exists(ifname)
    inside = subprocess.run(["ip", "-n", name, "-o", "link"], capture_output=True, text=True,
                            check=True).stdout
    assert "eth0" not in inside

    # A namespace that does not exist: refused before anything is made.
    with pytest.raises(EgressSetupFailed) as missing:
        link.attach(f"{PREFIX}-{scratch.token}-absent", ifname, good)
    assert missing.value.detail["step"] == "open_netns"
    assert not link.exists(ifname)

    # The name is taken: EEXIST, and the existing link is not ours to undo.
    link.attach(name, ifname, good)
    with pytest.raises(EgressSetupFailed) as taken:
        link.attach(name, ifname, good)
    assert taken.value.detail["step"] == "create_veth"
    assert taken.value.detail["errno"] == 17
    assert link.exists(ifname)
    assert os.path.exists(f"/sys/class/net/{ifname}")
