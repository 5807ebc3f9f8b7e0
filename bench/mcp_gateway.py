"""Benchmark: tools/call latency and throughput through the MCP gateway, against the same client
calling the same server directly, interleaved in one run.

- **server**: the official MCP SDK's FastMCP (tests/support/mcp.py) over streamable HTTP and
  TLS on loopback, JSON replies, in a process of its own; the tool is `search` (returns a
  short string);
- **direct**: the load generator (Connection below: keep-alive, TCP_NODELAY, one write per
  request, the same code on both paths) POSTs JSON-RPC `tools/call` to the server over TLS
  with the server's bearer token and an initialized session;
- **gateway**: the same load generator sends the same message as absolute-form
  `http://mcp.gateway/code` with the run's Proxy-Authorization to the real gateway worker
  process (`python -m supervisor.egress.worker`, as the daemon starts it, less its cgroup,
  user and nice value), which parses it, judges it (allow-list, a CEL rule on the arguments,
  budgets), reports the decision on its channel, adds the token and forwards over TLS to the
  same server. This process plays the daemon's end of the channel (Daemon below): it
  configures the worker, opens the run, and counts the decisions reported, which must cover
  every call answered.

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
                                [--duration 4] [--json results.json] [--profile FILE]

--profile FILE runs the worker's threads under cProfile (FILE: the gateway's thread;
FILE.main: the worker's loop); the figures of such a run are not the gateway's.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
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
from supervisor.config import EgressSection  # noqa: E402
from supervisor.egress import ipc  # noqa: E402
from supervisor.egress.grant import RunGrant, grant_to_wire  # noqa: E402
from supervisor.models.egress import GatewayPolicy  # noqa: E402
from tests.support.mcp import MCP_NAME  # noqa: E402
from tests.support.mcp import TOKEN as SERVER_TOKEN  # noqa: E402
from tests.support.upstream import make_ca  # noqa: E402

RUN_TOKEN = "bench-run-token-0123456789"
CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "search", "arguments": {"query": "def main"}}}


class Connection:
    """One keep-alive HTTP/1.1 connection of the load generator, the same code on both paths:
    TCP_NODELAY, and each request written with one `sendall` (request line, headers and body
    in one buffer), so neither path waits on Nagle's algorithm against the peer's delayed ACK.
    (http.client writes the head and the body separately, and its HTTPS connect override here
    did not set TCP_NODELAY: the direct baseline stalled ~90 ms per call on that.) Replies are
    read with Content-Length or chunked framing."""

    def __init__(self, port: int, context: ssl.SSLContext | None, server_name: str) -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = (context.wrap_socket(sock, server_hostname=server_name)
                                    if context is not None else sock)
        self.buffer = b""
        self.extra: dict[str, str] = {}

    def request(self, target: str, headers: dict[str, str], body: bytes
                ) -> tuple[int, dict[str, str], bytes]:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self.sock.sendall(f"POST {target} HTTP/1.1\r\n{head}Content-Length: {len(body)}"
                          f"\r\n\r\n".encode() + body)
        status_line, fields = self._head()
        status = int(status_line.split(b" ", 2)[1])
        if fields.get("transfer-encoding", "").lower() == "chunked":
            data = self._chunked()
        else:
            data = self._exactly(int(fields.get("content-length", "0")))
        return status, fields, data

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        self.buffer += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _head(self) -> tuple[bytes, dict[str, str]]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.split(b"\r\n")
        fields = {}
        for line in lines:
            name, _, value = line.decode("latin-1").partition(":")
            fields[name.strip().lower()] = value.strip()
        return status_line, fields

    def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def _chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                while self._line():  # trailers, up to the empty line
                    pass
                return b"".join(parts)
            parts.append(self._exactly(size))
            self._line()

    def close(self) -> None:
        self.sock.close()


class Path_:
    """One way to the server: how to connect and the request line's target and headers."""

    def __init__(self, name: str, port: int, context: ssl.SSLContext | None, target: str,
                 headers: dict[str, str]) -> None:
        self.name, self.port, self.context, self.target = name, port, context, target
        self.headers = {**headers, "Content-Type": "application/json",
                        "Accept": "application/json, text/event-stream"}
        self.call_body = json.dumps(CALL).encode()

    def session(self) -> Connection:
        """A connection with an initialized MCP session (its id in its `extra` headers)."""
        conn = Connection(self.port, self.context, MCP_NAME)
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "bench", "version": "1"}}}
        status, fields, _ = conn.request(self.target, self.headers, json.dumps(init).encode())
        session_id = fields.get("mcp-session-id")
        assert status == 200 and session_id, (self.name, status)
        conn.extra = {**self.headers, "Mcp-Session-Id": session_id,
                      "Mcp-Protocol-Version": "2025-06-18"}
        conn.request(self.target, conn.extra, json.dumps(
            {"jsonrpc": "2.0", "method": "notifications/initialized"}).encode())
        return conn

    def call(self, conn: Connection) -> None:
        status, _, data = conn.request(self.target, conn.extra, self.call_body)
        if status != 200 or b"3 matches" not in data:
            raise RuntimeError(f"{self.name}: {status} {data[:200]!r}")


class Daemon:
    """The daemon's end of the gateway worker's channel (supervisor/egress/ipc.py), as
    supervisor/egress/worker_process.py speaks it: configure, open one run, then read what
    the worker reports. Every MCP decision must arrive here (the daemon audits each one);
    the benchmark counts them and checks the count against the calls it made."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.frames = ipc.FrameBuffer(ipc.TO_DAEMON_LIMIT)
        self.decisions: dict[str, int] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, name="bench-daemon", daemon=True)

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(ipc.encode(message, ipc.TO_WORKER_LIMIT))

    def expect(self, op: str) -> dict[str, Any]:
        """The next message (before the reader thread runs); it must be `op`."""
        self.sock.settimeout(60)
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("the gateway worker closed its channel")
            for message in self.frames.feed(data):
                if message["op"] == op:
                    return message
                self._note(message)

    def _note(self, message: dict[str, Any]) -> None:
        if message["op"] == "mcp":
            outcome = str(message["detail"].get("outcome"))
            with self.lock:
                self.decisions[outcome] = self.decisions.get(outcome, 0) + 1

    def _read(self) -> None:
        self.sock.settimeout(None)
        while data := self.sock.recv(65536):
            for message in self.frames.feed(data):
                self._note(message)

    def audited(self) -> int:
        with self.lock:
            return sum(self.decisions.values())


def start_gateway(work: Path, ca_pem: Path, server_port: int,
                  profile: Path | None) -> tuple[subprocess.Popen[bytes], Daemon, int]:
    """The real gateway worker process, configured with one run whose policy names the
    server; its port."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # As the daemon starts it (supervisor/egress/worker_process.py), less the cgroup, the
    # user and the nice value; through this file only to add the profiler when asked.
    worker = subprocess.Popen(
        [sys.executable, __file__, "--serve-worker", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),), cwd=REPO, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO), "BENCH_PROFILE": str(profile or "")})
    theirs.close()
    daemon = Daemon(ours)
    section = EgressSection.model_validate({"hosts": {MCP_NAME: "127.0.0.1"},
                                            "ca_file": ca_pem})
    daemon.send({"op": "configure", "config": section.model_dump(mode="json"),
                 "ca": ca_pem.read_text()})
    daemon.expect("hello")
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
    daemon.send({"op": "open", "id": 1, "run": "bench", "grant": grant_to_wire(grant)})
    reply = daemon.expect("reply")
    if not reply.get("ok"):
        raise RuntimeError(f"the gateway worker did not open the run: {reply}")
    daemon.thread.start()
    return worker, daemon, port


def serve_worker(fd: int) -> None:
    """The child process: supervisor.egress.worker's main, its threads profiled when asked."""
    from supervisor.egress import worker

    path = os.environ.get("BENCH_PROFILE")
    if not path:
        worker.main(["--fd", str(fd)])
        return
    import cProfile

    profile_threads(path)
    cProfile.runctx("worker.main(['--fd', str(fd)])", globals(), {"worker": worker, "fd": fd},
                    f"{path}.main")


def profile_threads(path: str) -> None:
    """Threads started from here on run under cProfile (the gateway works in a thread of its
    own, which `python -m cProfile` would not see); the profile is written when they end."""
    import cProfile

    run = threading.Thread.run

    def profiled(self: threading.Thread) -> None:
        profiler = cProfile.Profile()
        try:
            profiler.runcall(run, self)
        finally:
            profiler.dump_stats(path)

    threading.Thread.run = profiled  # type: ignore[method-assign]


def wait_file(path: Path, process: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 60
    while not path.exists() or not path.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{process.args} did not start")
        time.sleep(0.05)
    return int(path.read_text())


def latency(path: Path_, calls: int, warmup: int) -> list[float]:
    """`warmup` calls, then `calls` timed ones, on one connection."""
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


def throughput(path: Path_, concurrency: int, duration: float) -> tuple[float, int, int]:
    """Calls per second over `duration` with `concurrency` connections; errors; calls made."""
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
    return sum(counts) / elapsed, errors[0], sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", type=Path, help="run the gateway process under cProfile "
                        "and write its profile here (figures from such a run are not the "
                        "gateway's)")
    parser.add_argument("--serve-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_worker is not None:
        serve_worker(args.serve_worker)
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
        gateway, daemon, gateway_port = start_gateway(work, ca.ca_pem, server_port,
                                                      args.profile)
        children.append(gateway)
        context = ssl.create_default_context(cafile=str(ca.ca_pem))
        # Same client code on both paths; the name resolves to loopback for this benchmark.
        direct = Path_("direct", server_port, context, "/mcp",
                       {"Host": f"{MCP_NAME}:{server_port}",
                        "Authorization": f"Bearer {SERVER_TOKEN}"})
        auth = base64.b64encode(f"bench:{RUN_TOKEN}".encode()).decode()
        through = Path_("gateway", gateway_port, None, "http://mcp.gateway/code",
                        {"Host": "mcp.gateway", "Proxy-Authorization": f"Basic {auth}"})
        samples: dict[str, list[float]] = {"direct": [], "gateway": []}
        rates: dict[str, list[float]] = {"direct": [], "gateway": []}
        errors = {"direct": 0, "gateway": 0}
        gateway_cpu = 0.0  # the gateway process's CPU seconds over its latency phases
        made = 0  # tools/call answered through the gateway: each must have been audited
        for _ in range(args.rounds):
            for path in (direct, through):
                before = cpu_seconds(gateway.pid)
                samples[path.name] += latency(path, args.calls, args.warmup)
                if path is through:
                    gateway_cpu += cpu_seconds(gateway.pid) - before
                    made += args.calls + args.warmup
        # CPU is what the machine's load does not inflate: the gateway's own cost per call,
        # and so the least it adds to a call's latency on an idle host.
        cpu_per_call_ms = gateway_cpu * 1000 / (args.rounds * (args.calls + args.warmup))
        for _ in range(max(1, args.rounds // 2)):
            for path in (direct, through):
                rate, failed, count = throughput(path, args.concurrency, args.duration)
                rates[path.name].append(rate)
                errors[path.name] += failed
                made += count if path is through else 0
        audited = wait_audited(daemon, made)
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        shutil.rmtree(work, ignore_errors=True)  # the test CA and the port files
    report(args, samples, rates, errors, cpu_per_call_ms)
    print(f"decisions reported to the daemon: {audited} for {made} calls answered "
          f"({dict(sorted(daemon.decisions.items()))})"
          + ("" if audited >= made else " -> MISSING AUDIT"))


def wait_audited(daemon: Daemon, made: int) -> int:
    """The decisions the worker has reported, once they cover the calls made (or 10 s on)."""
    deadline = time.monotonic() + 10
    while daemon.audited() < made and time.monotonic() < deadline:
        time.sleep(0.05)
    return daemon.audited()


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
