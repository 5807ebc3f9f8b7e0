"""The egress pool carved between a daemon and CI mode's embedded run slots (config.py
`pool_share`, ci/runner.py `embedded_config`, egress/link.py AddressPool's share): a daemon's
runs take the pool's lower half, each slot one /30 of the upper half. Each process picks its
run's /30 before its link has the address (the gateway listens first), so the host-interface
check cannot keep two processes apart: their shares must. The real collision, two live runs on
one host: tests/e2e/test_ci_concurrent_gateways.py. No privilege."""

from __future__ import annotations

import re
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from pydantic import ValidationError

from supervisor.ci.runner import _MAX_SLOTS, embedded_config
from supervisor.config import Config, EgressSection, load_config, pool_share, slots_in_pool
from supervisor.egress import link
from supervisor.errors import ConfigInvalid, EgressSetupFailed

ROOT = Path("/run/agent-supervisor-ci")


def nothing_up() -> set[IPv4Network]:
    """No host interface has an address yet: every run is between picking its /30 and
    addressing its link."""
    return set()


def supervisor_pool(config: Config) -> link.AddressPool:
    """The pool a core of `config` draws from (daemon/egress.py EgressControl)."""
    return link.AddressPool(config.egress.pool, in_use=nothing_up, share=config.egress.share())


@pytest.mark.parametrize("cidr", ["10.213.0.0/16", "192.168.64.0/20", "172.16.0.0/24",
                                  "10.9.0.8/29"])
def test_the_daemon_takes_the_lower_half_and_each_slot_a_30_of_the_upper(cidr: str) -> None:
    pool = IPv4Network(cidr)
    lower, upper = pool.subnets(prefixlen_diff=1)
    assert pool_share(pool, None) == lower
    slots = [pool_share(pool, slot) for slot in range(slots_in_pool(pool))]
    assert len(slots) == pool.num_addresses // 8 >= 1
    assert len(set(slots)) == len(slots)  # one each
    for share in slots:
        assert share is not None and share.prefixlen == 30 and share.subnet_of(upper)
        assert not share.overlaps(lower)
    assert slots[0] == IPv4Network((int(upper.network_address), 30))
    assert slots[-1] == IPv4Network((int(upper.broadcast_address) - 3, 30))
    # Past the upper half, or not a slot at all: none.
    assert pool_share(pool, slots_in_pool(pool)) is None
    assert pool_share(pool, -1) is None


def test_the_default_pool_holds_every_slot_ci_mode_can_claim() -> None:
    default = IPv4Network(EgressSection().pool)
    assert slots_in_pool(default) >= _MAX_SLOTS
    assert pool_share(default, _MAX_SLOTS - 1) == IPv4Network("10.213.191.252/30")


def test_a_daemon_and_embedded_runs_of_one_host_never_pick_the_same_30() -> None:
    """Before the pool was carved, every slot's first gateway run and the daemon's picked the
    pool's first /30 (10.213.0.0/30) while no link had it yet, and the later gateway could not
    listen (EADDRINUSE, exit 125). Now each process draws from its own share, whatever the
    host shows at the moment it picks."""
    daemon = Config()
    daemon_pool = supervisor_pool(daemon)
    slot_pools = [supervisor_pool(embedded_config(daemon, ROOT, slot)) for slot in range(3)]
    picked = [daemon_pool.allocate().network for _ in range(4)]
    picked += [pool.allocate().network for pool in slot_pools]
    assert len(set(picked)) == len(picked), picked
    assert picked[:4] == [IPv4Network(f"10.213.0.{n}/30") for n in (0, 4, 8, 12)]
    assert picked[4:] == [IPv4Network(f"10.213.128.{n}/30") for n in (0, 4, 8)]


def test_a_slots_pool_holds_one_link_and_says_whose_share_is_exhausted() -> None:
    pool = supervisor_pool(embedded_config(Config(), ROOT, 5))
    assert pool.size() == 1
    first = pool.allocate()
    assert first.host_ip.exploded == "10.213.128.21"
    with pytest.raises(EgressSetupFailed, match=re.escape(
            "10.213.128.20/30, this supervisor's share")) as caught:
        pool.allocate()
    assert caught.value.detail["share"] == "10.213.128.20/30"
    assert caught.value.detail["pool"] == "10.213.0.0/16"
    pool.release(first)
    assert pool.allocate() == first


def test_a_share_outside_the_pool_is_refused() -> None:
    for share in ("10.214.0.0/30", "10.213.0.0/31", "10.0.0.0/8"):
        with pytest.raises(ValueError, match=re.escape(
                "is not a network of /30s in 10.213.0.0/16")):
            link.AddressPool("10.213.0.0/16", in_use=nothing_up, share=IPv4Network(share))


def test_a_slot_past_the_pool_is_refused_with_a_hint_naming_the_pool() -> None:
    """A /24 holds 32 slots in its upper half: slot 32 is refused before anything is made, as
    validating the narrowed configuration refuses it."""
    base = Config.model_validate({"egress": {"pool": "10.50.7.0/24"}})
    assert supervisor_pool(embedded_config(base, ROOT, 31)).allocate().host_ip.exploded == \
        "10.50.7.253"
    with pytest.raises(ConfigInvalid) as refused:
        embedded_config(base, ROOT, 32)
    error = refused.value
    assert error.code == "config_invalid" and error.detail["slot"] == 32
    assert error.detail["pool"] == "10.50.7.0/24"
    assert "slot 32 lies past egress pool 10.50.7.0/24" in error.message
    assert "holds 32 slot(s)" in error.detail["reason"]
    assert "[egress] pool" in (error.hint or "")
    with pytest.raises(ValidationError, match=re.escape(
            "slot 32 lies past egress pool 10.50.7.0/24")):
        EgressSection.model_validate({"pool": "10.50.7.0/24", "ci_slot": 32})
    with pytest.raises(ValidationError):
        EgressSection.model_validate({"ci_slot": -1})


def test_a_configuration_file_cannot_set_the_slot(tmp_path: Path) -> None:
    """A daemon given a slot would take that slot's addresses from CI mode's half."""
    path = tmp_path / "daemon.toml"
    path.write_text("[egress]\npool = '10.213.0.0/16'\nci_slot = 0\n")
    with pytest.raises(ConfigInvalid) as refused:
        load_config(path)
    assert refused.value.detail["key"] == "egress.ci_slot"
    assert "set by CI mode" in refused.value.detail["reason"]
    assert refused.value.detail["errors"] == [
        {"path": str(path), "key": "egress.ci_slot", "reason": refused.value.detail["reason"]}]
