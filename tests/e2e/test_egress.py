"""The egress gateway end to end: a real daemon, real sandboxes with a veth and nftables rules,
real HTTPS upstreams on loopback behind a test CA. What the agent can and cannot reach, where
the secret is not, tokens revoked by pause and kill, budgets, the breaker and approvals."""

from __future__ import annotations

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

def via_proxy(method, url, body=None, auth=True):
    handler = urllib.request.ProxyHandler({"http": PROXY if auth else f"http://{gw}"})
    opener = urllib.request.build_opener(handler)
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with opener.open(req, timeout=30) as r:
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
    rig.daemon.agentctl("kill", "spender", check=True)


def test_breaker_trips_on_errors_pauses_and_a_human_resets_it(rig: GatewayRig) -> None:
    profile = rig.profile("breaker", LLM_ROUTE + """
        [network.gateway.breaker]
        window = "60s"
        min_requests = 4
        max_error_rate = 0.5
        max_rate = 1000
    """.replace("        ", ""))
    script = """
        import sys, time
        sys.path.insert(0, "/workspace")
        from agentlib import *
        save("errors.json", [via_proxy("GET", "http://llm.gateway/fail") for _ in range(4)])
        time.sleep(600)
    """
    _run(rig, "flaky", profile, script, detach=True)
    wait_for(lambda: _state(rig, "flaky") == "paused", 30, what="the breaker's pause")
    fired = [e for e in _audit(rig, "tripwire") if e["detail"]["rule"] == "egress_breaker"]
    assert len(fired) == 1 and fired[0]["outcome"] == "pause"
    assert "error rate" in fired[0]["detail"]["breaker"]
    view = rig.daemon.agentctl_json("egress", "flaky")
    assert view["breaker"] and view["usage"]["errors"] == 4
    env = rig.proxy_env("flaky")
    rig.daemon.agentctl("resume", "flaky", check=True)
    reply = host_request(env, b"GET http://llm.gateway/v1/chat HTTP/1.1\r\nHost: llm.gateway"
                         b"\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 503") and b"breaker_open" in reply, reply
    rig.daemon.agentctl("breaker", "reset", "flaky", "--reason", "upstream fixed", check=True)
    reply = host_request(env, b"GET http://llm.gateway/v1/chat HTTP/1.1\r\nHost: llm.gateway"
                         b"\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200"), reply
    again = rig.daemon.agentctl("breaker", "reset", "flaky", "--json")
    assert again.returncode == 4 and "breaker_not_tripped" in again.stdout
    assert [e["reason"] for e in _audit(rig, "breaker_reset")] == ["upstream fixed"]
    rig.daemon.agentctl("kill", "flaky", check=True)


def test_approvals_granted_denied_and_timed_out(rig: GatewayRig) -> None:
    profile = rig.profile("approve", """
        [network.gateway]
        approvals = ["DELETE *", "POST /v1/refunds"]
        approval_timeout = "4s"
    """.replace("        ", "") + LLM_ROUTE)
    script = """
        import sys, time
        sys.path.insert(0, "/workspace")
        from agentlib import *
        out = {}
        out["delete"] = via_proxy("DELETE", "http://llm.gateway/v1/items/1")
        out["refund"] = via_proxy("POST", "http://llm.gateway/v1/refunds", b"{}")
        out["unanswered"] = via_proxy("DELETE", "http://llm.gateway/v1/items/2")
        out["plain_get"] = via_proxy("GET", "http://llm.gateway/v1/items")
        save("approvals.json", out)
        time.sleep(600)
    """
    _run(rig, "refunder", profile, script, detach=True)

    def pending() -> list[dict[str, Any]]:
        held: list[dict[str, Any]] = rig.daemon.agentctl_json("approvals")["approvals"]
        return held

    first = wait_for(pending, 30, what="the first held request")[0]
    assert (first["method"], first["path"], first["rule"]) == ("DELETE", "/v1/items/1",
                                                              "DELETE *")
    assert not [s for s in rig.upstream.seen if s["method"] == "DELETE"], "held, not sent"
    rig.daemon.agentctl("approve", first["id"], "--reason", "ticket 42", check=True)
    second = wait_for(lambda: [a for a in pending() if a["path"] == "/v1/refunds"], 30,
                      what="the refund request")[0]
    refused = rig.daemon.agentctl("deny", second["id"])
    assert refused.returncode != 0, "deny needs --reason"
    rig.daemon.agentctl("deny", second["id"], "--reason", "no refunds today", check=True)
    wait_for(lambda: rig.exists("approvals.json"), 30, what="the agent's results")
    out = rig.read("approvals.json")
    assert out["delete"]["status"] == 200
    assert out["refund"]["status"] == 403 and out["refund"]["denied"] == "approval_denied"
    assert "no refunds today" in out["refund"]["body"]
    assert out["unanswered"]["status"] == 403
    assert out["unanswered"]["denied"] == "approval_denied"
    assert out["plain_get"]["status"] == 200
    assert [s["path"] for s in rig.upstream.seen if s["method"] != "GET"] == ["/v1/items/1"]
    requested = _audit(rig, "approval_requested")
    assert len(requested) == 3
    assert [e["outcome"] for e in _audit(rig, "approval_granted")] == ["approved"]
    assert [e["outcome"] for e in _audit(rig, "approval_denied")] == ["denied", "expired"]
    missing = rig.daemon.agentctl("approve", "ffffffff", "--json")
    assert missing.returncode == 3 and "approval_not_found" in missing.stdout
    rig.daemon.agentctl("kill", "refunder", check=True)


def test_missing_secret_refuses_the_launch_and_leaves_nothing(rig: GatewayRig) -> None:
    profile = rig.profile("nosecret", LLM_ROUTE.replace("file:llm-key", "file:absent-key"))
    result = rig.daemon.agentctl("run", "--name", "nokey", "--profile", profile, "--json",
                                 "--", "true")
    assert result.returncode == 10, result.stdout + result.stderr
    body = json.loads(result.stdout)["error"]
    assert body["code"] == "egress_setup_failed" and "absent-key" in body["message"]
    assert not rig.daemon.residue()
    failed = [e for e in _audit(rig, "launch") if e["target"] == "nokey"]
    assert failed and failed[-1]["outcome"] == "failed:egress_setup_failed"


def test_bad_input_and_a_flood_never_stall_other_agents_or_the_control_socket(
        rig: GatewayRig) -> None:
    profile = rig.profile("gw", LLM_ROUTE + """
        [network.gateway.breaker]
        enabled = false
    """.replace("        ", ""))
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
    rig.daemon.agentctl("kill", "--all", check=True)


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
