"""Benchmark: how long a kill takes when the daemon is busy, against the same kill when it is idle.

One daemon (its own state, cgroup parent and name prefix; tests/support/daemon.py) with 20
background agents. Each sample launches a victim agent of 20 processes, waits until all are up,
then kills it over the control socket and records:

- the wall time of the `POST /v1/actions/kill` call (request written -> answer read);
- the daemon's `time_to_halt_ms` from the answer;
- whether the kill was confirmed (the victim's cgroup empty when the answer came back) and
  audited (a `kill` row for the victim with outcome ok).

Loads, each started before its samples and stopped after them; an idle block runs before every
load block, so machine noise falls on both alike:

- reads:     16 clients looping `GET /v1/agents`;
- gateway:   an agent in a gateway-mode sandbox looping CONNECTs to a host its policy refuses;
- seccomp:   an agent looping a notified, denied syscall (unshare(CLONE_NEWUSER));
- verify:    `agentctl audit verify` in a loop over an audit log seeded with --audit-rows rows;
- halfopen:  --halfopen connections to the control socket, each with half a request line.
  If the API cannot be reached the sample is recorded as failed and the agent is halted with
  SIGUSR1 (break-glass) instead; that halt's time (signal -> cgroup empty) is reported.

The two floods of the control socket (reads, halfopen) run as --flood-as: by default `viewer`,
a user made for the run (removed after it) in the socket's group and mapped to the viewer role,
as a caller with socket access but no owner role is; `root` floods as the bench itself, i.e.
as an owner, who is not held to a per-uid cap and may take the owners' reserved slots (an
owner flooding the switch is not an attack the admission control can tell from an owner).
The kills are always made by root, on the owners' socket as agentctl makes them (--kill-socket
control: on the control socket the floods share).

Prints per load the median and p95 of both figures, the ratio of each median to the idle
median, and the target (every loaded median <= 1.5x idle, every kill confirmed and audited).
A missed target prints MISSED and still exits 0: this is a benchmark, not a test. Bounded in
time: each load block runs --samples kills (default 5), each with a 30 s limit.

Needs root, runc and cgroup v2 (pure or hybrid); removes everything it made, also on Ctrl-C.

    sudo .venv/bin/python bench/kill_under_load.py [--samples 5]
        [--loads reads,gateway,seccomp,verify,halfopen] [--halfopen 20000]
        [--flood-as viewer|root] [--kill-socket owner|control] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import random
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.support is not installed; run from anywhere

from stats import cpu_model, nearest_rank  # noqa: E402

from supervisor.api.client import owner_socket_of  # noqa: E402
from supervisor.sandbox.cgroups import Cgroup  # noqa: E402
from tests.support.daemon import Daemon, new_daemon  # noqa: E402

LOADS = ("reads", "gateway", "seccomp", "verify", "halfopen")
_PER_KILL = frozenset({"halfopen"})  # on only around each kill (launches need the socket)
TARGET_RATIO = 1.5
VICTIM_PROCESSES = 20
BACKGROUND_AGENTS = 20
READERS = 16
KILL_TIMEOUT = 30.0
READY_TIMEOUT = 60.0

# The agent's side of the gateway flood: CONNECT to a host the policy refuses, forever.
GATEWAY_FLOOD = r"""
import base64, os, socket
proxy = os.environ["HTTP_PROXY"].removeprefix("http://")
creds, _, address = proxy.rpartition("@")
host, _, port = address.partition(":")
auth = base64.b64encode(creds.encode()).decode()
request = (f"CONNECT refused.example:443 HTTP/1.1\r\nHost: refused.example:443\r\n"
           f"Proxy-Authorization: Basic {auth}\r\n\r\n").encode()
while True:
    try:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(request)
            sock.recv(4096)
    except OSError:
        pass
"""
SECCOMP_FLOOD = r"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
while True:
    libc.unshare(0x10000000)
"""
READER = r"""
import socket, sys, time
path, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
request = b"GET /v1/agents HTTP/1.1\r\nHost: supervisor\r\n\r\n"
while time.monotonic() < deadline:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            while len(body) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
    except OSError:
        time.sleep(0.01)
"""

# The half-open flood: as many connects as it gets, each with half a request line, held until
# it is killed. Prints how many it holds (as the client sees them; the daemon closes what is
# over its caps at accept) once they are open.
HALFOPEN = r"""
import resource, socket, sys, time
path, count = sys.argv[1], int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for _ in range(count):
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:  # this process's own table is full: that is as far as it goes
        break
    sock.setblocking(False)
    try:
        sock.connect(path)
        sock.send(b"GET /v1/agents HTTP/1.1\r\nHost: x")
    except OSError:
        sock.close()
        continue
    held.append(sock)
print("ready", len(held), flush=True)
time.sleep(3600)
"""


@dataclass
class FloodUser:
    """Who the socket floods run as: None is root (the bench itself)."""

    user: pwd.struct_passwd | None = None

    def popen_args(self) -> dict[str, Any]:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid,
                "extra_groups": os.getgrouplist(self.user.pw_name, self.user.pw_gid)}


@contextlib.contextmanager
def viewer_user() -> Iterator[tuple[str, pwd.struct_passwd]]:
    """A user for the run in a group of its own (the socket's group): (group, user)."""
    tag = secrets.token_hex(2)
    group, name = f"asb-load-{tag}", f"asb-view-{tag}"
    subprocess.run(["groupadd", group], check=True)
    try:
        subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-G", group, name],
                       check=True)
        try:
            yield group, pwd.getpwnam(name)
        finally:
            subprocess.run(["userdel", name], check=False, capture_output=True)
    finally:
        subprocess.run(["groupdel", group], check=False, capture_output=True)


def workload(processes: int) -> list[str]:
    return ["/bin/sh", "-c",
            f"for i in $(seq {processes - 1}); do sleep 1000 & done; exec sleep 1000"]


@dataclass
class Sample:
    load: str
    block: int
    wall_ms: float | None
    time_to_halt_ms: float | None
    confirmed: bool
    audited: bool
    error: str | None = None
    breakglass_ms: float | None = None  # halfopen: SIGUSR1 -> cgroup empty, when the API failed


class Bench:
    def __init__(self, daemon: Daemon, samples: int, audit_rows: int, halfopen: int,
                 flooder: FloodUser, kill_socket: str = "owner") -> None:
        self.daemon = daemon
        self.kill_socket = kill_socket
        self.flooder = flooder
        self.samples = samples
        self.audit_rows = audit_rows
        self.halfopen = halfopen
        self.count = 0
        self.opened = 0  # half-open connections actually made, last time
        self.results: list[Sample] = []

    # ------------------------------------------------------------------ one kill

    def cgroup_of(self, run_id: str) -> Cgroup:
        return Cgroup(f"{self.daemon.cgroup_parent.strip('/')}/{self.daemon.prefix}-{run_id}")

    def launch(self, name: str, command: list[str], profile: str | None = None,
               processes: int = 1) -> Cgroup:
        body: dict[str, Any] = {"name": name, "command": command}
        if profile is not None:
            body["profile"] = profile
        view = self.daemon.client.run(body)
        cgroup = self.cgroup_of(view["id"])
        deadline = time.monotonic() + READY_TIMEOUT
        while len(cgroup.pids()) < processes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: {len(cgroup.pids())} of {processes} processes")
            time.sleep(0.02)
        return cgroup

    def sample(self, load: str, block: int) -> Sample:
        self.count += 1
        name = f"victim-{self.count}"
        cgroup = self.launch(name, workload(VICTIM_PROCESSES), processes=VICTIM_PROCESSES)
        time.sleep(0.1)
        if load in _PER_KILL:  # a load that takes the socket away: on only for the kill
            with self.load(load):
                return self._kill(name, cgroup, load, block)
        return self._kill(name, cgroup, load, block)

    def _kill(self, name: str, cgroup: Cgroup, load: str, block: int) -> Sample:
        # Where agentctl sends a kill when its caller may: the owners' socket, when the daemon
        # has one (--socket control measures the control socket the floods share).
        owner_socket = owner_socket_of(self.daemon.socket)
        sock_path = str(owner_socket if self.kill_socket == "owner" and owner_socket.exists()
                        else self.daemon.socket)
        body = json.dumps({"scope": {"agent": name}, "reason": f"bench {load}"}).encode()
        request = (f"POST /v1/actions/kill HTTP/1.1\r\nHost: supervisor\r\nContent-Type: "
                   f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        wall_ms = halt_ms = None
        error = None
        t0 = time.perf_counter()
        try:
            reply = _roundtrip(sock_path, request, KILL_TIMEOUT)
            wall_ms = (time.perf_counter() - t0) * 1000
            status = int(reply.split(b" ", 2)[1])
            payload = json.loads(reply.partition(b"\r\n\r\n")[2])
            if status != 200:
                error = f"{status}: {payload.get('error', {}).get('code')}"
            else:
                halt_ms = payload["results"][0]["time_to_halt_ms"]
        except (OSError, ValueError, IndexError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        confirmed = not (cgroup.exists() and cgroup.populated())
        breakglass_ms = None
        if error is not None and not confirmed:
            # The API could not be reached: the switch must still work (break-glass).
            assert self.daemon.proc is not None
            t1 = time.perf_counter()
            os.kill(self.daemon.proc.pid, signal.SIGUSR1)
            confirmed = cgroup.wait_empty(KILL_TIMEOUT)
            breakglass_ms = (time.perf_counter() - t1) * 1000
        return Sample(load, block, wall_ms, halt_ms, confirmed, False, error, breakglass_ms)

    def check_audited(self) -> None:
        """After the loads: which victims' kills are in the audit log (ok)."""
        killed = set()
        after = 0
        while True:
            page = self.daemon.client.audit(limit=1000, after=after)["entries"]
            if not page:
                break
            after = page[-1]["seq"]
            killed |= {e["target"] for e in page if e["verb"] == "kill" and e["outcome"] == "ok"
                       and (e["target"] or "").startswith("victim-")}
        for index, sample in enumerate(self.results):
            sample.audited = f"victim-{index + 1}" in killed

    # ------------------------------------------------------------------ loads

    @contextlib.contextmanager
    def load(self, name: str) -> Iterator[None]:
        if name == "idle":
            yield
        elif name == "reads":
            with self._readers():
                yield
        elif name == "gateway":
            self.launch(f"flood-gw-{secrets.token_hex(2)}",
                        ["/usr/bin/python3", "-c", GATEWAY_FLOOD], profile="benchgw")
            time.sleep(1.0)
            try:
                yield
            finally:
                self._kill_floods()
        elif name == "seccomp":
            self.launch(f"flood-sc-{secrets.token_hex(2)}",
                        ["/usr/bin/python3", "-c", SECCOMP_FLOOD])
            time.sleep(1.0)
            try:
                yield
            finally:
                self._kill_floods()
        elif name == "verify":
            with self._verifiers():
                yield
        elif name == "halfopen":
            with self._half_open():
                yield
        else:
            raise ValueError(name)

    def _kill_floods(self) -> None:
        for agent in self.daemon.client.agents()["agents"]:
            if agent["name"].startswith("flood-") and agent["state"] == "active":
                self.daemon.client.action("kill", {"agent": agent["name"]}, reason="bench over")

    @contextlib.contextmanager
    def _readers(self) -> Iterator[None]:
        procs = [subprocess.Popen([sys.executable, "-c", READER, str(self.daemon.socket), "600"],
                                  cwd="/", **self.flooder.popen_args())
                 for _ in range(READERS)]
        time.sleep(1.0)
        try:
            yield
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()

    @contextlib.contextmanager
    def _verifiers(self) -> Iterator[None]:
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                self.daemon.agentctl("audit", "verify", timeout=600)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        time.sleep(1.0)
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=600)

    @contextlib.contextmanager
    def _half_open(self) -> Iterator[None]:
        proc = subprocess.Popen([sys.executable, "-c", HALFOPEN, str(self.daemon.socket),
                                 str(self.halfopen)], stdout=subprocess.PIPE, text=True,
                                cwd="/", **self.flooder.popen_args())
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().split()
            self.opened = int(line[1]) if len(line) == 2 and line[0] == "ready" else 0
            time.sleep(1.0)
            yield
        finally:
            proc.kill()
            proc.wait()
            time.sleep(1.0)
            if self.daemon.client.health()["global_halt"]:
                self.daemon.agentctl("reactivate", "--all", "--reason", "bench: after halfopen",
                                     check=True)
            for agent in self.daemon.client.agents()["agents"]:
                if agent["name"].startswith("bg-") and agent["state"] == "killed":
                    self.daemon.client.action("reactivate", {"agent": agent["name"]})

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        for i in range(BACKGROUND_AGENTS):
            self.launch(f"bg-{i}", ["sleep", "3600"])

    def run(self, loads: list[str]) -> None:
        for block, load in enumerate(loads):
            for phase in ("idle", load):
                print(f"  block {block + 1}/{len(loads)}: {phase}", file=sys.stderr, flush=True)
                with self.load(phase if phase not in _PER_KILL else "idle"):
                    for _ in range(self.samples):
                        self.results.append(self.sample(phase, block))
                        if phase in _PER_KILL:  # break-glass may have halted the others
                            self._relaunch_background()

    def _relaunch_background(self) -> None:
        names = {a["name"]: a for a in self.daemon.client.agents()["agents"]}
        for i in range(BACKGROUND_AGENTS):
            agent = names.get(f"bg-{i}")
            if agent is None or agent["state"] == "idle":
                self.launch(f"bg-{i}", ["sleep", "3600"])


def _roundtrip(path: str, request: bytes, timeout: float) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before the answer: {data[:200]!r}")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body


def seed_audit(state_db: Path, rows: int) -> None:
    """Append `rows` audit rows before the daemon starts (one transaction per 1000)."""
    from supervisor.audit import AuditLog
    from supervisor.daemon.store import connect

    db = connect(state_db)
    audit = AuditLog(db)
    for i in range(rows):
        audit.append(actor="system:bench", verb="bench_seed", scope="global",
                     reason=f"seed row {i}", detail={"i": i})
    db.close()


def summarize(samples: list[Sample]) -> list[dict[str, Any]]:
    idle = [s for s in samples if s.load == "idle"]

    def med(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    idle_wall = med([s.wall_ms for s in idle if s.wall_ms is not None])
    idle_halt = med([s.time_to_halt_ms for s in idle if s.time_to_halt_ms is not None])
    rows = []
    for load in ["idle", *LOADS]:
        group = [s for s in samples if s.load == load]
        if not group:
            continue
        walls = [s.wall_ms for s in group if s.wall_ms is not None]
        halts = [s.time_to_halt_ms for s in group if s.time_to_halt_ms is not None]
        glass = [s.breakglass_ms for s in group if s.breakglass_ms is not None]
        rows.append({
            "load": load, "n": len(group), "failed": sum(1 for s in group if s.error),
            "confirmed": sum(1 for s in group if s.confirmed),
            "audited": sum(1 for s in group if s.audited),
            "wall_median_ms": med(walls), "wall_p95_ms": nearest_rank(walls, 0.95) if walls
            else None, "halt_median_ms": med(halts),
            "halt_p95_ms": nearest_rank(halts, 0.95) if halts else None,
            "wall_x_idle": (med(walls) or 0) / idle_wall if walls and idle_wall else None,
            "halt_x_idle": (med(halts) or 0) / idle_halt if halts and idle_halt else None,
            "breakglass_median_ms": med(glass),
            "errors": sorted({s.error for s in group if s.error})[:3],
        })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    def f(value: float | None, suffix: str = "") -> str:
        return "-" if value is None else f"{value:.1f}{suffix}"

    headers = ["load", "n", "failed", "confirmed", "audited", "wall med ms", "wall p95",
               "x idle", "halt med ms", "halt p95", "x idle", "break-glass ms"]
    table = [[r["load"], str(r["n"]), str(r["failed"]), str(r["confirmed"]), str(r["audited"]),
              f(r["wall_median_ms"]), f(r["wall_p95_ms"]), f(r["wall_x_idle"], "x"),
              f(r["halt_median_ms"]), f(r["halt_p95_ms"]), f(r["halt_x_idle"], "x"),
              f(r["breakglass_median_ms"])] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for cells in table:
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    for row in rows:
        for error in row["errors"]:
            print(f"  {row['load']}: {error}")


def verdict(rows: list[dict[str, Any]]) -> str:
    problems = []
    for row in rows:
        if row["load"] == "idle":
            continue
        for key in ("wall_x_idle", "halt_x_idle"):
            if row[key] is None or row[key] > TARGET_RATIO:
                problems.append(f"{row['load']} {key.split('_')[0]} "
                                f"{'-' if row[key] is None else f'{row[key]:.2f}x'}")
    for row in rows:
        if row["confirmed"] < row["n"] or row["audited"] < row["n"] - row["failed"]:
            problems.append(f"{row['load']}: {row['confirmed']}/{row['n']} confirmed, "
                            f"{row['audited']}/{row['n']} audited")
        if row["failed"]:
            problems.append(f"{row['load']}: {row['failed']} kills failed over the API")
    outcome = "MET" if not problems else "MISSED (" + "; ".join(problems) + ")"
    return (f"target: every loaded median <= {TARGET_RATIO}x idle, every kill confirmed and "
            f"audited -> {outcome}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=5, help="kills per block (default 5)")
    parser.add_argument("--loads", default=",".join(LOADS))
    parser.add_argument("--halfopen", type=int, default=20000,
                        help="half-open control-socket connections (default 20000)")
    parser.add_argument("--audit-rows", type=int, default=50000,
                        help="audit rows seeded for the verify load (default 50000)")
    parser.add_argument("--flood-as", choices=("viewer", "root"), default="viewer",
                        help="who floods the control socket (reads, halfopen): a user made "
                        "for the run with the viewer role (default), or root, an owner")
    parser.add_argument("--kill-socket", choices=("owner", "control"), default="owner",
                        help="where the kills go: the owners' socket, as agentctl sends a "
                        "root's kill (default), or the control socket the floods share")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    loads = [x for x in args.loads.split(",") if x]
    if unknown := set(loads) - set(LOADS):
        parser.error(f"unknown loads {sorted(unknown)}; choose from {', '.join(LOADS)}")
    if os.geteuid() != 0:
        print("kill_under_load: needs root", file=sys.stderr)
        return 2
    print(f"machine: nproc={len(os.sched_getaffinity(0))}, cpu={cpu_model()}, "
          f"kernel={os.uname().release}")
    print(f"loads {loads}, {args.samples} kills per block, {VICTIM_PROCESSES}-process victims, "
          f"{BACKGROUND_AGENTS} background agents, socket floods as {args.flood_as}, "
          f"kills on the {args.kill_socket} socket, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with contextlib.ExitStack() as stack:
        flooder = FloodUser()
        extra: dict[str, dict[str, Any]] = {"daemon": {"log_level": "info"}}
        if args.flood_as == "viewer":
            group, user = stack.enter_context(viewer_user())
            flooder = FloodUser(user)
            extra = {"daemon": {"log_level": "info", "socket_group": group},
                     "roles": {"viewer": [f"user:{user.pw_name}"]}}
        return _run(args, loads, flooder, extra)


def _run(args: argparse.Namespace, loads: list[str], flooder: FloodUser,
         extra: dict[str, dict[str, Any]]) -> int:

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    tmp_root = Path(tempfile.mkdtemp(prefix="as-bench-load-", dir="/tmp"))
    tmp_root.chmod(0o755)
    pool = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24"
    daemon = new_daemon(tmp_root, **extra,
                        egress={"pool": pool, "port": random.randint(20000, 29999)},
                        kill={"confirm_timeout": "10s"})
    (daemon.root / "profiles" / "benchgw.toml").write_text(
        '[network]\nmode = "gateway"\n\n[network.gateway]\nallow = ["allowed.example:443"]\n')
    bench = Bench(daemon, args.samples, args.audit_rows, args.halfopen, flooder,
                  args.kill_socket)
    interrupted = False
    try:
        if "verify" in loads and args.audit_rows:
            print(f"  seeding {args.audit_rows} audit rows", file=sys.stderr, flush=True)
            seed_audit(daemon.state_db, args.audit_rows)
        daemon.start()
        # The bench needs room for its half-open connections; the daemon keeps the limit it
        # started with (as a service keeps its unit's LimitNOFILE).
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.halfopen + 4096)),
                                                    hard))
        bench.setup()
        bench.run(loads)
        bench.check_audited()
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted; cleaning up", file=sys.stderr)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        code = daemon.stop()
        residue = daemon.residue()
        daemon.cleanup_host()
        if code not in (0, None) or residue:
            print(f"cleanup: daemon exited {code}, left {residue}; log {daemon.log_path}",
                  file=sys.stderr)
        else:
            shutil.rmtree(tmp_root, ignore_errors=True)
    if interrupted:
        return 130
    rows = summarize(bench.results)
    print()
    print_table(rows)
    print()
    print("wall = POST /v1/actions/kill written -> answer read; halt = the daemon's "
          "time_to_halt_ms")
    if "halfopen" in loads:
        print(f"halfopen: {bench.opened} half-open connects made by the flood (as "
              f"{args.flood_as}) during each of its kills")
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(verdict(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "verdict": verdict(rows),
                                         "samples": [asdict(s) for s in bench.results]},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
