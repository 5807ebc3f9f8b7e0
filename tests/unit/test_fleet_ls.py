"""`agentctl fleet ls`: each live host's lease with the time it has left (etcd
LeaseTimeToLive), and a registration cut at REGISTRATION_AGENTS_MAX agents saying so, on the
daemon's side (the registration it publishes) and in the table and --json. The store replaced
at its seams (the CLI's registrations read and its etcd client)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from supervisor.daemon.fleet import FleetMember
from supervisor.errors import FleetPermissionDenied
from supervisor.fleet.model import REGISTRATION_AGENTS_MAX, Registration


def _registration(count: int) -> Registration:
    member: Any = object.__new__(FleetMember)
    member.config = SimpleNamespace(host_id="h1", labels={"zone": "a"})
    member.arbiter = SimpleNamespace(
        agents={f"a{i:05d}": SimpleNamespace(name=f"a{i:05d}", agent_class="web",
                                             state="active") for i in range(count)},
        global_halt=False)
    member.holds = {}
    member.started_at = 1.0
    return Registration.model_validate_json(member._registration())


def test_a_registration_cut_at_the_limit_says_so_and_one_within_it_does_not() -> None:
    whole = _registration(3)
    assert (len(whole.agents), whole.agents_total, whole.agents_truncated) == (3, 3, False)
    at_limit = _registration(REGISTRATION_AGENTS_MAX)
    assert not at_limit.agents_truncated
    assert at_limit.agents_total == REGISTRATION_AGENTS_MAX
    cut = _registration(REGISTRATION_AGENTS_MAX + 5)
    assert len(cut.agents) == REGISTRATION_AGENTS_MAX
    assert cut.agents_total == REGISTRATION_AGENTS_MAX + 5 and cut.agents_truncated
    assert cut.agents[0].name == "a00000"  # in name order: the same agents every time


class _Etcd:
    def __init__(self) -> None:
        self.asked: list[int] = []

    def get_prefix(self, _prefix: str) -> tuple[list[Any], int]:
        return [], 1

    def lease_ttl(self, lease: int) -> tuple[int, int]:
        self.asked.append(lease)
        if lease == 3:
            raise FleetPermissionDenied("etcd denied 'operator' on /v3/lease/timetolive")
        return {1: (7, 10), 2: (-1, 10)}[lease]


def _host(name: str, lease: int | None, agents: int, total: int | None = None
          ) -> dict[str, Any]:
    reg: dict[str, Any] = {
        "host": name, "version": "1", "labels": {}, "started_at": 1.0, "updated_at": 2.0,
        "agents": [{"name": f"{name}-{i}", "agent_class": "web", "state": "active"}
                   for i in range(agents)]}
    if total is not None:
        reg.update(agents_total=total, agents_truncated=True)
    host = {"host": name, "alive": lease is not None, "acks": {}, "anchors": [],
            "partition": None}
    if lease is not None:
        host.update(registration=reg, lease=lease)
    return host


def test_fleet_ls_shows_each_lease_s_time_left_and_a_cut_agent_list(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from supervisor.cli import fleet as cli
    etcd = _Etcd()
    # h1 whole, h2's lease gone in the store between the two reads, h3's TTL not readable
    # with these credentials, h4 cut at the limit, h5 not alive.
    hosts = {h["host"]: h for h in (_host("h1", 1, 2), _host("h2", 2, 1), _host("h3", 3, 1),
                                    _host("h4", 4, 3, total=12), _host("h5", None, 0))}
    etcd_of = {4: (9, 10)}
    monkeypatch.setattr(cli, "_hosts", lambda *_a, **_k: hosts)
    monkeypatch.setattr(cli.FleetContext, "etcd", property(lambda _self: etcd))
    monkeypatch.setattr(etcd, "lease_ttl", lambda lease, ask=etcd.lease_ttl:
                        etcd_of[lease] if lease in etcd_of else ask(lease))
    password = tmp_path / "password"
    password.write_text("x")
    base = ["--endpoints", "127.0.0.1:1", "--ca", "ca", "--cert", "c", "--key", "k", "--user",
            "operator", "--password-file", str(password)]
    runner = CliRunner()
    as_json = runner.invoke(cli.fleet, [*base, "ls", "--json"])
    assert as_json.exit_code == 0, as_json.output
    rows = {r["host"]: r for r in json.loads(as_json.output)["hosts"]}
    assert (rows["h1"]["lease_ttl_left_s"], rows["h1"]["lease_ttl_granted_s"]) == (7, 10)
    assert rows["h2"]["lease_ttl_left_s"] == 0
    assert rows["h3"]["lease_ttl_left_s"] is None and "denied" in rows["h3"]["lease_error"]
    assert rows["h5"]["lease_ttl_left_s"] is None and "lease_error" not in rows["h5"]
    assert sorted(etcd.asked) == [1, 2, 3]  # h5 has no lease to ask about
    assert (rows["h4"]["agents_total"], rows["h4"]["agents_truncated"]) == (12, True)
    assert (rows["h1"]["agents_total"], rows["h1"]["agents_truncated"]) == (2, False)

    table = runner.invoke(cli.fleet, [*base, "ls"])
    assert table.exit_code == 0, table.output
    hosts_table = table.output.split("\n\n")[0]  # the agents' table follows a blank line
    lines = {line.split()[0]: line for line in hosts_table.splitlines() if line.strip()}
    assert "LEASE LEFT" in lines["HOST"]
    assert "7s/10s" in lines["h1"] and "0s/10s" in lines["h2"]
    assert lines["h3"].split()[4] == "?" and lines["h5"].split()[4] == "-"
    assert "3 of 12 (cut)" in lines["h4"]
    assert "h4: its registration lists 3 of its 12 agents" in table.output


def test_a_scope_is_not_refused_as_empty_on_a_host_whose_agent_list_was_cut() -> None:
    """An agent past the registration's limit is not listed: agentctl cannot tell that a
    --agent or --class reaches nothing there, so it writes the action (fail closed)."""
    from supervisor.cli.fleet import scope_error
    from supervisor.fleet.model import Selector
    whole = _host("h1", 1, 2)
    assert scope_error(Selector(agent="beyond"), {"h1": whole}) is not None
    assert scope_error(Selector(agent_class="batch"), {"h1": whole}) is not None
    cut = _host("h1", 1, 2, total=REGISTRATION_AGENTS_MAX + 1)
    assert scope_error(Selector(agent="beyond"), {"h1": cut}) is None
    assert scope_error(Selector(agent_class="batch"), {"h1": cut}) is None
