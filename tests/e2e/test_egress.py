"""The egress gateway end to end: a real daemon, real sandboxes with a veth and nftables rules,
real HTTPS upstreams on loopback behind a test CA. What the agent can and cannot reach, where
the secret is not, tokens revoked by pause and kill, budgets, the breaker and approvals."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.egress import link, nft
from tests.conftest import BOTH_RUNTIMES, require, require_root_and_runc
from tests.e2e.test_metrics import scrape_unix
from tests.support.daemon import wait_for
from tests.support.egress import (
    LLM_ROUTE,
    GatewayRig,
    gateway_parts,
    gateway_rig,
    host_request,
    open_tunnel,
)

# Helpers the agent's scripts share: requests through the proxy from HTTP_PROXY.
AGENT_LIB = r'''
import base64, json, os, socket, ssl, urllib.error, urllib.request

PROXY = os.environ["HTTP_PROXY"]
creds, _, gw = PROXY.removeprefix("http://").rpartition("@")
GW_HOST, GW_PORT = gw.split(":")[0], int(gw.split(":")[1])
AUTH = "Basic " + base64.b64encode(creds.encode()).decode()

def via_proxy(method, url, body=None, auth=True, timeout=30):
    handler = urllib.request.ProxyHandler({"http": PROXY if auth else f"http://{gw}"})
    opener = urllib.request.build_opener(handler)
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with opener.open(req, timeout=timeout) as r:
            return {"status": r.status, "body": r.read().decode()}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "denied": e.headers.get("X-Agent-Supervisor-Denied"),
                "body": e.read().decode()}
    except Exception as e:
        return {"error": repr(e)}

def connect(target, auth=True):
    s = socket.create_connection((GW_HOST, GW_PORT), timeout=10)
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if auth:
        head += f"Proxy-Authorization: {AUTH}\r\n"
    s.sendall((head + "\r\n").encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = s.recv(4096)
        if not chunk:
            break
        reply += chunk
    return s, reply

def tls_get(s, host, path="/hello"):
    t = ssl.create_default_context(cafile="/workspace/ca.pem").wrap_socket(
        s, server_hostname=host)
    t.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := t.recv(65536):
        data += chunk
    return data.decode(errors="replace")

def status_of(reply):
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else None

def raw(request, timeout=60, auth=True):
    """Send exact bytes to the gateway (with the token unless auth=False); everything it sends
    back until it closes, with "<ErrorName>" appended when the read ended in an error."""
    s = socket.create_connection((GW_HOST, GW_PORT), timeout=timeout)
    if auth:
        request = request.replace(b"\r\n\r\n", f"\r\nProxy-Authorization: {AUTH}\r\n\r\n"
                                  .encode(), 1)
    data = b""
    try:
        s.sendall(request)
        while chunk := s.recv(65536):
            data += chunk
    except OSError as e:
        data += f"<{type(e).__name__}>".encode()
    s.close()
    return data.decode("latin1")

def save(name, value):
    with open(f"/workspace/.{name}", "w") as f:
        json.dump(value, f)
    os.rename(f"/workspace/.{name}", f"/workspace/{name}")  # the test never reads half a file
'''


@pytest.fixture
def rig(tmp_root: Path, runtime: str) -> Iterator[GatewayRig]:
    require_root_and_runc()
    require(shutil.which("nft") is not None, "needs nft (apt-get install nftables)")
    with gateway_rig(tmp_root, runtime) as prepared:
        yield prepared


def _run(rig: GatewayRig, name: str, profile: str, script: str, detach: bool = False,
         ) -> dict[str, Any]:
    rig.script("agentlib.py", AGENT_LIB)
    path = rig.script(f"{name}.py", script)
    args = ["run", "--name", name, "--profile", profile, "--workspace", str(rig.workspace)]
    if detach:
        args.append("--detach")
    result: dict[str, Any] = rig.daemon.agentctl_json(*args, "--", "python3", "-u", path)
    return result


def _audit(rig: GatewayRig, verb: str) -> list[dict[str, Any]]:
    entries = rig.daemon.agentctl_json("audit", "--limit", "1000")["entries"]
    return [e for e in entries if e["verb"] == verb]


def _state(rig: GatewayRig, agent: str) -> str:
    state: str = rig.daemon.agentctl_json("inspect", agent)["state"]
    return state


_NO_BREAKER = """
[network.gateway.breaker]
enabled = false
"""


def _breaker(min_requests: int) -> str:
    """A profile's breaker: open at a 50% error rate over a minute, from `min_requests` on."""
    return f"""
[network.gateway.breaker]
window = "60s"
min_requests = {min_requests}
max_error_rate = 0.5
max_rate = 1000
"""


def _paused_by_the_breaker(rig: GatewayRig, agent: str, profile: str, script: str,
                           timeout: float) -> dict[str, Any]:
    """Runs `script` detached until the breaker pauses the agent: the one tripwire row that
    says so, for that agent, with the error rate as the reason."""
    _run(rig, agent, profile, script, detach=True)
    wait_for(lambda: _state(rig, agent) == "paused", timeout, what="the breaker's pause")
    fired = [e for e in _audit(rig, "tripwire") if e["detail"]["rule"] == "egress_breaker"
             and e["target"] == agent]
    assert len(fired) == 1 and "error rate" in fired[0]["detail"]["breaker"], fired
    return fired[0]


@BOTH_RUNTIMES
def test_from_inside_only_the_gateway_and_its_routes_are_reachable(rig: GatewayRig) -> None:
    other_port = _listen_on_host()
    profile = rig.profile("gw", '[network.gateway]\nallow = ["pkg.upstream.test:{PORT}"]\n'
                          + LLM_ROUTE)
    port = rig.upstream.port
    script = f"""
        import glob, os, socket, sys
        sys.path.insert(0, "/workspace")
        from agentlib import *
        r = {{}}
        r["route"] = via_proxy("POST", "http://llm.gateway/v1/chat?tokens=7", b'{{"q": 1}}')
        r["route_without_token"] = via_proxy("GET", "http://llm.gateway/v1/chat", auth=False)
        r["plain_other_host"] = via_proxy("GET", "http://other.upstream.test:{port}/")
        s, reply = connect("pkg.upstream.test:{port}")
        r["tunnel_allowed"] = [status_of(reply), tls_get(s, "pkg.upstream.test")[:12]]
        for name, target in [("tunnel_other_domain", "other.upstream.test:{port}"),
                             ("tunnel_ip_literal", "127.0.0.1:{port}"),
                             ("tunnel_wrong_port", "pkg.upstream.test:{port + 1}")]:
            s, reply = connect(target)
            r[name] = [status_of(reply), reply.decode(errors="replace")]
        def try_connect(addr, timeout=1.5):
            try:
                socket.create_connection(addr, timeout=timeout).close()
                return "connected"
            except OSError as e:
                return type(e).__name__ + ":" + str(e.errno)
        r["direct_public"] = try_connect(("192.0.2.10", 443))
        r["direct_upstream"] = try_connect(("127.0.0.1", {port}))
        r["host_other_port"] = try_connect((GW_HOST, {other_port}))
        r["host_ssh_port"] = try_connect((GW_HOST, 22))
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(1.5)
        u.sendto(b"\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00"
                 b"\\x03pkg\\x08upstream\\x04test\\x00\\x00\\x01\\x00\\x01", (GW_HOST, 53))
        try:
            r["udp53"] = "answered:" + repr(u.recvfrom(512))
        except OSError as e:
            r["udp53"] = type(e).__name__
        try:
            socket.getaddrinfo("pkg.upstream.test", 443)
            r["dns"] = "resolved"
        except OSError as e:
            r["dns"] = type(e).__name__
        # Everything the agent can read that might hold a secret.
        found = {{"env": dict(os.environ)}}
        for path in glob.glob("/proc/[0-9]*/environ") + glob.glob("/proc/[0-9]*/cmdline"):
            try:
                found[path] = open(path, "rb").read().decode(errors="replace")
            except OSError:
                pass
        for top in ("/etc", "/run", "/tmp", "/workspace", "/var", "/home", "/root", "/opt"):
            for dirpath, _dirs, files in os.walk(top):
                for f in files:
                    p = os.path.join(dirpath, f)
                    try:
                        if os.path.isfile(p) and os.path.getsize(p) < 1 << 20:
                            found[p] = open(p, "rb").read().decode(errors="replace")
                    except OSError:
                        pass
        save("readable.json", found)
        save("results.json", r)
    """
    view = _run(rig, "prober", profile, script)
    assert view["exit_code"] == 0, rig.daemon.agentctl("logs", "prober").stdout
    r = rig.read("results.json")

    assert r["route"]["status"] == 200 and json.loads(r["route"]["body"])["usage"] == {
        "total_tokens": 7}
    chat = [s for s in rig.upstream.seen if s["path"].startswith("/v1/chat")]
    assert len(chat) == 1, "the request without a token must never reach the upstream"
    assert chat[0]["headers"]["Authorization"] == f"Bearer {rig.secret}"
    assert "Proxy-Authorization" not in chat[0]["headers"]
    assert r["route_without_token"]["status"] == 407
    assert r["route_without_token"]["denied"] == "token_required"
    assert r["plain_other_host"]["status"] == 403
    assert r["plain_other_host"]["denied"] == "egress_denied"
    assert json.loads(r["plain_other_host"]["body"])["error"]["detail"]["retry"] is False

    assert r["tunnel_allowed"][0] == 200 and r["tunnel_allowed"][1].startswith("HTTP/1.1 200")
    for name in ("tunnel_other_domain", "tunnel_ip_literal", "tunnel_wrong_port"):
        status, reply = r[name]
        assert status == 403, (name, reply)
        assert "X-Agent-Supervisor-Denied: egress_denied" in reply
        assert '"code": "egress_denied"' in reply and "retrying will not help" in reply

    assert r["direct_public"].endswith(":101"), r  # ENETUNREACH: no route but to the gateway
    assert r["direct_upstream"].startswith("ConnectionRefusedError"), r  # its own loopback
    assert r["host_other_port"] in ("TimeoutError:None", "timeout:None"), r  # nft drops it
    assert r["host_ssh_port"] in ("TimeoutError:None", "timeout:None"), r
    assert r["udp53"] in ("TimeoutError", "timeout"), r
    assert r["dns"] == "gaierror", r

    readable = (rig.workspace / "readable.json").read_text()
    assert len(json.loads(readable)) > 20, "the probe read almost nothing; it proves nothing"
    assert rig.secret not in readable
    assert rig.secret not in rig.daemon.logs()
    audit_dump = json.dumps(rig.daemon.agentctl_json("audit", "--limit", "1000"))
    assert rig.secret not in audit_dump
    bundle_dir = rig.daemon.root / "run" / "bundles"
    for path in bundle_dir.rglob("*") if bundle_dir.exists() else []:
        if path.is_file():
            assert rig.secret.encode() not in path.read_bytes()
    denied = _audit(rig, "egress_denied")
    assert {e["outcome"] for e in denied} >= {"refused:egress_denied", "refused:token_required"}
    summary = _audit(rig, "egress_summary")[-1]["detail"]
    assert summary["usage"]["requests"] >= 2 and summary["usage"]["tokens"] == 7
    # Telemetry counts the run's veth: the network_bytes tripwire metric has data to judge.
    telemetry = rig.daemon.agentctl_json("telemetry", "prober")["summary"]
    assert telemetry["network_bytes"] > 1000, telemetry


@BOTH_RUNTIMES
def test_pause_suspends_and_kill_revokes_the_token_and_cuts_tunnels(rig: GatewayRig) -> None:
    profile = rig.profile("gw", '[network.gateway]\nallow = ["pkg.upstream.test:{PORT}"]\n'
                          + LLM_ROUTE)
    port = rig.upstream.port
    script = f"""
        import os, sys, time
        sys.path.insert(0, "/workspace")
        from agentlib import *
        s, reply = connect("pkg.upstream.test:{port}")
        save("ready.json", status_of(reply))
        while not os.path.exists("/workspace/go"):
            time.sleep(0.05)
        s.settimeout(5)
        try:
            s.sendall(b"\\x16\\x03\\x01\\x00\\x05hello")
            got = s.recv(100)
            old = "open:" + repr(got[:20]) if got else "closed"
        except OSError as e:
            old = "closed:" + type(e).__name__
        save("after_resume.json", {{"old_tunnel": old,
              "new_request": via_proxy("GET", "http://llm.gateway/v1/chat")}})
        time.sleep(600)
    """
    _run(rig, "holder", profile, script, detach=True)
    wait_for(lambda: rig.exists("ready.json"), 30, what="the agent's tunnel")
    assert rig.read("ready.json") == 200
    env = rig.proxy_env("holder")
    gw_host, _gw_port, _auth = gateway_parts(env)
    ifname = _host_ifname(gw_host)
    assert host_request(env, b"GET http://llm.gateway/v1/chat HTTP/1.1\r\nHost: llm.gateway\r\n"
                        b"Connection: close\r\n\r\n").startswith(b"HTTP/1.1 200")
    tunnel = open_tunnel(env, f"pkg.upstream.test:{port}", rig.ca)

    rig.daemon.agentctl("pause", "holder", "--reason", "inspect", check=True)
    assert _tunnel_cut(tunnel), "pause must cut the open tunnel"
    reply = host_request(env, b"GET http://llm.gateway/v1/chat HTTP/1.1\r\nHost: llm.gateway"
                         b"\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 403") and b"token_suspended" in reply, reply
    assert _link_up(ifname) is False, "pause sets the agent's link down"

    rig.daemon.agentctl("resume", "holder", check=True)
    assert _link_up(ifname) is True
    reply = host_request(env, b"GET http://llm.gateway/v1/chat HTTP/1.1\r\nHost: llm.gateway"
                         b"\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200"), reply
    rig.touch("go")
    wait_for(lambda: rig.exists("after_resume.json"), 30, what="the agent after resume")
    after = rig.read("after_resume.json")
    assert after["old_tunnel"].startswith("closed"), after
    assert after["new_request"]["status"] == 200, after

    tunnel = open_tunnel(env, f"pkg.upstream.test:{port}", rig.ca)
    table = nft.table_name(rig.daemon.prefix, rig.daemon.agentctl_json("inspect", "holder")
                           ["run"]["id"])
    assert nft.exists(table) and link.exists(ifname)
    rig.daemon.agentctl("kill", "holder", "--reason", "done", check=True)
    assert _tunnel_cut(tunnel), "kill must cut the open tunnel"
    # The gateway's address left the host with the veth: nothing answers for the token any
    # more (no request is sent there now; off the host it would be some other network's).
    assert not nft.exists(table) and not link.exists(ifname)
    with pytest.raises(AssertionError):
        _host_ifname(gw_host)
    revoked = next(e for e in _audit(rig, "kill") if e["target"] == "holder")
    assert revoked["detail"]["confirmed_empty"] is True


def test_budget_ceiling_refuses_and_fires_the_budget_tripwire(rig: GatewayRig) -> None:
    # 40 tokens at 0.01 = 0.4 per call against a ceiling of 0.8: the third call is refused.
    budget = """
        [network.gateway.budget]
        action = "{action}"
        [network.gateway.budget.run]
        spend = 0.8
    """.replace("        ", "")
    script = """
        import sys, time
        sys.path.insert(0, "/workspace")
        from agentlib import *
        results = [via_proxy("POST", "http://llm.gateway/v1/chat?tokens=40", b"{}")
                   for _ in range(3)]
        save("budget.json", results)
        time.sleep(600)
    """
    _run(rig, "spender", rig.profile("alerting", LLM_ROUTE + budget.format(action="alert")), script,
         detach=True)
    wait_for(lambda: rig.exists("budget.json"), 30, what="the agent's calls")
    results = rig.read("budget.json")
    assert [r["status"] for r in results] == [200, 200, 429], results
    assert results[2]["denied"] == "budget_exceeded"
    body = json.loads(results[2]["body"])["error"]
    assert body["code"] == "budget_exceeded" and body["detail"]["retry"] is False
    usage = rig.daemon.agentctl_json("egress", "spender")["usage"]
    assert usage["spend"] == pytest.approx(0.8) and usage["tokens"] == 80
    fired = [e for e in _audit(rig, "tripwire") if e["detail"]["rule"] == "egress_budget"]
    assert len(fired) == 1 and fired[0]["outcome"] == "alert"
    assert fired[0]["detail"]["metric"] == "egress_spend" and fired[0]["target"] == "spender"
    assert _state(rig, "spender") == "active"

    # With action = "kill" the same ceiling ends the agent, through the audited kill path.
    (rig.workspace / "budget.json").unlink()
    _run(rig, "spender2", rig.profile("killing", LLM_ROUTE + budget.format(action="kill")), script,
         detach=True)
    wait_for(lambda: _state(rig, "spender2") == "killed", 30, what="the budget tripwire's kill")
    kill = [e for e in _audit(rig, "kill") if e["target"] == "spender2"]
    assert kill and kill[0]["actor"] == "system:tripwire"
    assert "egress_budget" in kill[0]["reason"]
    refused = [e for e in _audit(rig, "egress_denied") if e["target"] == "spender2"]
    assert [e["outcome"] for e in refused] == ["refused:budget_exceeded"]
    rig.daemon.agentctl("kill", "spender", "--reason", "test over", check=True)


@pytest.fixture
def metrics_rig(tmp_root: Path, runtime: str) -> Iterator[GatewayRig]:
    """A rig whose daemon serves its metrics on a Unix socket beside its state."""
    require_root_and_runc()
    require(shutil.which("nft") is not None, "needs nft (apt-get install nftables)")
    listen = {"listen": f"unix:{tmp_root / 'metrics.sock'}"}
    with gateway_rig(tmp_root, runtime, daemon_config={"metrics": listen}) as prepared:
        yield prepared


def _open_breakers(rig: GatewayRig) -> float:
    metrics = rig.daemon.extra_config["metrics"]
    assert isinstance(metrics, dict)
    samples = scrape_unix(Path(str(metrics["listen"]).removeprefix("unix:")))
    return samples.get(("agent_supervisor_gateway_breakers_open", ()), -1.0)


def test_breaker_trips_on_errors_pauses_and_a_human_resets_it(metrics_rig: GatewayRig
                                                               ) -> None:
    rig = metrics_rig
    assert _open_breakers(rig) == 0
    profile = rig.profile("breaker", LLM_ROUTE + _breaker(min_requests=4))
    script = """
        import sys, time
        sys.path.insert(0, "/workspace")
        from agentlib import *
        save("errors.json", [via_proxy("GET", "http://llm.gateway/fail") for _ in range(4)])
        time.sleep(600)
    """
    fired = _paused_by_the_breaker(rig, "flaky", profile, script, 30)
    assert fired["outcome"] == "pause"
    view = rig.daemon.agentctl_json("egress", "flaky")
    assert view["breaker"] and view["usage"]["errors"] == 4
    assert _open_breakers(rig) == 1
    env = rig.proxy_env("flaky")
    rig.daemon.agentctl("resume", "flaky", check=True)
    reply = host_request(env, b"GET http://llm.gateway/v1/chat HTTP/1.1\r\nHost: llm.gateway"
                         b"\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 503") and b"breaker_open" in reply, reply
    rig.daemon.agentctl("breaker", "reset", "flaky", "--reason", "upstream fixed", check=True)
    reply = host_request(env, b"GET http://llm.gateway/v1/chat HTTP/1.1\r\nHost: llm.gateway"
                         b"\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert _open_breakers(rig) == 0
    again = rig.daemon.agentctl("breaker", "reset", "flaky", "--json")
    assert again.returncode == 4 and "breaker_not_tripped" in again.stdout
    assert [e["reason"] for e in _audit(rig, "breaker_reset")] == ["upstream fixed"]
    rig.daemon.agentctl("kill", "flaky", "--reason", "test over", check=True)


def test_approvals_granted_denied_and_timed_out(rig: GatewayRig) -> None:
    """Held requests are approved, denied, or expire. The requests the test answers wait as
    long as the test needs (each answer is an agentctl process, seconds apart on a loaded
    machine: a short timeout let them expire first); the one nobody answers is another
    agent's, under a short timeout, sent once the first agent's results are in."""
    profile = rig.profile("approve", """
        [network.gateway]
        approvals = ["DELETE *", "POST /v1/refunds"]
        approval_timeout = "15m"
    """.replace("        ", "") + LLM_ROUTE)
    script = """
        import sys, time
        sys.path.insert(0, "/workspace")
        from agentlib import *
        out = {}
        out["delete"] = via_proxy("DELETE", "http://llm.gateway/v1/items/1", timeout=900)
        out["refund"] = via_proxy("POST", "http://llm.gateway/v1/refunds", b"{}", timeout=900)
        out["plain_get"] = via_proxy("GET", "http://llm.gateway/v1/items")
        save("approvals.json", out)
        time.sleep(600)
    """
    _run(rig, "refunder", profile, script, detach=True)

    def pending() -> list[dict[str, Any]]:
        held: list[dict[str, Any]] = rig.daemon.agentctl_json("approvals")["approvals"]
        return held

    first = rig.until(pending, "refunder", "the first held request")[0]
    assert (first["method"], first["path"], first["rule"]) == ("DELETE", "/v1/items/1",
                                                              "DELETE *")
    assert not [s for s in rig.upstream.seen if s["method"] == "DELETE"], "held, not sent"
    rig.daemon.agentctl("approve", first["id"], "--reason", "ticket 42", check=True)
    second = rig.until(lambda: [a for a in pending() if a["path"] == "/v1/refunds"],
                       "refunder", "the refund request")[0]
    refused = rig.daemon.agentctl("deny", second["id"])
    assert refused.returncode != 0, "deny needs --reason"
    rig.daemon.agentctl("deny", second["id"], "--reason", "no refunds today", check=True)
    out = rig.result("approvals.json", "refunder", "the agent's results")
    assert out["delete"]["status"] == 200
    assert out["refund"]["status"] == 403 and out["refund"]["denied"] == "approval_denied"
    assert "no refunds today" in out["refund"]["body"]
    assert out["plain_get"]["status"] == 200

    expiring = rig.profile("expire", """
        [network.gateway]
        approvals = ["DELETE *"]
        approval_timeout = "1s"
    """.replace("        ", "") + LLM_ROUTE)
    _run(rig, "ignored", expiring, """
        import sys, time
        sys.path.insert(0, "/workspace")
        from agentlib import *
        save("unanswered.json", via_proxy("DELETE", "http://llm.gateway/v1/items/2"))
        time.sleep(600)
    """, detach=True)
    unanswered = rig.result("unanswered.json", "ignored", "the unanswered request's end")
    assert unanswered["status"] == 403 and unanswered["denied"] == "approval_denied"
    assert [s["path"] for s in rig.upstream.seen if s["method"] != "GET"] == ["/v1/items/1"]
    requested = _audit(rig, "approval_requested")
    assert len(requested) == 3
    assert [e["outcome"] for e in _audit(rig, "approval_granted")] == ["approved"]
    assert [e["outcome"] for e in _audit(rig, "approval_denied")] == ["denied", "expired"]
    missing = rig.daemon.agentctl("approve", "ffffffff", "--json")
    assert missing.returncode == 3 and "approval_not_found" in missing.stdout
    for agent in ("refunder", "ignored"):
        rig.daemon.agentctl("kill", agent, "--reason", "test over", check=True)


def test_missing_secret_refuses_the_launch_and_leaves_nothing(rig: GatewayRig) -> None:
    profile = rig.profile("nosecret", LLM_ROUTE.replace("file:llm-key", "file:absent-key"))
    result = rig.daemon.agentctl("run", "--name", "nokey", "--profile", profile, "--json",
                                 "--", "true")
    assert result.returncode == 125, result.stdout + result.stderr
    body = json.loads(result.stdout)["error"]
    assert body["code"] == "egress_setup_failed" and "absent-key" in body["message"]
    assert not rig.daemon.residue()
    failed = [e for e in _audit(rig, "launch") if e["target"] == "nokey"]
    assert failed and failed[-1]["outcome"] == "failed:egress_setup_failed"


def test_bad_input_and_a_flood_never_stall_other_agents_or_the_control_socket(
        rig: GatewayRig) -> None:
    profile = rig.profile("gw", LLM_ROUTE + _NO_BREAKER)
    quiet = """
        import sys, time
        sys.path.insert(0, "/workspace")
        from agentlib import *
        while not __import__("os").path.exists("/workspace/flooding"):
            time.sleep(0.05)
        results = [via_proxy("GET", "http://llm.gateway/v1/chat")["status"] for _ in range(20)]
        save("quiet.json", results)
        time.sleep(600)
    """
    flood = r"""
        import socket, sys, threading, time
        sys.path.insert(0, "/workspace")
        from agentlib import *
        held = []
        def slow():  # slowloris: a request head that never ends
            try:
                s = socket.create_connection((GW_HOST, GW_PORT), timeout=30)
                s.sendall(b"GET http://llm.gateway/ HTTP/1.1\r\nHost: llm")
                held.append(s)
            except OSError:
                pass
        for _ in range(200):
            slow()
        def garbage():
            for _ in range(200):
                try:
                    s = socket.create_connection((GW_HOST, GW_PORT), timeout=5)
                    s.sendall(b"\x00\xff NOT HTTP \r\n\r\n" if _ % 2 else
                              b"GET http://llm.gateway/ HTTP/1.1\r\nX-Big: " + b"a" * 70000
                              + b"\r\n\r\n")
                    s.recv(100)
                    s.close()
                except OSError:
                    pass
        def hammer():
            for _ in range(300):
                via_proxy("GET", "http://llm.gateway/v1/chat")
        open("/workspace/flooding", "w").close()
        threads = [threading.Thread(target=f) for f in (garbage, hammer, hammer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        save("flood.json", len(held))
        time.sleep(600)
    """
    _run(rig, "flooder", profile, flood, detach=True)
    _run(rig, "quiet", profile, quiet, detach=True)
    wait_for(lambda: rig.exists("flooding"), 30, what="the flood to start")
    probes = []
    while not rig.exists("quiet.json"):
        t0 = time.monotonic()
        rig.daemon.agentctl_json("ls")
        probes.append(time.monotonic() - t0)
        time.sleep(0.2)
        assert len(probes) < 600, "the quiet agent's requests never completed"
    assert rig.read("quiet.json") == [200] * 20
    assert probes, "the control socket was never probed during the flood"
    print(f"control socket during the flood: {len(probes)} probes, "
          f"max {max(probes) * 1000:.0f} ms")
    wait_for(lambda: rig.exists("flood.json"), 120, what="the flood to end")
    denied = {e["outcome"] for e in _audit(rig, "egress_denied")}
    assert rig.daemon.agentctl_json("inspect", "flooder")["state"] == "active"
    print("refusals audited during the flood:", sorted(denied))
    rig.daemon.agentctl("kill", "--all", "--reason", "test over", check=True)


# ----------------------------------------------------------------------------- issue 11 item 7


def _secret_forms(secret: str) -> list[bytes]:
    """The secret, its hex, and the middle of its base64 at each alignment: what a reflected
    secret looks like in a reply (computed here independently of the gateway's own list)."""
    raw = secret.encode()
    forms = [raw, raw.hex().encode()]
    for offset in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            forms.append(encode(b"\0" * offset + raw)[4:-4])
    return forms


_TTL = "20s"  # the agent opens its connections well before, even on a loaded machine


def test_token_expiry_cuts_open_tunnels_and_streams_at_that_moment(rig: GatewayRig) -> None:
    profile = rig.profile("expiring", f"""
        [network.gateway]
        allow = ["pkg.upstream.test:{{PORT}}"]
        token_ttl = "{_TTL}"
    """.replace("        ", "") + LLM_ROUTE)
    port = rig.upstream.port
    script = f"""
        import socket, ssl, sys, threading, time
        sys.path.insert(0, "/workspace")
        from agentlib import *
        out = {{}}
        def wait_cut(name, sock):
            try:
                while True:
                    if not sock.recv(65536):
                        out[name] = ["eof", time.time()]
                        return
            except socket.timeout:
                out[name] = ["still open", time.time()]
            except OSError as e:
                out[name] = ["reset:" + type(e).__name__, time.time()]
        # An idle TLS tunnel that has carried one request.
        s, reply = connect("pkg.upstream.test:{port}")
        t = ssl.create_default_context(cafile="/workspace/ca.pem").wrap_socket(
            s, server_hostname="pkg.upstream.test")
        t.sendall(b"GET /before HTTP/1.1\\r\\nHost: pkg.upstream.test\\r\\n\\r\\n")
        out["tunnel_first"] = t.recv(100).decode(errors="replace")[:12]
        t.settimeout(120)
        # A route request whose upstream takes two minutes to answer.
        k = socket.create_connection((GW_HOST, GW_PORT), timeout=120)
        k.sendall(("GET http://llm.gateway/slow?s=120 HTTP/1.1\\r\\nHost: llm.gateway\\r\\n"
                   f"Proxy-Authorization: {{AUTH}}\\r\\n\\r\\n").encode())
        # A long streamed reply (two minutes of drip) in progress.
        d = socket.create_connection((GW_HOST, GW_PORT), timeout=120)
        d.sendall(("GET http://llm.gateway/drip?n=1200&every=0.1 HTTP/1.1\\r\\n"
                   f"Host: llm.gateway\\r\\nProxy-Authorization: {{AUTH}}\\r\\n\\r\\n").encode())
        out["drip_first"] = d.recv(100).decode(errors="replace")[:12]
        threads = [threading.Thread(target=wait_cut, args=a)
                   for a in (("tunnel", t), ("waiting", k), ("drip", d))]
        for th in threads:
            th.start()
        save("opened.json", time.time())
        for th in threads:
            th.join()
        out["after"] = via_proxy("GET", "http://llm.gateway/v1/chat")
        save("expiry.json", out)
        while not os.path.exists("/workspace/again"):
            time.sleep(0.05)
        save("again.json", via_proxy("GET", "http://llm.gateway/v1/chat"))
        time.sleep(600)
    """
    _run(rig, "expirer", profile, script, detach=True)
    wait_for(lambda: rig.exists("expiry.json"), 150, what="the token's expiry to cut")
    expires_at = rig.daemon.agentctl_json("egress", "expirer")["token_expires_at"]
    opened = rig.read("opened.json")
    out = rig.read("expiry.json")
    assert opened < expires_at, "the connections must be opened while the token is valid"
    assert out["tunnel_first"].startswith("HTTP/1.1 200"), out
    assert out["drip_first"].startswith("HTTP/1.1 200"), out
    for name in ("tunnel", "waiting", "drip"):
        how, when = out[name]
        assert how != "still open", f"the {name} outlived the token: {out}"
        assert when >= expires_at - 0.5, f"the {name} was cut before the token expired"
    assert out["after"]["status"] == 403 and out["after"]["denied"] == "token_expired", out
    # Variant: pause and resume (which revives a suspended token) do not revive an expired one.
    rig.daemon.agentctl("pause", "expirer", "--reason", "check", check=True)
    rig.daemon.agentctl("resume", "expirer", check=True)
    rig.touch("again")
    wait_for(lambda: rig.exists("again.json"), 30, what="the request after resume")
    again = rig.read("again.json")
    assert again["status"] == 403 and again["denied"] == "token_expired", again
    rig.daemon.agentctl("kill", "expirer", "--reason", "test over", check=True)



def test_the_secret_never_comes_back_to_the_agent(rig: GatewayRig) -> None:
    # Every reply here is withheld; with the breaker on, that many refusals would pause the
    # agent (test_refusals_count_toward_the_breaker).
    profile = rig.profile("reflecting", LLM_ROUTE + _NO_BREAKER)
    script = """
        import json, sys, time
        sys.path.insert(0, "/workspace")
        from agentlib import *
        def get(path, method="GET", extra="", body=""):
            if body:
                extra += f"Content-Length: {len(body)}\\r\\n"
            return raw(f"{method} http://llm.gateway{path} HTTP/1.1\\r\\nHost: llm.gateway\\r\\n"
                       f"{extra}Connection: close\\r\\n\\r\\n{body}".encode())
        out = {}
        for how in ["json", "header", "reason", "b64", "b64&pad=1", "b64&pad=2",
                    "b64url&pad=1", "hex", "url", "gzip", "stream&pad=3000", "stream"]:
            out[how] = get(f"/reflect?as={how}", extra="Accept-Encoding: gzip\\r\\n")
        out["TRACE"] = get("/reflect", method="TRACE")
        out["override_header"] = get("/v1/items", extra="X-HTTP-Method-Override: DELETE\\r\\n")
        out["override_query"] = get("/v1/items?_method=DELETE")
        out["override_form"] = get("/v1/items", method="POST", body="a=1&_method=DELETE",
                                   extra="Content-Type: application/x-www-form-urlencoded\\r\\n")
        out["plain"] = get("/v1/chat")
        save("reflect.json", out)
        time.sleep(600)
    """
    _run(rig, "reflector", profile, script, detach=True)
    wait_for(lambda: rig.exists("reflect.json"), 60, what="the agent's requests")
    out = rig.read("reflect.json")
    everything = json.dumps(out).encode() + (rig.workspace / "reflect.json").read_bytes()
    for form in _secret_forms(rig.secret):
        assert form not in everything, f"a form of the secret reached the agent: {form!r}"
    for how in ("json", "header", "reason", "b64", "b64&pad=1", "b64&pad=2", "b64url&pad=1",
                "hex", "url"):
        assert out[how].startswith("HTTP/1.1 502") and "secret_reflected" in out[how], how
    assert "upstream_encoding_refused" in out["gzip"]
    for how in ("stream&pad=3000", "stream"):  # headers went out; the body is cut
        assert out[how].startswith("HTTP/1.1 200") and "secret_reflected" not in out[how]
    assert out["stream&pad=3000"].count("x") >= 2000, "the stream was passed on until then"
    assert out["TRACE"].startswith("HTTP/1.1 405") and "method_not_allowed" in out["TRACE"]
    assert "Allow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS" in out["TRACE"]
    for how in ("override_header", "override_query", "override_form"):
        assert out[how].startswith("HTTP/1.1 400") and "method_override_refused" in out[how]
    assert out["plain"].startswith("HTTP/1.1 200")
    methods = [s["method"] for s in rig.upstream.seen]
    assert "TRACE" not in methods and "DELETE" not in methods
    # The upstream did get the secret (it reflected it): the gateway withheld the replies.
    reflected = [s for s in rig.upstream.seen if s["path"].startswith("/reflect")]
    assert reflected and all(s["headers"]["Authorization"] == f"Bearer {rig.secret}"
                             for s in reflected)
    refused = {e["outcome"] for e in _audit(rig, "egress_denied") if e["target"] == "reflector"}
    assert {"refused:secret_reflected", "refused:method_not_allowed",
            "refused:method_override_refused"} <= refused
    rig.daemon.agentctl("kill", "reflector", "--reason", "test over", check=True)


# Every spelling must be held (and then expire: approval_denied) or refused 400.
_SPELLINGS = {
    "//v1/refunds": "POST", "/v1//refunds": "POST", "/v1/refunds/": "POST",
    "/V1/refunds": "POST", "/v1/refunds%2f": "POST", "/v1/refunds;x=1": "POST",
    "/v1/refunds?_method=POST": "GET", "/v1/refunds": "GET+override",
    # Variants of our own.
    "/v1/r%65funds": "POST", "/%76%31/REFUNDS": "POST", "/v1/./refunds": "POST",
    "/v1/x/../refunds": "POST", "/v1\\refunds": "POST", "/v1/refunds%252f": "POST",
    "/v1/refunds%5c": "POST", "/v1/refunds%00": "POST", "/v1/ref%C3%BCnds": "POST",
    "HTTP://LLM.GATEWAY//v1/refunds/": "POST", "/v1/refunds#x": "POST",
    "/v1/refunds?via=header": "GET+method-header",
}


def test_approval_rules_hold_every_spelling_of_a_path(rig: GatewayRig) -> None:
    profile = rig.profile("refunds", """
        [network.gateway]
        approvals = ["POST /v1/refunds"]
        approval_timeout = "3s"
        max_pending_approvals = 32
    """.replace("        ", "") + LLM_ROUTE + _NO_BREAKER)
    spellings = json.dumps(_SPELLINGS)
    script = f"""
        import json, sys, threading, time
        sys.path.insert(0, "/workspace")
        from agentlib import *
        spellings = json.loads({spellings!r})
        out = {{}}
        def send(path, how):
            target = path if path.startswith("HTTP") else "http://llm.gateway" + path
            method, extra = "POST", ""
            if how == "GET+override":
                method, extra = "GET", "X-HTTP-Method-Override: POST\\r\\n"
            elif how == "GET+method-header":
                method, extra = "GET", "X-HTTP-Method: POST\\r\\n"
            elif how == "GET":
                method = "GET"
            out[path] = raw(f"{{method}} {{target}} HTTP/1.1\\r\\nHost: llm.gateway\\r\\n"
                            f"{{extra}}Content-Length: 2\\r\\nConnection: close\\r\\n\\r\\n{{{{}}}}"
                            .encode())
        threads = [threading.Thread(target=send, args=item) for item in spellings.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        save("spellings.json", out)
        time.sleep(600)
    """
    _run(rig, "spellers", profile, script, detach=True)
    wait_for(lambda: rig.exists("spellings.json"), 90, what="the agent's spellings")
    out = rig.read("spellings.json")
    assert set(out) == set(_SPELLINGS)
    held, refused = [], []
    for path, reply in out.items():
        if reply.startswith("HTTP/1.1 403") and "approval_denied" in reply:
            held.append(path)
        elif reply.startswith("HTTP/1.1 400") and ("bad_request" in reply or
                                                    "method_override_refused" in reply):
            refused.append(path)
        else:
            raise AssertionError(f"{path!r} was neither held nor refused: {reply[:300]}")
    assert {"//v1/refunds", "/v1//refunds", "/v1/refunds/", "/V1/refunds", "/v1/r%65funds",
            "/%76%31/REFUNDS", "HTTP://LLM.GATEWAY//v1/refunds/"} <= set(held)
    assert {"/v1/refunds%2f", "/v1/refunds;x=1", "/v1/refunds?_method=POST", "/v1/refunds",
            "/v1/./refunds"} <= set(refused)
    assert not [s for s in rig.upstream.seen if "refund" in s["path"].lower()], \
        "a spelling of the held path reached the upstream"
    requested = [e for e in _audit(rig, "approval_requested") if e["target"] == "spellers"]
    assert len(requested) == len(held)
    rig.daemon.agentctl("kill", "spellers", "--reason", "test over", check=True)


_MALFORMED = [
    b"CONNECT xn--a.com:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT xn--ls8h.la:443 HTTP/1.1\r\n\r\n",
    b"CONNECT \xff\xfe.com:443 HTTP/1.1\r\n\r\n",
    b"CONNECT a..b:443 HTTP/1.1\r\n\r\n",
    b"CONNECT host:99999 HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: xn--a.com\r\n\r\n",
    b"GET http://xn--a.com/ HTTP/1.1\r\n\r\n",
    b"\x00\xffNOT HTTP\r\n\r\n",
    b"GET http://llm.gateway/ HTTP/1.1\r\nBad Header\r\n\r\n",
]


def test_malformed_requests_get_a_400_and_log_a_few_lines(rig: GatewayRig) -> None:
    profile = rig.profile("garbage", LLM_ROUTE + _NO_BREAKER)
    malformed = [m.decode("latin1") for m in _MALFORMED]
    script = f"""
        import json, sys, time
        sys.path.insert(0, "/workspace")
        from agentlib import *
        malformed = [m.encode("latin1") for m in json.loads({json.dumps(malformed)!r})]
        statuses = {{}}
        for i in range(400):
            reply = raw(malformed[i % len(malformed)], timeout=30)
            statuses.setdefault(reply[:12], 0)
            statuses[reply[:12]] += 1
        statuses["after"] = via_proxy("GET", "http://llm.gateway/v1/chat")["status"]
        save("malformed.json", statuses)
        time.sleep(600)
    """
    before = rig.daemon.logs()
    _run(rig, "garbler", profile, script, detach=True)
    wait_for(lambda: rig.exists("malformed.json"), 120, what="the agent's malformed requests")
    statuses = rig.read("malformed.json")
    assert statuses.pop("after") == 200
    assert set(statuses) <= {"HTTP/1.1 400", "HTTP/1.0 400"}, statuses
    assert sum(statuses.values()) == 400
    log = rig.daemon.logs()[len(before):]
    assert "Traceback" not in log and "Error handling request" not in log
    lines = [line for line in log.splitlines() if "malformed request" in line]
    assert 1 <= len(lines) <= 5, lines  # one per 10 s
    usage = rig.daemon.agentctl_json("egress", "garbler")["usage"]
    assert usage["denied"] == 400
    rig.daemon.agentctl("kill", "garbler", "--reason", "test over", check=True)


def test_refusals_approvals_and_uploads_stay_bounded(rig: GatewayRig) -> None:
    import psutil

    profile = rig.profile("bounded", """
        [network.gateway]
        approvals = ["POST /v1/refunds"]
        approval_timeout = "10m"
        max_pending_approvals = 4
        [network.gateway.breaker]
        enabled = false
    """.replace("        ", "") + LLM_ROUTE)
    script = r"""
        import os, socket, sys, threading, time
        sys.path.insert(0, "/workspace")
        from agentlib import *
        # Refused CONNECTs to unique long names (250 and 3,000 characters).
        sent = 0
        for i in range(1500):
            labels = 3 if i % 2 else 48
            name = ".".join([f"n{i}"] + ["x" * 60] * labels) + ".com"
            raw(f"CONNECT {name}:443 HTTP/1.1\r\nHost: {name}\r\n\r\n".encode(), timeout=30)
            sent += 1
        # Thirty held approvals at once; the agent then hangs up on them.
        socks = []
        for _ in range(30):
            s = socket.create_connection((GW_HOST, GW_PORT), timeout=30)
            s.sendall(("POST http://llm.gateway/v1/refunds HTTP/1.1\r\nHost: llm.gateway\r\n"
                       f"Proxy-Authorization: {AUTH}\r\nContent-Length: 2\r\n\r\n{{}}").encode())
            socks.append(s)
        import select
        answered, deadline = {}, time.time() + 60
        while len(answered) < 26 and time.time() < deadline:
            ready, _, _ = select.select([s for s in socks if s not in answered], [], [], 1)
            for s in ready:
                answered[s] = s.recv(200).decode(errors="replace")[:40]
        replies = [answered.get(s, "held") for s in socks]
        save("refusals.json", {"sent": sent, "replies": replies})
        while not os.path.exists("/workspace/hangup"):
            time.sleep(0.05)
        for s in socks:
            s.close()
        # Eight uploads of 60 MB at once, streamed from one buffer.
        def upload(results):
            s = socket.create_connection((GW_HOST, GW_PORT), timeout=300)
            total = 60 * 1024 * 1024
            s.sendall(("POST http://llm.gateway/upload HTTP/1.1\r\nHost: llm.gateway\r\n"
                       f"Proxy-Authorization: {AUTH}\r\nContent-Length: {total}\r\n"
                       "Connection: close\r\n\r\n").encode())
            block = b"u" * (1024 * 1024)
            for _ in range(60):
                s.sendall(block)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            results.append(data.decode(errors="replace")[-40:])
        results = []
        save("uploading.json", True)
        threads = [threading.Thread(target=upload, args=(results,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        save("uploads.json", results)
        time.sleep(600)
    """
    _run(rig, "grower", profile, script, detach=True)
    wait_for(lambda: rig.exists("refusals.json"), 300, what="the agent's refusals")
    refusals = rig.read("refusals.json")
    replies = refusals["replies"]
    assert replies.count("held") == 4, replies  # the cap; the rest answered at once
    assert all(r.startswith("HTTP/1.1 429") for r in replies if r != "held"), replies
    pending = rig.daemon.agentctl_json("approvals")["approvals"]
    assert len(pending) == 4
    denied_rows = [e for e in _audit(rig, "egress_denied") if e["target"] == "grower"]
    assert len(denied_rows) <= 50
    assert max(len(json.dumps(e)) for e in denied_rows) < 4096
    usage = rig.daemon.agentctl_json("egress", "grower")["usage"]
    assert usage["denied"] == refusals["sent"] + 26

    rig.touch("hangup")  # the agent hangs up on its held requests: each is withdrawn
    wait_for(lambda: not rig.daemon.agentctl_json("approvals")["approvals"], 30,
             what="the held approvals to be withdrawn")
    withdrawn = [e for e in _audit(rig, "approval_denied") if e["target"] == "grower"]
    assert len(withdrawn) == 4 and {e["outcome"] for e in withdrawn} == {"cancelled"}
    assert {e["reason"] for e in withdrawn} == {"the agent hung up"}

    daemon = psutil.Process(rig.daemon.proc.pid) if rig.daemon.proc else None
    assert daemon is not None

    def rss() -> int:
        tree = [daemon, *daemon.children(recursive=True)]
        total = 0
        for process in tree:
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        return total

    wait_for(lambda: rig.exists("uploading.json"), 60, what="the uploads to start")
    baseline, peak = rss(), 0
    while not rig.exists("uploads.json"):
        peak = max(peak, rss())
        time.sleep(0.1)
    results = rig.read("uploads.json")
    assert len(results) == 8 and all('"received": 62914560' in r for r in results), results
    growth = peak - baseline
    print(f"daemon RSS during 8 x 60 MB uploads: +{growth / 2**20:.0f} MiB")
    assert growth < 200 * 2**20, "request bodies must stream, not pile up in the gateway"

    rig.daemon.agentctl("kill", "grower", "--reason", "test over", check=True)
    summary = [e for e in _audit(rig, "egress_summary") if e["target"] == "grower"][-1]
    assert len(json.dumps(summary)) < 32 * 1024
    assert sum(summary["detail"]["denials"].values()) == usage["denied"]


def test_refusals_count_toward_the_breaker(rig: GatewayRig) -> None:
    profile = rig.profile("probing", LLM_ROUTE + _breaker(min_requests=10))
    script = """
        import sys, time
        sys.path.insert(0, "/workspace")
        from agentlib import *
        for i in range(200):  # probing names off the allow-list
            raw(f"CONNECT probe{i}.example.com:443 HTTP/1.1\\r\\n\\r\\n".encode(), timeout=10)
        time.sleep(600)
    """
    _paused_by_the_breaker(rig, "prober2", profile, script, 60)
    rig.daemon.agentctl("kill", "prober2", "--reason", "test over", check=True)


# ----------------------------------------------------------------------------- helpers


def _listen_on_host() -> int:
    """A TCP listener on every host address, to prove the sandbox still cannot reach it."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 0))
    server.listen(16)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    port: int = server.getsockname()[1]
    return port


def _host_ifname(gateway_ip: str) -> str:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for addr in ipr.get_addr(family=socket.AF_INET):
            if addr.get_attr("IFA_ADDRESS") == gateway_ip:
                name: str = ipr.get_links(addr["index"])[0].get_attr("IFLA_IFNAME")
                return name
    raise AssertionError(f"no host interface holds {gateway_ip}")


def _link_up(ifname: str) -> bool:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        flags: int = ipr.get_links(index)[0]["flags"]
        return bool(flags & 1)  # IFF_UP


def _tunnel_cut(tunnel: Any, timeout: float = 10.0) -> bool:
    tunnel.settimeout(timeout)
    try:
        return tunnel.recv(100) == b""
    except (ConnectionError, OSError):
        return True
    finally:
        tunnel.close()
