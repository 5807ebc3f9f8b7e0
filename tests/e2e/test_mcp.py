"""The MCP gateway end to end: a real daemon, a real runc sandbox in network mode `gateway`, the
official MCP SDK's client inside it (the test venv's interpreter, bound read-only into the
sandbox) reaching the official SDK's server (streamable HTTP over TLS on the host's loopback)
only through `http://mcp.gateway/code`. Allowed, denied, argument-denied, held then approved
through `agentctl approve`, budget spent, a direct connection to the server refused, and a kill
while a call is in flight; the decisions are read back from the audit log."""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require, require_root_and_runc
from tests.support.daemon import wait_for
from tests.support.egress import GatewayRig, gateway_rig
from tests.support.mcp import MCP_NAME, TOKEN, McpUpstream
from tests.support.upstream import NAMES

# The SDK's streamable HTTP server leaves anyio memory streams for the garbage collector (see
# tests/unit/test_mcp_gateway.py); only that warning is ignored, collected before the test ends.
pytestmark = pytest.mark.filterwarnings("ignore:Unclosed <MemoryObject:ResourceWarning")

# The agent: the SDK client with HTTP_PROXY from its environment, as any MCP client would be.
AGENT = r'''
import asyncio, json, os, socket, sys

from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError

SERVER_PORT = int(sys.argv[1])

def save(name, value):
    with open(f"/workspace/.{name}", "w") as f:
        json.dump(value, f)
    os.rename(f"/workspace/.{name}", f"/workspace/{name}")

def direct(host):
    try:
        socket.create_connection((host, SERVER_PORT), timeout=3).close()
        return "connected"
    except OSError as e:
        return type(e).__name__

async def call(session, tool, args):
    try:
        result = await session.call_tool(tool, args)
        return {"isError": result.isError,
                "text": "".join(getattr(c, "text", "") for c in result.content)}
    except McpError as e:
        return {"code": e.error.code, "message": e.error.message, "data": e.error.data}

async def main():
    out = {"direct": {h: direct(h) for h in ("127.0.0.1", os.environ[
        "AGENT_SUPERVISOR_GATEWAY"].split(":")[0])}}
    async with streamable_http_client("http://mcp.gateway/code") as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            out["tools"] = sorted(t.name for t in (await session.list_tools()).tools)
            out["read_file"] = await call(session, "read_file", {"path": "/workspace/a.py"})
            out["exec_shell"] = await call(session, "exec_shell", {"command": "id"})
            out["delete"] = await call(session, "run_sql", {"query": "DELETE FROM users"})
            out["select"] = await call(session, "run_sql", {"query": "SELECT 1"})
            out["search"] = [await call(session, "search", {"query": q}) for q in "abc"]
            out["drop_table"] = await call(session, "drop_table", {"table": "sessions"})
            save("mcp.json", out)
            await call(session, "slow", {"seconds": 600})
            save("slow-finished.json", {})

asyncio.run(main())
'''

PROFILE = """
[filesystem]
host_binds = ["/usr", "/etc", "{VENV}"]

[network.gateway]
approval_timeout = "60s"
[network.gateway.breaker]
enabled = false
[network.gateway.budget]
action = "alert"  # the mcp_budget tripwire is recorded; the agent goes on

[[network.gateway.mcp.servers]]
name = "code"
url = "{URL}"
secret = "file:code-mcp-token"
allow = ["read_file", "search", "run_sql", "drop_table", "slow"]

[network.gateway.mcp.servers.tools.read_file]
require = '''args.path.startsWith("/workspace/")'''
[network.gateway.mcp.servers.tools.run_sql]
require = '''args.query.matches(r"(?is)^\\s*select\\b[^;]*;?\\s*$")'''
as_tool_error = true
[network.gateway.mcp.servers.tools.search]
max_calls = 2
[network.gateway.mcp.servers.tools.drop_table]
approval = true
"""


@contextlib.contextmanager
def remote_rig(tmp_root: Path, daemon_config: dict[str, Any] | None = None
               ) -> Iterator[GatewayRig]:
    """A gateway rig whose daemon reaches the SDK's server (McpUpstream) with its token
    (test_handover_mcp.py too)."""
    require_root_and_runc()
    require(shutil.which("nft") is not None, "needs nft (apt-get install nftables)")
    assert MCP_NAME in NAMES, "the test CA must name the MCP server"
    secrets = tmp_root / "secrets"
    hosts = {name: "127.0.0.1" for name in NAMES}
    with gateway_rig(tmp_root, "runc", daemon_config, hosts=hosts) as prepared:
        token = secrets / "code-mcp-token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
        yield prepared


@pytest.fixture
def rig(tmp_root: Path) -> Iterator[GatewayRig]:
    with remote_rig(tmp_root) as prepared:
        yield prepared


def _audit(rig: GatewayRig, verb: str) -> list[dict[str, Any]]:
    entries = rig.daemon.agentctl_json("audit", "--limit", "1000")["entries"]
    return [e for e in entries if e["verb"] == verb]


def test_sdk_client_in_a_sandbox_is_judged_held_audited_and_cut_by_kill(
        rig: GatewayRig) -> None:
    server = McpUpstream(rig.ca).start()
    try:
        venv = str(Path(sys.prefix).resolve())
        profile = rig.profile("mcp", PROFILE.replace("{VENV}", venv).replace("{URL}",
                                                                              server.url))
        path = rig.script("mcp_agent.py", AGENT)
        rig.daemon.agentctl_json("run", "--name", "tooler", "--profile", profile,
                                 "--workspace", str(rig.workspace), "--detach", "--",
                                 f"{venv}/bin/python", "-u", path, str(server.port))

        held = wait_for(lambda: rig.daemon.agentctl_json("approvals")["approvals"], 90,
                        what="the held drop_table call")[0]
        assert (held["method"], held["host"]) == ("MCP", "mcp.gateway/code")
        assert held["path"].startswith("tools/call drop_table") and "sessions" in held["path"]
        assert "drop_table" not in [c[0] for c in server.log.calls], "held, not sent"
        rig.daemon.agentctl("approve", held["id"], "--reason", "ticket 7", check=True)
        wait_for(lambda: rig.exists("mcp.json"), 60, what="the agent's results")
        out = rig.read("mcp.json")

        # The sandbox reaches neither the server's address nor its port on the gateway.
        assert set(out["direct"].values()) <= {"ConnectionRefusedError", "OSError",
                                               "TimeoutError", "timeout"}, out["direct"]
        assert out["tools"] == ["drop_table", "read_file", "run_sql", "search", "slow"]
        assert out["read_file"]["text"] == "contents of /workspace/a.py"
        assert out["exec_shell"]["code"] == -32602  # unknown tool, as if absent
        assert out["delete"]["isError"] and "run_sql.require" in out["delete"]["text"]
        assert out["select"] == {"isError": False, "text": "1 row"}
        assert [s.get("data", {}).get("reason") for s in out["search"]] == [
            None, None, "budget_exhausted"]
        assert out["drop_table"]["text"] == "dropped sessions"
        # The credential came from the gateway; the agent never had it.
        assert set(server.log.authorizations) == {f"Bearer {TOKEN}"}
        assert [c[0] for c in server.log.calls] == [
            "read_file", "run_sql", "search", "search", "drop_table", "slow"][:len(
                server.log.calls)]

        # Kill while `slow` is in flight: the stream is cut, the call never finishes, and the
        # server is told it is cancelled (the tool stops there too).
        assert server.log.slow_started.wait(60)
        rig.daemon.agentctl("kill", "tooler", "--reason", "test", check=True)
        assert server.log.slow_cancelled.wait(60)
        assert not rig.exists("slow-finished.json")
        assert not server.log.release.is_set()

        rows = _audit(rig, "mcp_call")
        outcomes = [(r["detail"]["tool"], r["outcome"]) for r in rows]
        for expected in [("read_file", "allowed"), ("exec_shell", "denied:tool_denied"),
                         ("run_sql", "denied:argument_denied"), ("run_sql", "allowed"),
                         ("search", "denied:budget_exhausted"),
                         ("drop_table", "held:approval_required"), ("drop_table", "approved"),
                         ("slow", "allowed")]:
            assert expected in outcomes, (expected, outcomes)
        assert all(len(r["detail"]["args_sha256"]) == 64 for r in rows if r["detail"]["tool"])
        assert [e["outcome"] for e in _audit(rig, "approval_granted")] == ["approved"]
        assert any("mcp_budget" in json.dumps(e) for e in rig.daemon.agentctl_json(
            "audit", "--limit", "1000")["entries"] if e["verb"] != "mcp_call")
    finally:
        server.stop()
        gc.collect()
