"""Restart without dropping agents behind the egress gateway (issue 13): a run's gateway session
goes to the next daemon, whose own gateway worker listens at the same address for the same
token, with the run's counts carried on and its route secrets read again from its own
configuration; a session that cannot be restored fails that run's adoption, and the run is
killed and audited. A real daemon (SIGUSR2 twice over), a real agent making HTTP calls through
the gateway to an HTTPS upstream on loopback, runc (and docker: the adoption of a docker
run behind the gateway), veth, nftables; needs root."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.egress import link, nft
from tests.conftest import BOTH_RUNTIMES, require_gateway
from tests.e2e.test_egress import AGENT_LIB
from tests.support.daemon import wait_for
from tests.support.egress import (
    LLM_ROUTE,
    GatewayRig,
    gateway_parts,
    gateway_rig,
    host_request,
)

# Two calls on "go1" and one refused (not on the allow list); on "go2" five more, each
# retried while nothing listens (between the old daemon's worker closing the run's gate and
# the new one's opening it, the address refuses connections). With a run budget of 6
# requests, the seventh call in all is refused: only if the first two were carried over.
SCRIPT = """
    import os, sys, time
    sys.path.insert(0, "/workspace")
    from agentlib import *

    def wait(name):
        while not os.path.exists("/workspace/" + name):
            time.sleep(0.05)

    def call():
        deadline = time.monotonic() + 120
        while True:
            result = via_proxy("POST", "http://llm.gateway/v1/chat?tokens=10", b"{}")
            if "status" in result or time.monotonic() > deadline:
                return result
            time.sleep(0.2)

    wait("go1")
    save("before.json", [call() for _ in range(2)]
         + [via_proxy("GET", "http://elsewhere.test/")])
    wait("go2")
    save("after.json", [call() for _ in range(5)])
    time.sleep(600)
"""
BUDGET = """
[network.gateway.budget]
action = "alert"
[network.gateway.budget.run]
requests = 6
"""


@pytest.fixture
def rig(tmp_root: Path, runtime: str) -> Iterator[GatewayRig]:
    require_gateway()
    with gateway_rig(tmp_root, runtime) as prepared:
        yield prepared


def _rows(rig: GatewayRig, verb: str) -> list[dict[str, Any]]:
    entries = rig.daemon.client.audit(limit=1000)["entries"]
    return [e for e in entries if e["verb"] == verb]


def _start_caller(rig: GatewayRig, name: str) -> dict[str, Any]:
    """The agent, running, its first two calls made through the gateway; its run."""
    rig.script("agentlib.py", AGENT_LIB)
    path = rig.script(f"{name}.py", SCRIPT)
    rig.daemon.agentctl_json("run", "--detach", "--name", name, "--profile",
                             rig.profile("gw", LLM_ROUTE + BUDGET), "--workspace",
                             str(rig.workspace), "--", "python3", "-u", path)
    rig.touch("go1")
    before = rig.result("before.json", name, "the calls before the restart")
    assert [r.get("status") for r in before] == [200, 200, 403], before
    run: dict[str, Any] = rig.daemon.client.agent(name)["run"]
    return run


def _hand_over(rig: GatewayRig) -> None:
    assert rig.daemon.stop(signal.SIGUSR2) == 0, rig.daemon.logs()[-6000:]


def _secret_file(rig: GatewayRig) -> Path:
    egress = rig.daemon.extra_config["egress"]
    assert isinstance(egress, dict)
    return Path(str(egress["secrets_dir"])) / "llm-key"


def _rotate_secret(rig: GatewayRig) -> str:
    """A new value for the route's secret while no daemon runs: the next daemon must send
    this one (it reads its configuration again; the record never held the old)."""
    new = rig.secret + "-rotated"
    _secret_file(rig).write_text(new + "\n")
    return new


@BOTH_RUNTIMES
def test_a_gateway_run_is_adopted_and_keeps_calling_through_the_gateway(
        rig: GatewayRig) -> None:
    run = _start_caller(rig, "caller")
    env = rig.proxy_env("caller")
    gw_host, gw_port, _auth = gateway_parts(env)
    ifname = link.host_ifname(f"{rig.daemon.prefix}-{run['id']}")
    table = nft.table_name(rig.daemon.prefix, run["id"])
    token = env["HTTP_PROXY"].removeprefix("http://").rpartition("@")[0].partition(":")[2]
    assert token and rig.upstream.headers_seen("Authorization") == [f"Bearer {rig.secret}"] * 2

    _hand_over(rig)
    # No daemon: the run, its link and its table are as they were; the record on disk holds
    # neither the token nor the secret.
    assert link.exists(ifname) and nft.exists(table)
    on_disk = (rig.daemon.root / "state" / "handover.json").read_text()
    assert token not in on_disk and rig.secret not in on_disk
    [entry] = json.loads(on_disk)["runs"]
    assert entry["gateway"]["usage"]["requests"] == 2 and "token" not in entry["gateway"]
    rotated = _rotate_secret(rig)

    rig.daemon.start()
    view = rig.daemon.client.agent("caller")
    assert view["state"] == "active" and view["run"]["id"] == run["id"]
    assert view["run"]["pid"] == run["pid"]  # the same init: not restarted
    assert link.exists(ifname) and nft.exists(table)  # reconcile left the adopted run's own
    [adopted] = [r for r in _rows(rig, "adopt") if r["target"] == "caller"]
    assert adopted["outcome"] == "ok", adopted
    gateway = adopted["detail"]["gateway"]
    assert gateway["address"] == f"{gw_host}:{gw_port}"
    assert gateway["usage"]["requests"] == 2 and gateway["breaker"] is None
    assert token not in json.dumps(adopted) and rotated not in json.dumps(adopted)

    rig.touch("go2")
    after = rig.result("after.json", "caller", "the calls after the adoption")
    # The same placeholder credentials and route (HTTP_PROXY unchanged); the budget counted
    # the calls made before the restart.
    assert [r.get("status") for r in after] == [200, 200, 200, 200, 429], after
    assert after[4]["denied"] == "budget_exceeded"
    assert rig.upstream.headers_seen("Authorization") == \
        [f"Bearer {rig.secret}"] * 2 + [f"Bearer {rotated}"] * 4
    usage = rig.daemon.agentctl_json("egress", "caller")["usage"]
    assert (usage["requests"], usage["tokens"]) == (6, 60), usage
    fired = [e for e in _rows(rig, "tripwire") if e["detail"]["rule"] == "egress_budget"]
    assert len(fired) == 1 and fired[0]["target"] == "caller"

    rig.daemon.agentctl("kill", "caller", "--reason", "done with it", check=True)
    # Revoked with the kill: the gateway's address left the host with the veth and table.
    assert not link.exists(ifname) and not nft.exists(table)
    killed = [e for e in _rows(rig, "kill") if e["target"] == "caller"]
    assert killed and killed[0]["detail"]["confirmed_empty"] is True
    [summary] = [e for e in _rows(rig, "egress_summary") if e["target"] == "caller"]
    assert summary["detail"]["usage"]["requests"] == 6  # one summary, both daemons' calls
    # The refusals of both daemons' workers, the first carried in the record.
    assert summary["detail"]["denials"] == {"budget_exceeded /v1/chat": 1,
                                            "egress_denied elsewhere.test": 1}, summary
    assert rig.daemon.client.audit_verify()["ok"]


@pytest.mark.parametrize("broken", ["secret", "nft_table"])
def test_a_gateway_session_that_cannot_be_restored_means_the_run_is_killed(
        rig: GatewayRig, broken: str) -> None:
    run = _start_caller(rig, "orphan")
    ifname = link.host_ifname(f"{rig.daemon.prefix}-{run['id']}")
    table = nft.table_name(rig.daemon.prefix, run["id"])
    init = run["pid"]

    _hand_over(rig)
    assert Path(f"/proc/{init}").exists()
    if broken == "secret":
        # The next daemon cannot read the route's secret: no gateway for the run, no run.
        _secret_file(rig).unlink()
    else:
        # Its firewall went while no daemon held it: not restored (the veth without its
        # table would reach the whole host).
        assert nft.remove(table)

    rig.daemon.start()
    [adopted] = [r for r in _rows(rig, "adopt") if r["target"] == "orphan"]
    assert adopted["outcome"] == "failed:gateway_not_restored", adopted
    assert {"secret": "file:llm-key", "nft_table": f"nft table {table} is gone"}[broken] in \
        adopted["detail"]["error"], adopted
    wait_for(lambda: not Path(f"/proc/{init}").exists(), timeout=30,
             what="the run that was not adopted to be killed")
    view = rig.daemon.client.agent("orphan")
    assert view["run"]["state"] == "killed" and view["state"] != "active", view
    assert any(r["target"] == "orphan" for r in _rows(rig, "reap"))
    assert _rows(rig, "daemon_adopt")[-1]["detail"]["failed"][run["id"]]["code"] == \
        "gateway_not_restored"
    assert not link.exists(ifname) and not nft.exists(table)


HOLDER = """
    import sys, time
    sys.path.insert(0, "/workspace")
    from agentlib import *
    save("first.json", via_proxy("DELETE", "http://llm.gateway/v1/items/1", timeout=900))
    while True:  # asks again, retrying while nothing listens
        second = via_proxy("DELETE", "http://llm.gateway/v1/items/2", timeout=900)
        if "status" in second:
            break
        time.sleep(0.2)
    save("second.json", second)
    time.sleep(600)
"""
CHAT = (b"GET http://llm.gateway/v1/chat HTTP/1.1\r\nHost: llm.gateway\r\n"
        b"Connection: close\r\n\r\n")


def test_a_held_request_is_cancelled_and_a_pause_kept_across_the_restart(
        rig: GatewayRig) -> None:
    """What is reset and what is kept, with a real daemon: a request held for an operator
    lived in the old gateway worker, so the handover cancels it (audited; the agent is refused
    or cut); asked again, it is held again by the new daemon and can be approved.
    A paused run is adopted with its token still suspended and its link down; resume gives
    it back."""
    rig.script("agentlib.py", AGENT_LIB)
    approve = rig.profile("approve", '[network.gateway]\napprovals = ["DELETE *"]\n'
                          'approval_timeout = "15m"\n' + LLM_ROUTE)
    rig.daemon.agentctl_json("run", "--detach", "--name", "holder", "--profile", approve,
                             "--workspace", str(rig.workspace), "--", "python3", "-u",
                             rig.script("holder.py", HOLDER))
    rig.daemon.agentctl_json("run", "--detach", "--name", "resting", "--profile",
                             rig.profile("gw", LLM_ROUTE), "--", "sleep", "3600")

    def pending(path: str) -> list[dict[str, Any]]:
        return [a for a in rig.daemon.agentctl_json("approvals")["approvals"]
                if a["path"] == path]

    [held] = rig.until(lambda: pending("/v1/items/1"), "holder", "the held request")
    resting = rig.proxy_env("resting")
    wait_for(lambda: host_request(resting, CHAT).startswith(b"HTTP/1.1 200"), timeout=30,
             what="the resting agent's gateway")
    rig.daemon.agentctl("pause", "resting", "--reason", "look at it", check=True)

    _hand_over(rig)
    first = rig.result("first.json", "holder", "the held request's end at the handover")
    # Ended with the old worker: refused with why (the cancellation reached the handler
    # first), or cut (the gate's close did); never sent upstream either way.
    assert "error" in first or ((first["status"], first["denied"]) == (
        403, "approval_denied") and "the supervisor restarted" in first["body"]), first
    rig.daemon.start()
    adopted = {r["target"]: r for r in _rows(rig, "adopt")}
    assert adopted["holder"]["outcome"] == adopted["resting"]["outcome"] == "ok", adopted
    assert "requests held for an operator (cancelled at the handover)" in \
        adopted["holder"]["detail"]["gateway"]["reset"]
    [cancelled] = [r for r in _rows(rig, "approval_denied") if r["detail"]["id"] == held["id"]]
    assert cancelled["outcome"] == "cancelled" and "restarted" in cancelled["reason"]

    [again] = rig.until(lambda: pending("/v1/items/2"), "holder", "the request asked again")
    rig.daemon.agentctl("approve", again["id"], "--reason", "fine", check=True)
    assert rig.result("second.json", "holder", "the approved request")["status"] == 200
    assert [s["path"] for s in rig.upstream.seen if s["method"] == "DELETE"] == ["/v1/items/2"]

    view = rig.daemon.client.agent("resting")
    assert (view["state"], view["run"]["state"]) == ("paused", "paused")  # type: ignore[index]
    reply = host_request(resting, CHAT)
    assert reply.startswith(b"HTTP/1.1 403") and b"token_suspended" in reply, reply
    rig.daemon.agentctl("resume", "resting", "--reason", "checked", check=True)
    assert host_request(resting, CHAT).startswith(b"HTTP/1.1 200")
    for agent in ("holder", "resting"):
        rig.daemon.agentctl("kill", agent, "--reason", "test over", check=True)
