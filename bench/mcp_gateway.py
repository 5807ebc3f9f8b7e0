"""Benchmark: tools/call latency and throughput through the MCP gateway, against the same client
calling the same server directly, interleaved in one run.

- **server**: the official MCP SDK's FastMCP (tests/support/mcp.py) over streamable HTTP and
  TLS on loopback, JSON replies, in a process of its own; the tool is `search` (returns a
  short string);
- **direct**: the load generator (`http.client`, keep-alive) POSTs JSON-RPC `tools/call` to
  the server over TLS with the server's bearer token and an initialized session;
- **gateway**: the same load generator sends the same message as absolute-form
  `http://mcp.gateway/code` with the run's Proxy-Authorization to a real egress Gateway
  (supervisor/egress/gateway.py, its own process as in production) that parses it, judges it
  (allow-list, a CEL rule on the arguments, budgets), audits it to its sink, adds the token
  and forwards over TLS to the same server.

Latency: rounds of sequential calls on one connection, alternating direct and gateway, each
preceded by a warm-up; median and p95 by nearest rank over all rounds. Throughput: phases of
--duration seconds with --concurrency threads, one keep-alive connection each, alternating
direct and gateway. Nothing here needs root; no daemon, no sandbox (bench/gateway_overhead.py
measures the sandbox -> veth -> gateway path; this isolates what judging MCP messages adds).

The gateway process's CPU time per call over its latency phases is printed too: the machine's
load inflates wall-clock figures far more than CPU time, so it is the gateway's own cost per
call whatever else runs.

Targets (issue 15): <= 1 ms added at the median, >= 50% of direct throughput. A missed target
prints MISSED and exits 0: this is a benchmark, not a test.

    python bench/mcp_gateway.py [--calls 400] [--rounds 5] [--concurrency 4]
                                [--duration 4] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.stats import cpu_model, nearest_rank  # noqa: E402
from tests.support.mcp import MCP_NAME  # noqa: E402
from tests.support.mcp import TOKEN as SERVER_TOKEN  # noqa: E402
from tests.support.upstream import make_ca  # noqa: E402

RUN_TOKEN = "bench-run-token-0123456789"
CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "search", "arguments": {"query": "def main"}}}


class Path_:
    """One way to the server: a connection factory and the request line's target."""

    def __init__(self, name: str, connect: Any, target: str, headers: dict[str, str]) -> None:
        self.name, self.connect, self.target, self.headers = name, connect, target, headers

    def session(self) -> http.client.HTTPConnection:
        """A connection with an initialized MCP session (its id in self.headers)."""
        conn = self.connect()
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "bench", "version": "1"}}}
        reply = self.post(conn, init, {})
        session_id = reply.getheader("Mcp-Session-Id")
        reply.read()
        assert reply.status == 200 and session_id, (self.name, reply.status)
        extra = {"Mcp-Session-Id": session_id, "Mcp-Protocol-Version": "2025-06-18"}
        self.post(conn, {"jsonrpc": "2.0", "method": "notifications/initialized"}, extra).read()
        conn.extra = extra  # type: ignore[attr-defined]
        return conn

    def post(self, conn: http.client.HTTPConnection, message: dict[str, Any],
             extra: dict[str, str]) -> http.client.HTTPResponse:
        body = json.dumps(message).encode()
        conn.request("POST", self.target, body, {
            **self.headers, **extra, "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream"})
        return conn.getresponse()

    def call(self, conn: http.client.HTTPConnection) -> None:
        reply = self.post(conn, CALL, conn.extra)  # type: ignore[attr-defined]
        data = reply.read()
        if reply.status != 200 or b"3 matches" not in data:
            raise RuntimeError(f"{self.name}: {reply.status} {data[:200]!r}")


def serve_gateway(ca_dir: str, server_port: int, port_file: str) -> None:
    """The child process: a real Gateway with one run whose policy names the server."""
    from supervisor.config import EgressSection
    from supervisor.egress.gateway import Gateway
    from supervisor.egress.grant import RunGrant
    from supervisor.models.egress import GatewayPolicy

    class Sink:
        def __init__(self) -> None:
            self.decisions = 0

        def budget_exceeded(self, run_id: str, detail: dict[str, Any]) -> None: ...
        def breaker_tripped(self, run_id: str, detail: dict[str, Any]) -> None: ...
        def denied(self, run_id: str, code: str, detail: dict[str, Any]) -> None: ...

        def mcp_decision(self, run_id: str, detail: dict[str, Any]) -> None:
            self.decisions += 1

        def request_approval(self, *args: Any) -> Any:
            raise AssertionError("no approvals in the benchmark")

    section = EgressSection.model_validate({"hosts": {MCP_NAME: "127.0.0.1"},
                                            "ca_file": Path(ca_dir) / "ca.pem"})
    gateway = Gateway(section, Sink())  # type: ignore[arg-type]
    gateway.start()
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    policy = GatewayPolicy.model_validate({"breaker": {"enabled": False}, "mcp": {"servers": [{
        "name": "code", "url": f"https://{MCP_NAME}:{server_port}/mcp",
        "secret": "file:code-token", "allow": ["search", "read_file"],
        "tools": {"search": {"require": "size(args.query) < 200"}}}]}})
    grant = RunGrant(run_id="bench", agent="bench", token=RUN_TOKEN,
                     expires_at=time.time() + 86400, policy=policy, host_ip="127.0.0.1",
                     port=port, secrets={"mcp:code": SERVER_TOKEN})
    asyncio.run(gateway.open(grant))
    Path(port_file).write_text(str(port))
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    gateway.stop()


def wait_file(path: Path, process: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 60
    while not path.exists() or not path.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{process.args} did not start")
        time.sleep(0.05)
    return int(path.read_text())


def latency(path: Path_, calls: int, warmup: int) -> list[float]:
    conn = path.session()
    for _ in range(warmup):
        path.call(conn)
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        path.call(conn)
        samples.append((time.perf_counter() - start) * 1000)
    conn.close()
    return samples


def throughput(path: Path_, concurrency: int, duration: float) -> tuple[float, int]:
    counts = [0] * concurrency
    errors = [0]
    stop = time.monotonic() + duration
    conns = [path.session() for _ in range(concurrency)]

    def worker(i: int) -> None:
        while time.monotonic() < stop:
            try:
                path.call(conns[i])
                counts[i] += 1
            except Exception:
                errors[0] += 1
                conns[i] = path.session()

    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    for conn in conns:
        conn.close()
    return sum(counts) / elapsed, errors[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve-gateway", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_gateway:
        serve_gateway(args.serve_gateway[0], int(args.serve_gateway[1]), args.serve_gateway[2])
        return
    work = Path(tempfile.mkdtemp(prefix="mcp-bench-"))
    ca = make_ca(work / "ca", (MCP_NAME,))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    children: list[subprocess.Popen[bytes]] = []
    try:
        server = subprocess.Popen([sys.executable, "-m", "tests.support.mcp", str(work / "ca"),
                                   str(work / "server.port"), "--json"], cwd=REPO, env=env)
        children.append(server)
        server_port = wait_file(work / "server.port", server)
        gateway = subprocess.Popen([sys.executable, __file__, "--serve-gateway",
                                    str(work / "ca"), str(server_port),
                                    str(work / "gateway.port")], cwd=REPO, env=env)
        children.append(gateway)
        gateway_port = wait_file(work / "gateway.port", gateway)
        context = ssl.create_default_context(cafile=str(ca.ca_pem))

        class Pinned(http.client.HTTPSConnection):
            def connect(self) -> None:  # the name resolves to loopback for this benchmark
                import socket
                self.sock = context.wrap_socket(
                    socket.create_connection(("127.0.0.1", server_port)),
                    server_hostname=MCP_NAME)

        direct = Path_("direct", lambda: Pinned(MCP_NAME, server_port, context=context),
                       "/mcp", {"Authorization": f"Bearer {SERVER_TOKEN}",
                                "Host": f"{MCP_NAME}:{server_port}"})
        auth = base64.b64encode(f"bench:{RUN_TOKEN}".encode()).decode()
        through = Path_("gateway", lambda: http.client.HTTPConnection("127.0.0.1",
                                                                      gateway_port),
                        "http://mcp.gateway/code", {"Proxy-Authorization": f"Basic {auth}",
                                                    "Host": "mcp.gateway"})
        samples: dict[str, list[float]] = {"direct": [], "gateway": []}
        rates: dict[str, list[float]] = {"direct": [], "gateway": []}
        errors = {"direct": 0, "gateway": 0}
        gateway_cpu = 0.0  # the gateway process's CPU seconds over its latency phases
        for _ in range(args.rounds):
            for path in (direct, through):
                before = cpu_seconds(gateway.pid)
                samples[path.name] += latency(path, args.calls, args.warmup)
                if path is through:
                    gateway_cpu += cpu_seconds(gateway.pid) - before
        # CPU is what the machine's load does not inflate: the gateway's own cost per call,
        # and so the least it adds to a call's latency on an idle host.
        cpu_per_call_ms = gateway_cpu * 1000 / (args.rounds * (args.calls + args.warmup))
        for _ in range(max(1, args.rounds // 2)):
            for path in (direct, through):
                rate, failed = throughput(path, args.concurrency, args.duration)
                rates[path.name].append(rate)
                errors[path.name] += failed
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
    report(args, samples, rates, errors, cpu_per_call_ms)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its threads so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report(args: argparse.Namespace, samples: dict[str, list[float]],
           rates: dict[str, list[float]], errors: dict[str, int],
           cpu_per_call_ms: float) -> None:
    def stats(name: str) -> tuple[float, float, float]:
        values = sorted(samples[name])
        rate = sorted(rates[name])[len(rates[name]) // 2]
        return nearest_rank(values, 0.5), nearest_rank(values, 0.95), rate

    d50, d95, drate = stats("direct")
    g50, g95, grate = stats("gateway")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print(f"{'path':<40} {'median ms':>9} {'p95 ms':>7} {'calls/s':>9}")
    print(f"{'direct (client -> server, TLS)':<40} {d50:9.3f} {d95:7.3f} {drate:9,.0f}")
    print(f"{'gateway (client -> gateway -> server)':<40} {g50:9.3f} {g95:7.3f} {grate:9,.0f}")
    share = grate / drate if drate else 0.0
    print(f"{'added by the gateway':<40} {g50 - d50:+9.3f} {g95 - d95:+7.3f} "
          f"{share:8.0%} of direct")
    print(f"errors: direct {errors['direct']}, gateway {errors['gateway']}")
    print(f"gateway process CPU per call (parse, judge, audit, forward; load-independent): "
          f"{cpu_per_call_ms:.3f} ms")
    added = g50 - d50
    print(f"target: <= 1 ms added at the median: {added:+.3f} ms -> "
          f"{'MET' if added <= 1.0 else 'MISSED'}")
    print(f"target: >= 50% of direct throughput: {share:.0%} -> "
          f"{'MET' if share >= 0.5 else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({
            "gateway_cpu_per_call_ms": cpu_per_call_ms,
            "direct": {"median_ms": d50, "p95_ms": d95, "calls_per_s": drate,
                       "rates": rates["direct"]},
            "gateway": {"median_ms": g50, "p95_ms": g95, "calls_per_s": grate,
                        "rates": rates["gateway"]},
            "added_median_ms": added, "throughput_share": share, "errors": errors}, indent=2))


if __name__ == "__main__":
    main()
