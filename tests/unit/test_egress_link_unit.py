"""The pure parts of the egress link and its nftables table: address arithmetic, names and the
ruleset text. The host-address check is replaced through AddressPool's `in_use` seam; nothing
here talks to the kernel. No privilege."""

from __future__ import annotations

import ipaddress
import re
import threading
from ipaddress import IPv4Address, IPv4Network

import pytest

from supervisor.egress import link, nft
from supervisor.errors import EgressSetupFailed


def pool(cidr: str, *taken: str) -> link.AddressPool:
    networks = {IPv4Network(n, strict=False) for n in taken}
    return link.AddressPool(cidr, in_use=lambda: set(networks))


# ----------------------------------------------------------------------------- AddressPool


def test_allocates_consecutive_slash30s_with_host_first_and_sandbox_second() -> None:
    addresses = pool("10.213.0.0/16")
    first, second = addresses.allocate(), addresses.allocate()
    assert first == link.LinkAddresses(IPv4Address("10.213.0.1"), IPv4Address("10.213.0.2"), 30)
    assert first.network == IPv4Network("10.213.0.0/30")
    assert (second.host_ip, second.sandbox_ip) == (IPv4Address("10.213.0.5"),
                                                   IPv4Address("10.213.0.6"))
    assert second.network == IPv4Network("10.213.0.4/30")


def test_size_counts_slash30s() -> None:
    assert pool("10.213.0.0/16").size() == 16384
    assert pool("192.168.7.0/24").size() == 64
    assert pool("172.16.0.8/29").size() == 2


def test_skips_slash30s_that_overlap_a_host_interface() -> None:
    # A leftover link's host end, and a LAN the host sits on, inside the pool.
    addresses = pool("10.213.0.0/16", "10.213.0.1/30", "10.213.0.9/29", "192.0.2.2/24")
    got = [addresses.allocate().network for _ in range(2)]
    assert got == [IPv4Network("10.213.0.4/30"), IPv4Network("10.213.0.16/30")]


def test_a_host_network_that_covers_the_pool_leaves_nothing_free() -> None:
    addresses = pool("10.213.0.0/24", "10.0.0.5/8")
    with pytest.raises(EgressSetupFailed) as caught:
        addresses.allocate()
    assert caught.value.code == "egress_setup_failed"
    assert caught.value.detail["host_networks"] == ["10.0.0.0/8"]


def test_rechecks_the_host_on_every_allocation() -> None:
    taken: set[IPv4Network] = set()
    addresses = link.AddressPool("10.213.0.0/16", in_use=lambda: set(taken))
    first = addresses.allocate()
    addresses.release(first)
    taken.add(IPv4Network("10.213.0.0/30"))  # someone else assigned it meanwhile
    assert addresses.allocate().network == IPv4Network("10.213.0.4/30")


def test_exhaustion_raises_and_release_makes_room() -> None:
    addresses = pool("10.213.0.0/29")
    first, second = addresses.allocate(), addresses.allocate()
    with pytest.raises(EgressSetupFailed, match="exhausted") as caught:
        addresses.allocate()
    assert caught.value.detail["step"] == "allocate"
    addresses.release(first)
    assert addresses.allocate() == first
    addresses.release(second)
    addresses.release(second)  # releasing twice is harmless
    assert addresses.allocate() == second


def test_concurrent_allocations_never_hand_out_one_slash30_twice() -> None:
    addresses = pool("10.213.0.0/22")
    got: list[link.LinkAddresses] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(16):
            one = addresses.allocate()
            with lock:
                got.append(one)

    workers = [threading.Thread(target=take) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(got) == 128
    assert len({one.network for one in got}) == 128


@pytest.mark.parametrize(("cidr", "reason"), [
    ("bogus", "not a network"),
    ("10.213.0.1/16", "not a network"),  # host bits set: a typo, not a pool
    ("fd00::/64", "IPv4"),
    ("8.8.8.0/24", "private"),
    ("127.0.0.0/16", "private"),
    ("169.254.0.0/16", "private"),
    ("100.64.0.0/16", "private"),
    ("10.0.0.0/8", "/16 to /29"),
    ("10.213.0.0/30", "/16 to /29"),
])
def test_rejects_pools_that_are_not_private_ipv4_of_a_usable_size(cidr: str,
                                                                  reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)) as caught:
        link.AddressPool(cidr, in_use=set)
    assert cidr in str(caught.value)


def test_link_addresses_of_a_network() -> None:
    one = link.LinkAddresses.of(IPv4Network("10.9.8.4/30"))
    assert one.host_ip == ipaddress.ip_address("10.9.8.5")
    assert one.sandbox_ip == ipaddress.ip_address("10.9.8.6")
    assert one.prefixlen == 30
    assert one.network == IPv4Network("10.9.8.4/30")


# ----------------------------------------------------------------------------- names


def test_host_ifname_is_deterministic_short_and_prefixed() -> None:
    name = link.host_ifname("as-coder-0001")
    assert name == link.host_ifname("as-coder-0001")
    assert name != link.host_ifname("as-coder-0002")
    assert len(name) == 15
    assert re.fullmatch(r"asg[0-9a-f]{12}", name)
    assert len(link.host_ifname("x" * 500)) == 15


def test_table_name_carries_the_prefix_and_is_a_valid_nft_identifier() -> None:
    assert nft.table_name("as", "run-1") == "as.run-1"
    assert nft.table_name("as-test", "r 1;delete table ip x") == "as-test.r_1_delete_table_ip_x"
    for name in (nft.table_name("as", "a/b\\c.d"), nft.table_name("as", "Ω")):
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", name)
        assert name.count(".") == 1


@pytest.mark.parametrize(("prefix", "run_id"), [
    ("", "r1"), ("1as", "r1"), ("-as", "r1"), ("as", "r" * 300),
])
def test_table_name_rejects_what_nft_would_not_parse(prefix: str, run_id: str) -> None:
    with pytest.raises(ValueError):
        nft.table_name(prefix, run_id)


def test_tables_with_prefix_lists_only_this_daemons_tables(
        monkeypatch: pytest.MonkeyPatch) -> None:
    present = ["as.r1", "as-test.r2", "asx.r3", "as.r0", "filter", "as_r4"]
    monkeypatch.setattr(nft, "_tables", lambda: list(present))
    assert nft.tables_with_prefix("as") == ["as.r0", "as.r1"]
    assert nft.tables_with_prefix("as-test") == ["as-test.r2"]
    assert nft.table_name("as", "") == "as."
    assert nft.tables_with_prefix(nft.table_name("as", "")) == ["as.r0", "as.r1"]


# ----------------------------------------------------------------------------- ruleset


def rule_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def test_ruleset_accepts_only_the_gateway_port_and_drops_the_rest() -> None:
    text = nft.ruleset("as.r1", "asg0123456789ab", IPv4Address("10.213.0.1"), 8443)
    assert rule_lines(text) == [
        "add table inet as.r1",
        "delete table inet as.r1",
        "table inet as.r1 {",
        "chain input {",
        "type filter hook input priority filter - 10; policy accept;",
        'iifname "asg0123456789ab" ip daddr 10.213.0.1 tcp dport 8443 accept',
        'iifname "asg0123456789ab" counter drop',
        "}",
        "chain forward {",
        "type filter hook forward priority filter - 10; policy accept;",
        'iifname "asg0123456789ab" counter drop',
        'oifname "asg0123456789ab" counter drop',
        "}",
        "}",
    ]


@pytest.mark.parametrize(("table", "ifname", "port"), [
    ("as.r1", 'asg" accept #', 8443),
    ("as.r1", "", 8443),
    ("as.r1", "a" * 16, 8443),
    ("as.r1", "asg0", 0),
    ("as.r1", "asg0", 65536),
    ("as.r1 { }", "asg0", 8443),
    ("1as", "asg0", 8443),
    ("as.", "asg0", 8443),  # table_name(prefix, ""): a prefix, not a run's table
    ("as", "asg0", 8443),
])
def test_ruleset_refuses_input_that_could_change_its_meaning(table: str, ifname: str,
                                                             port: int) -> None:
    with pytest.raises(ValueError):
        nft.ruleset(table, ifname, IPv4Address("10.213.0.1"), port)
