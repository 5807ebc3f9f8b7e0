"""Benchmark: what a restart costs a run behind the egress gateway (issue 13), with a route or
with a stdio MCP server, against the same restart with a run that has no network, in the same
run.

Per round, in alternating order, one agent (`sleep`, runc) is launched (not timed), the daemon
is restarted with agents kept (SIGUSR2, then a new daemon), and the agent is killed (not
timed):

- gateway: the agent's profile routes `llm.gateway` to an HTTPS upstream on loopback. From the
  host, with the run's own token, a request through the run's gateway address every 5 ms from
  the SIGUSR2 until one is answered 200: `outage_ms` is how long the agent's gateway did not
  answer (SIGUSR2 -> first 200; the old daemon's exit, the new one's start, the new gateway
  worker's start and the adoption all inside it);
- mcp: as gateway, with a stdio MCP server (the SDK's FastMCP, tests/support/
  mcp_stdio_server.py, in its own sandbox) instead of a route. Before the restart the host
  initializes the server's MCP session through the run's gateway address; from the SIGUSR2,
  a `tools/call echo` every 5 ms until one is answered with its result: `outage_ms` is how
  long the agent could not call its server (the server's handover and adoption inside it);
- plain: the default profile (no network): the baseline.

Both sides report `exit_ms` (SIGUSR2 -> the daemon has exited) and `start_ms` (new daemon
started -> its control socket answers; the adoption is before that, so the new gateway
worker's start is in the gateway side's figure). Prints median, p95 (nearest rank), min and
max. No target: the figures to watch are the outage, and what a gateway run adds to the
restart over the baseline.

Needs root, runc and nft. Starts its own daemon, upstream and CA (own state directory, cgroup
parent, name prefix, address pool) and removes everything it made.

    sudo .venv/bin/python bench/restart_gateway.py [--rounds 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor.sandbox.cgroups import Cgroup
from tests.support.daemon import Daemon, new_daemon, wait_for
from tests.support.egress import LLM_ROUTE, host_request
from tests.support.upstream import Upstream, make_ca

BENCH_CGROUP_ROOT = "/agent-supervisor-bench"
MCP_PROFILE = """[network]
mode = "gateway"

[filesystem]
host_binds = ["/usr", "/etc", "{VENV}"]

[network.gateway.breaker]
enabled = false

[[network.gateway.mcp.servers]]
name = "files"
command = ["{VENV}/bin/python", "-P", "-u", "{SUPPORT}/mcp_stdio_server.py"]
binds = ["{VENV}", "{SUPPORT}"]
allow = ["echo"]
"""
CHAT = (b"GET http://llm.gateway/v1/chat HTTP/1.1\r\nHost: llm.gateway\r\n"
        b"Connection: close\r\n\r\n")


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[max(0, -(-len(ordered) * 95 // 100) - 1)]
    return {"median": round(statistics.median(ordered), 1), "p95": round(p95, 1),
            "min": round(ordered[0], 1), "max": round(ordered[-1], 1)}


def _proxy_env(daemon: Daemon, name: str) -> dict[str, str]:
    run_id = daemon.client.agent(name)["run"]["id"]  # type: ignore[index]
    bundle = daemon.root / "run" / "bundles" / f"{daemon.prefix}-{run_id}"
    env = json.loads((bundle / "config.json").read_text())["process"]["env"]
    return dict(item.split("=", 1) for item in env)


def _mcp_post(message: dict[str, object]) -> bytes:
    body = json.dumps(message).encode()
    return (b"POST http://mcp.gateway/files HTTP/1.1\r\nHost: mcp.gateway\r\n"
            b"Content-Type: application/json\r\nAccept: application/json, text/event-stream"
            b"\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


MCP_INIT = _mcp_post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "bench", "version": "1"}}})
MCP_INITIALIZED = _mcp_post({"jsonrpc": "2.0", "method": "notifications/initialized"})
MCP_CALL = _mcp_post({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "echo", "arguments": {"text": "x"}}})


def _answered(env: dict[str, str], request: bytes = CHAT) -> bool:
    try:
        reply = host_request(env, request, timeout=2.0)
    except OSError:
        return False
    return reply.startswith(b"HTTP/1.1 200") and (request is not MCP_CALL
                                                  or b"echo: x" in reply)


def _round(daemon: Daemon, kind: str, n: int) -> dict[str, float]:
    name = f"{kind}{n}"
    profile = ["--profile", {"gateway": "gw", "mcp": "mcpgw"}[kind]] if kind != "plain" \
        else []
    daemon.agentctl("run", "--detach", "--name", name, *profile, "--", "sleep", "3600",
                    check=True)
    wait_for(daemon.agent_pids, timeout=60, what="the agent")
    env = _proxy_env(daemon, name) if kind != "plain" else {}
    probe = MCP_CALL if kind == "mcp" else CHAT
    if kind == "mcp":
        wait_for(lambda: _answered(env, MCP_INIT), timeout=30, what="the MCP server")
        host_request(env, MCP_INITIALIZED, timeout=2.0)
    if env:
        wait_for(lambda: _answered(env, probe), timeout=30,
                 what="the gateway before the restart")
    pids = sorted(daemon.agent_pids())
    t0 = time.perf_counter()
    code = daemon.stop(signal.SIGUSR2)
    t1 = time.perf_counter()
    if code != 0:
        raise RuntimeError(f"daemon exited {code}:\n{daemon.logs()[-3000:]}")
    daemon.start(timeout=60)
    t2 = time.perf_counter()
    figures = {"exit_ms": (t1 - t0) * 1000, "start_ms": (t2 - t1) * 1000}
    if env:
        while not _answered(env, probe):
            if time.perf_counter() - t0 > 60:
                raise RuntimeError(f"the gateway did not answer again:\n{daemon.logs()[-3000:]}")
            time.sleep(0.005)
        figures["outage_ms"] = (time.perf_counter() - t0) * 1000
    if sorted(daemon.agent_pids()) != pids:
        raise RuntimeError("the agent did not survive the handover")
    adopt = [e for e in daemon.client.audit(limit=50)["entries"]
             if e["verb"] == "adopt" and e["target"] == name]
    if not adopt or adopt[0]["outcome"] != "ok":
        raise RuntimeError(f"not adopted: {adopt}")
    daemon.agentctl("kill", name, "--reason", "bench round over", check=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="as-bench-restart-gw-"))
    root.chmod(0o755)
    ca = make_ca(root / "ca")
    upstream = Upstream(ca).start()
    secret_dir = root / "secrets"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / "llm-key").write_text(f"sk-bench-{secrets.token_hex(8)}\n")
    (secret_dir / "llm-key").chmod(0o600)
    egress = {"pool": f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24",
              "port": random.randint(20000, 29999), "secrets_dir": str(secret_dir),
              "ca_file": str(ca.ca_pem), "hosts": {"api.upstream.test": "127.0.0.1"}}
    daemon = new_daemon(root, egress=egress)
    daemon.cgroup_parent = f"{BENCH_CGROUP_ROOT}/{daemon.prefix}"
    (daemon.root / "profiles" / "gw.toml").write_text(
        '[network]\nmode = "gateway"\n\n[network.gateway]\n'
        + LLM_ROUTE.replace("{PORT}", str(upstream.port)))
    venv, support = Path(sys.prefix).resolve(), Path(__file__).resolve().parents[1] / \
        "tests" / "support"
    (daemon.root / "profiles" / "mcpgw.toml").write_text(MCP_PROFILE.replace(
        "{VENV}", str(venv)).replace("{SUPPORT}", str(support)))
    samples: dict[str, list[float]] = {k: [] for k in (
        "gateway_exit_ms", "gateway_start_ms", "gateway_outage_ms", "mcp_exit_ms",
        "mcp_start_ms", "mcp_outage_ms", "plain_exit_ms", "plain_start_ms")}
    try:
        daemon.start()
        kinds = ["gateway", "mcp", "plain"]
        for n in range(args.rounds):
            order = kinds[n % 3:] + kinds[:n % 3]
            for kind in order:
                figures = _round(daemon, kind, n)
                for key, value in figures.items():
                    samples[f"{kind}_{key}"].append(value)
                print(f"round {n} {kind}: " + ", ".join(
                    f"{k} {v:.0f}" for k, v in figures.items()), flush=True)
    finally:
        daemon.stop()
        daemon.clean()
        daemon.cleanup_host()
        upstream.stop()
        Cgroup(BENCH_CGROUP_ROOT).remove(strict=False)
        shutil.rmtree(root, ignore_errors=True)
    result = {"rounds": args.rounds, "load": os.getloadavg(),
              **{k: _summary(v) for k, v in samples.items() if v}}
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps({"result": result, "samples": samples}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
