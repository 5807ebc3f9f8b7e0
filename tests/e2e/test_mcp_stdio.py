"""Stdio MCP servers end to end: a real daemon starts the official SDK's FastMCP (transport
"stdio", tests/support/mcp_stdio_server.py) in a runc sandbox of its own when the agent's run
starts; the SDK client inside the agent's runc sandbox reaches it only as
`http://mcp.gateway/files`, through the gateway worker's bridge. The server runs on a uid,
cgroup and network namespace of its own (loopback only: it reaches neither the agent, the
gateway nor the host), holds its secrets (environment and file) that the agent never sees,
and dies with the agent's kill; nothing of it is left on the host."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.sandbox.cgroups import Cgroup
from tests.conftest import require, require_root_and_runc
from tests.support.daemon import wait_for
from tests.support.egress import GatewayRig, gateway_rig

SUPPORT = Path(__file__).resolve().parents[1] / "support"
ENV_SECRET = "files-token-7a6b5c4d3e2f"
FILE_SECRET = "db-key-0f1e2d3c4b5a"

AGENT = r'''
import asyncio, json, os, sys

from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

def save(name, value):
    with open(f"/workspace/.{name}", "w") as f:
        json.dump(value, f)
    os.rename(f"/workspace/.{name}", f"/workspace/{name}")

async def main():
    gateway_ip, gateway_port = os.environ["AGENT_SUPERVISOR_GATEWAY"].split(":")
    out = {"agent_env": sorted(k for k in os.environ if "TOKEN" in k),
           "agent_sees_secrets": os.path.exists("/run/secrets")}
    async with streamable_http_client("http://mcp.gateway/files") as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            out["tools"] = sorted(t.name for t in (await session.list_tools()).tools)
            out["echo"] = (await session.call_tool("echo", {"text": "hi"})).content[0].text
            who = await session.call_tool("whoami", {})
            out["whoami"] = json.loads(who.content[0].text)
            out["to_gateway"] = (await session.call_tool(
                "connect", {"host": gateway_ip, "port": int(gateway_port)})).content[0].text
            out["to_host"] = (await session.call_tool(
                "connect", {"host": "127.0.0.1", "port": int(sys.argv[1])})).content[0].text
            save("stdio.json", out)
            await session.call_tool("slow", {"seconds": 600})
            save("slow-finished.json", {})

asyncio.run(main())
'''

PROFILE = """
[filesystem]
host_binds = ["/usr", "/etc", "{VENV}"]

[network.gateway.breaker]
enabled = false

[[network.gateway.mcp.servers]]
name = "files"
command = ["{VENV}/bin/python", "-P", "-u", "{SUPPORT}/mcp_stdio_server.py"]
binds = ["{VENV}", "{SUPPORT}"]
secret_env = { FILES_TOKEN = "file:files-token" }
secret_files = { "db.key" = "file:db-key" }
allow = ["echo", "whoami", "connect", "slow"]

[network.gateway.mcp.servers.limits]
memory = "192M"
pids = 32
"""


@contextlib.contextmanager
def stdio_rig(tmp_root: Path, daemon_config: dict[str, Any] | None = None
              ) -> Iterator[GatewayRig]:
    """A gateway rig with the secrets PROFILE's server is given (test_handover_mcp.py too)."""
    require_root_and_runc()
    require(shutil.which("nft") is not None, "needs nft (apt-get install nftables)")
    with gateway_rig(tmp_root, "runc", daemon_config) as prepared:
        for name, value in (("files-token", ENV_SECRET), ("db-key", FILE_SECRET)):
            path = tmp_root / "secrets" / name
            path.write_text(value + "\n")
            path.chmod(0o600)
        yield prepared


@pytest.fixture
def rig(tmp_root: Path) -> Iterator[GatewayRig]:
    with stdio_rig(tmp_root) as prepared:
        yield prepared


def _status_ids(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["Uid"].split()[1]), int(fields["Gid"].split()[1])


def _limit(relative: str, controller: str, files: tuple[str, ...]) -> str:
    for directory in (Cgroup(relative).path, Path("/sys/fs/cgroup") / controller / relative):
        for name in files:
            if (directory / name).exists():
                return (directory / name).read_text().strip()
    raise AssertionError(f"no {controller} limit for {relative}")


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def test_stdio_server_in_its_own_sandbox_reached_only_through_the_gateway(
        rig: GatewayRig) -> None:
    venv = str(Path(sys.prefix).resolve())
    profile = rig.profile("mcp-stdio", PROFILE.replace("{VENV}", venv).replace(
        "{SUPPORT}", str(SUPPORT)))
    path = rig.script("stdio_agent.py", AGENT)
    view = rig.daemon.agentctl_json(
        "run", "--name", "filer", "--profile", profile, "--workspace", str(rig.workspace),
        "--detach", "--", f"{venv}/bin/python", "-u", path, str(rig.upstream.port))
    run_id = view["id"]
    container = f"{rig.daemon.prefix}-{run_id}"
    server_cgroup = Cgroup(f"{rig.daemon.cgroup_parent.strip('/')}/{container}-mcp0")
    agent_cgroup = Cgroup(f"{rig.daemon.cgroup_parent.strip('/')}/{container}")

    out: dict[str, Any] = rig.result("stdio.json", "filer", "the agent's results")
    assert out["tools"] == ["connect", "echo", "slow", "whoami"]  # exec_shell: not allowed
    assert out["echo"] == "echo: hi"
    who = out["whoami"]
    # The secrets reached the server, as environment and as a file; never the agent.
    assert who["env_secret"] == _digest(ENV_SECRET)
    assert who["file_secret"] == _digest(FILE_SECRET)
    assert out["agent_env"] == [] and out["agent_sees_secrets"] is False
    agent_bundle = (rig.daemon.root / "run" / "bundles" / container / "config.json").read_text()
    assert ENV_SECRET not in agent_bundle and FILE_SECRET not in agent_bundle
    # Loopback only: neither the gateway's address (the agent's only peer) nor the host.
    assert who["interfaces"] == ["lo"]
    assert out["to_gateway"] in ("OSError", "ConnectionRefusedError", "TimeoutError")
    assert out["to_host"] in ("OSError", "ConnectionRefusedError", "TimeoutError")
    # Its own cgroup (beside the agent's, not in it) and its own host uid.
    server_pids, agent_pids = server_cgroup.pids(), agent_cgroup.pids()
    assert server_pids and agent_pids and not set(server_pids) & set(agent_pids)
    server_uid = {_status_ids(pid)[0] for pid in server_pids}
    agent_uid = {_status_ids(pid)[0] for pid in agent_pids}
    assert len(server_uid) == 1 and server_uid.isdisjoint(agent_uid)
    assert min(server_uid) >= 65536  # unprivileged: a user namespace's mapped id
    # The server's limits, on the unified tree or (hybrid hosts) the v1 controllers.
    relative = server_cgroup.relative
    assert _limit(relative, "pids", ("pids.max",)) == "32"
    assert _limit(relative, "memory", ("memory.max", "memory.limit_in_bytes")) == \
        str(192 * 1024**2)

    # The kill: the agent first, then the server, whose `slow` call was in flight.
    rig.daemon.agentctl("kill", "filer", "--reason", "test", check=True)
    wait_for(lambda: not server_cgroup.exists(), 30, what="the server's cgroup removed")
    assert not rig.exists("slow-finished.json")
    assert rig.daemon.clean() == {}
    entries = rig.daemon.agentctl_json("audit", "--limit", "200")["entries"]
    calls = [(e["detail"]["server"], e["detail"]["tool"], e["outcome"]) for e in entries
             if e["verb"] == "mcp_call"]
    assert ("files", "whoami", "allowed") in calls and ("files", "slow", "allowed") in calls
