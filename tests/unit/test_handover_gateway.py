"""The pieces of a gateway run's handover that need no root (issue 13): the record's gateway
entry is checked before anything is adopted, the copy of the record on disk has no token, a
run's /30 is held again by the next daemon, and the daemon's side of the gateway refuses what
it cannot hand over or take (the worker process is not started: its requests fail, as a dead
worker's do; e2e proves the real one)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from supervisor.daemon import handover
from supervisor.daemon.containment import Containment
from supervisor.daemon.egress import EgressControl, RunNetwork, _RunEgress
from supervisor.daemon.store import RunRecord
from supervisor.egress import link
from supervisor.egress.grant import RunGrant
from supervisor.errors import EgressSetupFailed
from supervisor.mcp.sandbox import RunServers, StdioServer
from supervisor.models.egress import GatewayPolicy
from supervisor.sandbox.cgroups import Cgroup
from tests.support.handover import record, run_entry
from tests.unit.conftest import ArbiterEnv

GATEWAY = {"ifname": "asgabc", "table": "ast_r1", "host_ip": "10.213.0.1",
           "sandbox_ip": "10.213.0.2", "prefixlen": 30, "port": 3128, "token": "tok",
           "expires_at": 2e9, "usage": {"requests": 2, "bytes": 0, "spend": 0.0, "tokens": 0,
                                        "denied": 0, "errors": 0},
           "breaker": None, "budget_fired": False, "denials": {}, "denial_rows": 0}


def _record(**gateway: Any) -> dict[str, Any]:
    return record(run_entry(seccomp_fds=[], gateway={**GATEWAY, **gateway}))


def test_a_record_with_a_gateway_entry_passes_the_check() -> None:
    handover.check_record(_record(), 1)
    handover.check_record(_record(breaker="open", expires_at=2_000_000_000), 1)


@pytest.mark.parametrize(("change", "key"), [
    ({"token": None}, "token"), ({"port": "3128"}, "port"), ({"port": True}, "port"),
    ({"budget_fired": 1}, "budget_fired"), ({"usage": []}, "usage"),
    ({"breaker": 1}, "breaker"), ({"expires_at": "soon"}, "expires_at"),
])
def test_a_malformed_gateway_entry_is_refused_before_anything_is_adopted(
        change: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=f"gateway {key}"):
        handover.check_record(_record(**change), 1)
    record = _record()
    record["runs"][0]["gateway"] = "r1"
    with pytest.raises(ValueError, match="gateway is not an object"):
        handover.check_record(record, 1)


MCP = {"gateway": {"calls": 3, "cost": 0.5, "per_server": {"files": 3},
                   "per_tool": {"files/echo": 1}, "sessions": [["sid-secret", "remote"]],
                   "next_ids": {"files": 4}},
       "rows": 3, "unrecorded": 0, "unrecorded_by_outcome": {}, "budget_fired": False,
       "stdio": [{"name": "files", "container_id": "as-r1-mcp0", "pid": 11, "host_uid": 1,
                  "fd": 1}]}


def test_a_record_with_stdio_mcp_servers_names_their_descriptors() -> None:
    handover.check_record(_record(mcp=MCP), 2)
    assert handover._stdio_fds(_record(mcp=MCP)["runs"][0]) == [1]


@pytest.mark.parametrize(("stdio", "nfds"), [
    ([{**MCP["stdio"][0], "fd": 0}], 2),  # the output pipe's
    ([{**MCP["stdio"][0], "fd": 2}], 2),  # not received
    ([{**MCP["stdio"][0], "fd": True}], 2),
    ([{k: v for k, v in MCP["stdio"][0].items() if k != "fd"}], 2),
    ([MCP["stdio"][0], MCP["stdio"][0]], 3),  # one descriptor for two servers
    ([{**MCP["stdio"][0], "fd": n} for n in range(1, 10)], 10),  # more than a profile has
    ("files", 2), (["files"], 2),
])
def test_a_malformed_stdio_entry_is_refused_before_anything_is_adopted(
        stdio: Any, nfds: int) -> None:
    with pytest.raises(ValueError, match=r"descriptor index|mcp\.stdio"):
        handover.check_record(_record(mcp={**MCP, "stdio": stdio}), nfds)


def test_the_record_on_disk_has_no_mcp_session_id(tmp_path: Path) -> None:
    message = _record(mcp=MCP)
    handover._write_record(tmp_path / "handover.json", message)
    text = (tmp_path / "handover.json").read_text()
    assert "sid-secret" not in text and '"tok"' not in text
    assert json.loads(text)["runs"][0]["gateway"]["mcp"]["gateway"]["per_tool"] == \
        {"files/echo": 1}
    assert message["runs"][0]["gateway"]["mcp"]["gateway"]["sessions"] == \
        [["sid-secret", "remote"]]  # what the watchdog gets: whole


def test_the_record_on_disk_has_no_token(tmp_path: Path) -> None:
    message = _record()
    handover._write_record(tmp_path / "handover.json", message)
    written = json.loads((tmp_path / "handover.json").read_text())
    assert "token" not in written["runs"][0]["gateway"]
    assert written["runs"][0]["gateway"]["usage"]["requests"] == 2
    assert message["runs"][0]["gateway"]["token"] == "tok"  # what the watchdog gets: whole
    assert (tmp_path / "handover.json").stat().st_mode & 0o777 == 0o600


def test_an_adopted_runs_addresses_are_held_once() -> None:
    pool = link.AddressPool("10.213.0.0/29", in_use=set)
    kept = link.LinkAddresses.of(ipaddress.IPv4Network("10.213.0.4/30"))
    assert pool.reserve(kept)
    assert not pool.reserve(kept)  # held: no second run gets it
    assert pool.allocate() == link.LinkAddresses.of(ipaddress.IPv4Network("10.213.0.0/30"))
    pool.release(kept)
    assert pool.allocate() == kept


def _control(env: ArbiterEnv, loop: asyncio.AbstractEventLoop,
             policy: GatewayPolicy | None = None) -> EgressControl:
    arbiter = env.arbiter()
    egress = EgressControl(env.config, arbiter, Containment(arbiter), env.audit, env.db, loop)
    grant = RunGrant(run_id="r1", agent="a", token="tok", expires_at=2e9,
                     policy=policy or GatewayPolicy(), host_ip="10.213.0.1", port=3128,
                     secrets={})
    network = RunNetwork("r1", "asgabc", "ast_r1",
                         link.LinkAddresses.of(ipaddress.IPv4Network("10.213.0.0/30")), 3128)
    egress.runs["r1"] = _RunEgress(network, grant, generation=1)
    return egress


def test_a_session_whose_counts_cannot_be_read_is_not_handed_over(env: ArbiterEnv) -> None:
    async def scenario() -> EgressControl:
        egress = _control(env, asyncio.get_running_loop())
        assert egress.handover_refusal("r1") is None
        with pytest.raises(EgressSetupFailed, match="counts for run r1 could not be read"):
            await egress.hand_over("r1")  # no worker: as one that died
        return egress

    egress = asyncio.run(scenario())
    assert "r1" in egress.runs  # still this daemon's: its kill and summary are as usual


def test_what_cannot_go_to_the_next_daemon_says_why(env: ArbiterEnv) -> None:
    async def scenario() -> None:
        mcp = GatewayPolicy.model_validate({"mcp": {"servers": [
            {"name": "files", "url": "https://mcp.example.test/mcp"}]}})
        egress = _control(env, asyncio.get_running_loop(), mcp)
        assert egress.handover_refusal("r1") is None  # MCP servers go along (issue 13)
        # A stdio server whose end this daemon no longer holds could not be reached.
        egress.runs["r1"].stdio = RunServers("r1", [StdioServer(
            "files", "as-r1-mcp0", Path("/b"), Cgroup("as/as-r1-mcp0"), 1)])
        assert "stdio MCP servers" in (egress.handover_refusal("r1") or "")
        egress = _control(env, asyncio.get_running_loop())
        egress.runs["r1"].lost = True
        assert "lost" in (egress.handover_refusal("r1") or "")
        egress.runs["r1"].lost = False
        await egress.revoke("r1")
        assert "revoked" in (egress.handover_refusal("r1") or "")
        assert "lost" in (egress.handover_refusal("r2") or "")

    asyncio.run(scenario())


def test_an_entry_naming_another_runs_link_is_not_adopted(env: ArbiterEnv) -> None:
    run = RunRecord(id="r1", agent="a", state="running", command=["x"], profile="gw",
                    workspace=None, container_id=f"{env.config.sandbox.name_prefix}-r1",
                    netns="n", cgroup="c", bundle="/b", log_path="/l", uid_slot=0,
                    started_at=0.0)

    async def scenario() -> None:
        egress = EgressControl(env.config, env.arbiter(), Containment(env.arbiter()),
                               env.audit, env.db, asyncio.get_running_loop())
        with pytest.raises(EgressSetupFailed, match="not the run's own"):
            await egress.adopt(run, GatewayPolicy(), GATEWAY)
        # A profile that names MCP servers now, for a run handed over without (or the
        # other way round): nothing is taken.
        mcp = GatewayPolicy.model_validate({"mcp": {"servers": [
            {"name": "files", "url": "https://mcp.example.test/mcp"}]}})
        with pytest.raises(EgressSetupFailed, match="MCP servers the run did not have"):
            await egress.adopt(run, mcp, GATEWAY)
        with pytest.raises(EgressSetupFailed, match="MCP servers the run did not have"):
            await egress.adopt(run, GatewayPolicy(), {**GATEWAY, "mcp": {"stdio": []}})
        assert egress.runs == {} and egress.pool.reserve(
            link.LinkAddresses.of(ipaddress.IPv4Network("10.213.0.0/30")))

    asyncio.run(scenario())
