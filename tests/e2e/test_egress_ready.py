"""A gateway run's agent starts with its network in place, on both runtimes: its first
instruction already sees its link to the host (eth0, its address's route) and reaches the
gateway. runc runs join a namespace wired before the start; a docker run's namespace is the
engine's, made at the container's start, so its first process waits at the network gate
(supervisor/runtime/network_gate.py) until the daemon has attached the link and its nft rules.
Needs root, runc, nft and (for the docker case) dockerd."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BOTH_RUNTIMES, require, require_root_and_runc
from tests.support.egress import LLM_ROUTE, GatewayRig, gateway_rig

# As fast a first instruction as a sandbox has: a shell's builtin read of the run's own
# routing table, then one connect to the gateway.
FIRST = ('read -r _ < /proc/net/route; cat /proc/net/route; '
         'python3 -c "import os, socket; '
         "host, port = os.environ['HTTP_PROXY'].rpartition('@')[2].split(':'); "
         "socket.create_connection((host, int(port.strip('/'))), timeout=10).close(); "
         "print('gateway reached')\"")
RUNS = 5


@pytest.fixture
def rig(tmp_root: Path, runtime: str) -> Iterator[GatewayRig]:
    require_root_and_runc()
    require(shutil.which("nft") is not None, "needs nft (apt-get install nftables)")
    with gateway_rig(tmp_root, runtime) as prepared:
        yield prepared


@BOTH_RUNTIMES
def test_the_agents_first_instruction_finds_its_network_in_place(rig: GatewayRig) -> None:
    profile = rig.profile("gw", LLM_ROUTE)
    for attempt in range(RUNS):
        result = rig.daemon.agentctl("run", "--name", f"first{attempt}", "--profile", profile,
                                     "--", "/bin/sh", "-c", FIRST)
        routes = [line.split()[0] for line in result.stdout.splitlines()[1:]
                  if line and not line.startswith("gateway")]
        assert "eth0" in routes, (attempt, result.stdout, result.stderr)
        assert result.stdout.splitlines()[-1] == "gateway reached", (attempt, result)
        assert result.returncode == 0, (attempt, result)
