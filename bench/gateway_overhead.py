"""Benchmark: latency and throughput added by the egress gateway, against the same upstream direct.

In one run, against one HTTPS upstream on loopback (tests/support/upstream.py: aiohttp, TLS with
a test CA, `POST /v1/chat` answering a small JSON body with a `usage` block):

- **direct**: the load generator on the host, `http.client.HTTPSConnection` to 127.0.0.1:PORT
  with the test CA and `server_hostname` api.upstream.test, keep-alive;
- **gateway**: the same load generator (the same file, the same interpreter) inside a real
  sandbox of a real daemon, as the agent, with a gateway-mode profile: `http.client` to the
  proxy from HTTP_PROXY on persistent keep-alive connections, absolute-form URLs
  `http://llm.gateway/v1/chat` and the run's Proxy-Authorization; the gateway adds the route's
  secret and forwards over TLS to the same upstream. The path measured is the real one:
  sandbox -> veth -> nftables -> gateway (its own worker process, supervisor/egress/worker.py,
  in its cgroup and below the daemon's CPU priority) -> TLS -> upstream.

Each side runs two phases in one process: latency (sequential requests on one connection after a
warm-up; median and p95 by nearest rank) and throughput (--concurrency threads, one keep-alive
connection each, for --duration seconds; completed requests / elapsed). A sampler on the host
reads the CPU time of the daemon process, of the gateway worker (every process in its cgroup:
it does the proxying) and of this process (its upstream thread serves the requests) during
each throughput phase, so the report also says where the CPU per request goes. The route has
no budget and the breaker is disabled (it would trip on the rate); the profile allows the
sandbox 2 CPUs so its CFS quota never throttles the client (the host client is not capped
either).

Targets (issue): <= 1 ms added median latency on loopback; >= 2,000 requests/s through one
daemon. A missed target prints MISSED but still exits 0: this is a benchmark, not a test.
Client, daemon and upstream share the machine's cores, and other work on the machine lands on
all of them: compare runs, not single numbers.

Needs root, runc and nft. Starts its own daemon (tests/support/egress.py's rig: own state
directory, cgroup parent, name prefix and address pool) and checks that nothing is left.

    sudo .venv/bin/python bench/gateway_overhead.py [--requests 2000] [--warmup 200]
                                                   [--concurrency 8] [--duration 8]
                                                   [--json results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.support is not installed; run from anywhere

from stats import cpu_model, nearest_rank  # noqa: E402

from supervisor.sandbox.cgroups import unified_root  # noqa: E402
from tests.support.egress import LLM_ROUTE, GatewayRig, gateway_rig  # noqa: E402

TARGET_ADDED_MEDIAN_MS = 1.0
TARGET_RPS = 2000.0
PROFILE = "gwbench"
AGENT = "loadgen"
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # the bundle's
DIRECT = "direct (host → upstream, TLS)"
GATEWAY = "gateway (sandbox → gateway → upstream, TLS)"
ADDED = "added by the gateway"

# One credential route, no budget, the breaker off (it would trip on the rate), 2 CPUs so the
# sandbox's CFS quota never throttles the client.
PROFILE_BODY = LLM_ROUTE + """
[network.gateway.breaker]
enabled = false

[limits]
cpus = 2.0
"""

# The load generator: the same file runs on the host (direct) and in the sandbox (gateway).
CLIENT = r'''
import base64, http.client, json, os, resource, socket, ssl, sys, threading, time

mode, out = sys.argv[1], sys.argv[2]
requests, warmup, concurrency, duration = (int(sys.argv[3]), int(sys.argv[4]),
                                           int(sys.argv[5]), float(sys.argv[6]))
BODY = b'{"model": "bench", "messages": [{"role": "user", "content": "ping"}]}'

if mode == "proxy":
    creds, _, gw = os.environ["HTTP_PROXY"].removeprefix("http://").rpartition("@")
    GW_HOST, GW_PORT = gw.split(":")[0], int(gw.split(":")[1])
    URL = "http://llm.gateway/v1/chat?tokens=7"
    HEADERS = {"Proxy-Authorization": "Basic " + base64.b64encode(creds.encode()).decode(),
               "Content-Type": "application/json"}

    def connection():
        return http.client.HTTPConnection(GW_HOST, GW_PORT, timeout=30)
else:
    PORT, CA = int(sys.argv[7]), sys.argv[8]
    CONTEXT = ssl.create_default_context(cafile=CA)
    URL = "/v1/chat?tokens=7"
    HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-direct"}

    class Direct(http.client.HTTPSConnection):
        """TLS to 127.0.0.1 with the upstream's name for SNI and verification."""
        def connect(self):
            sock = socket.create_connection(("127.0.0.1", PORT), self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = CONTEXT.wrap_socket(sock, server_hostname=self.host)

    def connection():
        return Direct("api.upstream.test", PORT, timeout=30)

def one(conn):
    conn.request("POST", URL, body=BODY, headers=HEADERS)
    response = conn.getresponse()
    data = response.read()
    if response.status != 200 or b"usage" not in data:
        raise RuntimeError(f"{response.status}: {data[:300]!r}")

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

result = {"mode": mode, "python": sys.version.split()[0], "executable": sys.executable}

# Latency: one keep-alive connection, sequential requests.
conn = connection()
for _ in range(warmup):
    one(conn)
latencies = []
c0, t0 = cpu(), time.perf_counter()
for _ in range(requests):
    start = time.perf_counter()
    one(conn)
    latencies.append((time.perf_counter() - start) * 1000)
result["latency"] = {"ms": latencies, "elapsed_s": time.perf_counter() - t0,
                     "client_cpu_s": cpu() - c0}
conn.close()

# Throughput: `concurrency` threads, one keep-alive connection each, for `duration` seconds.
conns = [connection() for _ in range(concurrency)]
for c in conns:
    one(c)  # connected (and, direct, TLS established) before the clock starts
counts, errors, under_load = [0] * concurrency, [], []
barrier = threading.Barrier(concurrency + 1)
deadline = [0.0]

def worker(i):
    c, mine = conns[i], []
    barrier.wait()
    try:
        while True:
            start = time.perf_counter()
            if start >= deadline[0]:
                break
            one(c)
            mine.append((time.perf_counter() - start) * 1000)
            counts[i] += 1
    except Exception as e:
        errors.append(repr(e))
    under_load.extend(mine)

threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
for t in threads:
    t.start()
c0, wall0 = cpu(), time.time()
t0 = time.perf_counter()
deadline[0] = t0 + duration
barrier.wait()
for t in threads:
    t.join()
elapsed = time.perf_counter() - t0
result["throughput"] = {"requests": sum(counts), "elapsed_s": elapsed, "errors": errors,
                        "concurrency": concurrency, "wall_start": wall0,
                        "wall_end": time.time(), "client_cpu_s": cpu() - c0,
                        "latency_ms": under_load}
for c in conns:
    c.close()
with open(out, "w") as f:
    json.dump(result, f)
'''


# ----------------------------------------------------------------------------- CPU sampler

def process_cpu_s(pid: int | str) -> float:
    """utime + stime of a whole process (all threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cgroup_cpu_s(procs: Path) -> float:
    """CPU of every process listed in a cgroup.procs file (0 while it does not exist)."""
    total = 0.0
    with contextlib.suppress(OSError):
        for pid in procs.read_text().split():
            with contextlib.suppress(OSError):
                total += process_cpu_s(pid)
    return total


class CpuSampler:
    """Every 20 ms: (wall clock, daemon CPU, gateway worker CPU, this process's CPU). The
    daemon's CPU is its loop's, telemetry's and the worker channel's; the worker's is the
    proxying; ours is the upstream thread's (the main thread waits on a subprocess)."""

    def __init__(self, daemon_pid: int, worker_procs: Path) -> None:
        self.daemon_pid = daemon_pid
        self.worker_procs = worker_procs
        self.samples: list[tuple[float, float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.samples.append((time.time(), process_cpu_s(self.daemon_pid),
                                     cgroup_cpu_s(self.worker_procs), process_cpu_s("self")))
            self._stop.wait(0.02)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float) -> tuple[float, float, float]:
        """(daemon, worker, our CPU s) from the last sample before `start` to the first after
        `end`: a slight overestimate (at most 2 x 20 ms of neighbouring work)."""
        before = [s for s in self.samples if s[0] <= start]
        after = [s for s in self.samples if s[0] >= end]
        if not before or not after:
            return math.nan, math.nan, math.nan
        return (after[0][1] - before[-1][1], after[0][2] - before[-1][2],
                after[0][3] - before[-1][3])


# ----------------------------------------------------------------------------- running

def host_python() -> str:
    """The interpreter `python3` names inside the sandbox (the bundle's PATH over host /usr)."""
    found = shutil.which("python3", path=SANDBOX_PATH)
    if found is None:
        raise RuntimeError("no python3 on the sandbox's PATH")
    return found


def client_args(args: argparse.Namespace) -> list[str]:
    return [str(args.requests), str(args.warmup), str(args.concurrency), str(args.duration)]


def run_direct(rig: GatewayRig, args: argparse.Namespace, client: Path, out: Path) -> Any:
    subprocess.run([host_python(), str(client), "direct", str(out), *client_args(args),
                    str(rig.upstream.port), str(rig.ca.ca_pem)],
                   check=True, timeout=phase_timeout(args), stdin=subprocess.DEVNULL)
    return json.loads(out.read_text())


def run_gateway(rig: GatewayRig, args: argparse.Namespace) -> Any:
    path = rig.script("loadgen.py", CLIENT)
    result = rig.daemon.agentctl(
        "run", "--name", AGENT, "--profile", PROFILE, "--workspace", str(rig.workspace),
        "--json", "--", "python3", "-u", path, "proxy", "/workspace/gateway.json",
        *client_args(args), timeout=phase_timeout(args) + 60, check=True)
    view = json.loads(result.stdout)
    if view.get("exit_code") != 0:
        logs = rig.daemon.agentctl("logs", AGENT).stdout[-3000:]
        raise RuntimeError(f"the load generator in the sandbox exited {view.get('exit_code')}:"
                           f"\n{logs}")
    return rig.read("gateway.json")


def phase_timeout(args: argparse.Namespace) -> float:
    # Generous: 50 ms a request would already be a broken gateway.
    return 60.0 + (int(args.requests) + int(args.warmup)) * 0.05 + float(args.duration) * 2


# ----------------------------------------------------------------------------- report

def summarize(raw: Any, sampler: CpuSampler) -> dict[str, Any]:
    latency, throughput = raw["latency"], raw["throughput"]
    values = latency["ms"]
    done = throughput["requests"]
    daemon_cpu, worker_cpu, our_cpu = sampler.between(throughput["wall_start"],
                                                      throughput["wall_end"])
    loaded = throughput["latency_ms"] or [math.nan]
    return {
        "python": raw["python"],
        "requests": len(values), "median_ms": statistics.median(values),
        "p95_ms": nearest_rank(values, 0.95), "p99_ms": nearest_rank(values, 0.99),
        "min_ms": min(values), "max_ms": max(values),
        "sequential_rps": len(values) / latency["elapsed_s"],
        "throughput_requests": done, "throughput_elapsed_s": throughput["elapsed_s"],
        "rps": done / throughput["elapsed_s"], "concurrency": throughput["concurrency"],
        "errors": throughput["errors"],
        "loaded_median_ms": statistics.median(loaded),
        "loaded_p95_ms": nearest_rank(loaded, 0.95),
        # CPU per request during the throughput phase, in microseconds.
        "client_cpu_us": throughput["client_cpu_s"] / max(done, 1) * 1e6,
        "daemon_cpu_us": daemon_cpu / max(done, 1) * 1e6,
        "worker_cpu_us": worker_cpu / max(done, 1) * 1e6,
        "upstream_cpu_us": our_cpu / max(done, 1) * 1e6,
        "cpu_busy_cores": (throughput["client_cpu_s"] + daemon_cpu + worker_cpu + our_cpu)
        / throughput["elapsed_s"],
    }


def machine_info() -> dict[str, str]:
    cpu = cpu_model()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "kernel": platform.release(),
            "python_bench": platform.python_version(), "loadavg_at_start": load}


def verdicts(direct: dict[str, Any], gateway: dict[str, Any]) -> list[str]:
    added = gateway["median_ms"] - direct["median_ms"]
    rps = gateway["rps"]
    return [
        f"target: <= {TARGET_ADDED_MEDIAN_MS:g} ms added median latency: {added:+.3f} ms -> "
        + ("MET" if added <= TARGET_ADDED_MEDIAN_MS else
           f"MISSED by {added - TARGET_ADDED_MEDIAN_MS:.3f} ms"),
        f"target: >= {TARGET_RPS:,.0f} requests/s through one daemon: {rps:,.0f} req/s -> "
        + ("MET" if rps >= TARGET_RPS else
           f"MISSED by {TARGET_RPS - rps:,.0f} req/s ({rps / TARGET_RPS:.0%} of target)"),
    ]


def print_report(info: dict[str, str], args: argparse.Namespace, direct: dict[str, Any],
                 gateway: dict[str, Any]) -> None:
    rows = [
        (DIRECT, f"{direct['median_ms']:.3f}", f"{direct['p95_ms']:.3f}", f"{direct['rps']:,.0f}"),
        (GATEWAY, f"{gateway['median_ms']:.3f}", f"{gateway['p95_ms']:.3f}",
         f"{gateway['rps']:,.0f}"),
        (ADDED, f"{gateway['median_ms'] - direct['median_ms']:+.3f}",
         f"{gateway['p95_ms'] - direct['p95_ms']:+.3f}",
         f"{gateway['rps'] / direct['rps']:.0%} of direct"),
    ]
    headers = ("path", "median ms", "p95 ms", "req/s")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    print(f"machine: {info['nproc']} CPUs ({info['cpu']}), kernel {info['kernel']}, load "
          f"average {info['loadavg_at_start']} at start; client python {direct['python']}")
    print(f"latency: {args.requests} sequential POSTs on one keep-alive connection after "
          f"{args.warmup} warm-up; throughput: {args.concurrency} connections for "
          f"{args.duration:g} s")
    print()
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    print()
    print("under load (throughput phase): median / p95 ms per request, CPU per request (µs):")
    for name, s in ((DIRECT, direct), (GATEWAY, gateway)):
        print(f"  {name}: {s['loaded_median_ms']:.2f} / {s['loaded_p95_ms']:.2f} ms; "
              f"client {s['client_cpu_us']:.0f}, daemon {s['daemon_cpu_us']:.0f}, "
              f"gateway worker {s['worker_cpu_us']:.0f}, "
              f"upstream {s['upstream_cpu_us']:.0f} µs; {s['cpu_busy_cores']:.2f} of "
              f"{info['nproc']} cores busy; errors: {len(s['errors'])}")
    print(f"note: client, daemon, gateway worker and upstream share {info['nproc']} cores, "
          "with whatever else runs on the machine")
    for text in verdicts(direct, gateway):
        print(text)


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000,
                        help="sequential requests measured for latency (default 2000)")
    parser.add_argument("--warmup", type=int, default=200,
                        help="sequential requests before measuring (default 200)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="connections (threads) in the throughput phase (default 8)")
    parser.add_argument("--duration", type=float, default=8.0,
                        help="seconds of the throughput phase (default 8)")
    parser.add_argument("--json", type=Path, help="also write the summary and every latency "
                                                  "sample to this file")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.warmup < 0 or not 1 <= args.concurrency <= 60:
        parser.error("--requests >= 1, --warmup >= 0, --concurrency 1..60 (the gateway caps a "
                     "run at 64 connections)")
    if args.duration <= 0:
        parser.error("--duration must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (a real daemon with veths and nftables)", file=sys.stderr)
        return 2
    for tool in ("runc", "nft"):
        if shutil.which(tool) is None:
            print(f"needs {tool} on PATH", file=sys.stderr)
            return 2
    info = machine_info()
    tmp_root = Path(tempfile.mkdtemp(prefix="as-bench-gw-", dir="/tmp"))
    tmp_root.chmod(0o755)  # the sandbox's mapped uids must traverse to the workspace
    try:
        # gateway_rig stops the daemon and asserts it left nothing (cgroups, netns, bundles,
        # nftables tables, workspace mounts); the upstream is stopped with it.
        with gateway_rig(tmp_root) as rig:
            rig.profile(PROFILE, PROFILE_BODY)
            client = tmp_root / "client.py"
            client.write_text(CLIENT)
            assert rig.daemon.proc is not None
            worker_procs = unified_root() / (rig.daemon.cgroup_parent.strip("/") + "-gateway")
            with CpuSampler(rig.daemon.proc.pid, worker_procs / "cgroup.procs") as sampler:
                print("direct: host -> upstream ...", file=sys.stderr)
                direct_raw = run_direct(rig, args, client, tmp_root / "direct.json")
                print("gateway: sandbox -> gateway -> upstream ...", file=sys.stderr)
                gateway_raw = run_gateway(rig, args)
            direct, gateway = summarize(direct_raw, sampler), summarize(gateway_raw, sampler)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)

    print()
    print_report(info, args, direct, gateway)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "machine": info, "args": {k: v for k, v in vars(args).items() if k != "json"},
            "targets": {"added_median_ms": TARGET_ADDED_MEDIAN_MS, "rps": TARGET_RPS},
            "verdicts": verdicts(direct, gateway),
            "direct": direct, "gateway": gateway,
            "samples": {"direct_ms": direct_raw["latency"]["ms"],
                        "gateway_ms": gateway_raw["latency"]["ms"]},
        }, indent=1) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
