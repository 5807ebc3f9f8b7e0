"""Benchmark: `GET /v1/agents` on the daemon's control socket against a bare aiohttp server on
a Unix socket, in one run.

The daemon is real (its own state directory, cgroup parent and name prefix, see
tests/support/daemon.py) with 20 running agents (`sleep`, runc) and its telemetry sampler on;
the baseline is a separate process running a bare aiohttp application on its own Unix socket
that answers `GET /v1/agents` with the exact bytes the daemon answered (a constant, so it
measures aiohttp and the socket, nothing else). One load generator (asyncio, raw HTTP/1.1
keep-alive on N connections, each waiting for its answer before the next request) drives both
in alternating rounds, so machine noise falls on both alike. It prints the requests per second
of each round, the medians, and the ratio daemon / bare against the target (>= 0.5). A missed
target prints MISSED and still exits 0: this is a benchmark, not a test.

Needs root and runc. Removes its agents, daemon and sockets when it ends, also on Ctrl-C.

    sudo .venv/bin/python bench/control_api.py [--agents 20] [--rounds 6] [--seconds 3]
                                               [--connections 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.support is not installed; run from anywhere

from stats import cpu_model  # noqa: E402

from tests.support.daemon import Daemon, running_daemon, wait_for  # noqa: E402

TARGET = 0.5
REQUEST = b"GET /v1/agents HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"

BARE_SERVER = textwrap.dedent("""
    import sys
    from aiohttp import web
    path, body_file = sys.argv[1], sys.argv[2]
    body = open(body_file, "rb").read()

    async def agents(request):
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/agents", agents)
    web.run_app(app, path=path, access_log=None, print=None, handle_signals=True)
""")


async def _one_connection(path: str, deadline: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        while time.perf_counter() < deadline:
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            status = int(head.split(b" ", 2)[1])
            await reader.readexactly(length)
            if status != 200:
                raise RuntimeError(f"{path} answered {status}")
            counts[0] += 1
    finally:
        writer.close()
        await writer.wait_closed()


async def _drive(path: str, seconds: float, connections: int) -> float:
    counts = [0]
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(_one_connection(path, deadline, counts)
                           for _ in range(connections)))
    return counts[0] / (time.perf_counter() - started)


def drive(path: str, seconds: float, connections: int) -> float:
    """Requests per second served at `path` over `seconds`."""
    return asyncio.run(_drive(path, seconds, connections))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="write every round here")
    return parser.parse_args(argv)


def launch_agents(daemon: Daemon, count: int) -> None:
    for i in range(count):
        daemon.agentctl("run", "--detach", "--name", f"bench-{i:02d}", "--class",
                        "bench", "--", "sleep", "3600", check=True)
    wait_for(lambda: sum(a["state"] == "active" for a in daemon.client.agents()["agents"])
             == count, timeout=120, what="every agent to run")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("control_api: needs root (a real daemon and runc)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="as-bench-", dir="/tmp"))
    root.chmod(0o755)
    bare: subprocess.Popen[bytes] | None = None
    try:
        with running_daemon(root, daemon={"log_level": "warning", "self_test": False}) as daemon:
            launch_agents(daemon, args.agents)
            time.sleep(1.0)  # a few telemetry samples for every run
            body = daemon.client.request("GET", "/v1/agents")
            body_file = root / "agents.json"
            body_file.write_bytes(json.dumps(body).encode())
            bare_socket = root / "bare.sock"
            bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(bare_socket),
                                     str(body_file)])
            wait_for(bare_socket.exists, timeout=30, what="the bare server")
            targets = {"daemon": str(daemon.socket), "bare aiohttp": str(bare_socket)}
            for path in targets.values():  # warm both up
                drive(path, 0.5, args.connections)
            rounds: dict[str, list[float]] = {name: [] for name in targets}
            for number in range(args.rounds):
                order = list(targets) if number % 2 == 0 else list(reversed(targets))
                for name in order:
                    rate = drive(targets[name], args.seconds, args.connections)
                    rounds[name].append(rate)
                    print(f"round {number + 1}: {name:>13} {rate:8.0f} req/s", flush=True)
            for path in (daemon.socket,):
                assert Path(path).exists()
            daemon.agentctl("kill", "--all", "--reason", "benchmark done", check=True)
            daemon.agentctl("reactivate", "--all", "--reason", "benchmark done", check=True)
    finally:
        if bare is not None:
            bare.terminate()
            bare.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    daemon_rate = statistics.median(rounds["daemon"])
    bare_rate = statistics.median(rounds["bare aiohttp"])
    ratio = daemon_rate / bare_rate
    print()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cpus, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"GET /v1/agents, {args.agents} agents, {args.connections} keep-alive connections, "
          f"{args.rounds} rounds of {args.seconds:g}s each")
    print(f"  daemon        median {daemon_rate:8.0f} req/s")
    print(f"  bare aiohttp  median {bare_rate:8.0f} req/s")
    verdict = "met" if ratio >= TARGET else "MISSED"
    print(f"  ratio {ratio:.2f} (target >= {TARGET}): {verdict}")
    if args.json is not None:
        result: dict[str, Any] = {"agents": args.agents, "connections": args.connections,
                                  "seconds": args.seconds, "rounds": rounds, "ratio": ratio}
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
