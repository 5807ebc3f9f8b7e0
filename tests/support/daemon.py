"""A real agent-supervisord process for tests: its own state, runtime dir, cgroup parent and
name prefix, so tests never touch anything but what they made. Needs root."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from supervisor.api.client import Client
from supervisor.egress import nft
from supervisor.sandbox.cgroups import Cgroup, unified_root

REPO = Path(__file__).resolve().parents[2]
TEST_CGROUP_ROOT = "/agent-supervisor-test"
# The cgroup parents of this session's test daemons: the session removes these at its end,
# never another session's (tests/conftest.py).
SESSION_CGROUP_PARENTS: set[str] = set()
# Test daemons import their own skeleton image, removed when the session ends.
TEST_HOST_ROOT_IMAGE = "agent-supervisor-test/host-root:1"
DOCKER_SOCKET = "unix:///var/run/docker.sock"


def runtime_config(runtime: str) -> dict[str, dict[str, Any]]:
    """A test daemon's config sections for `runtime` ("runc" needs none)."""
    if runtime == "runc":
        return {}
    return {"sandbox": {"runtime": runtime}, "docker": {"host_root_image": TEST_HOST_ROOT_IMAGE}}


def engine_request(method: str, path: str, base_url: str = DOCKER_SOCKET,
                   body: bytes = b"", timeout: float = 60.0) -> Any:
    """One Docker API call over the engine's socket with the standard library: HTTP/1.0, so
    the engine closes the connection and no pooled socket outlives the call (the SDK's pool
    leaves sockets to the garbage collector, which `-W error` turns into failures)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(base_url.removeprefix("unix://"))
        sock.sendall(f"{method} /v1.41{path} HTTP/1.0\r\nHost: docker\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if status >= 300:
        raise OSError(f"docker {method} {path}: {status} {payload[:200]!r}")
    return json.loads(payload) if payload.strip().startswith((b"{", b"[")) else payload


def docker_reachable(base_url: str = DOCKER_SOCKET) -> bool:
    try:
        engine_request("GET", "/_ping", base_url, timeout=10)
    except (OSError, ValueError, IndexError):
        return False
    return True


def remove_test_images(images: list[str], base_url: str = DOCKER_SOCKET) -> None:
    if not docker_reachable(base_url):
        return
    for image in images:
        with contextlib.suppress(OSError):
            engine_request("DELETE", f"/images/{image}?force=1", base_url)


@dataclass
class Daemon:
    root: Path
    config_path: Path
    prefix: str
    cgroup_parent: str
    # A section's values, or a list of tables (webhooks=[{...}] renders [[webhooks]]).
    extra_config: dict[str, dict[str, Any] | list[dict[str, Any]]] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    # Prepended to the daemon's command line (tests/fleet: nsenter into the host's netns).
    launcher: list[str] = field(default_factory=list)
    # The daemon's whole environment when set (else the test's own).
    env: dict[str, str] | None = None

    @property
    def socket(self) -> Path:
        return self.root / "run" / "control.sock"

    @property
    def state_db(self) -> Path:
        return self.root / "state" / "state.db"

    @property
    def audit_key(self) -> Path:
        return self.root / "etc" / "audit-key"

    @property
    def checkpoint_file(self) -> Path:
        return self.root / "log" / "audit-checkpoints.jsonl"

    @property
    def log_path(self) -> Path:
        return self.root / "daemon.log"

    @property
    def client(self) -> Client:
        return Client(self.socket, timeout=60)

    def write_config(self) -> None:
        sections: dict[str, dict[str, Any]] = {
            # The control socket's group must exist (a start refuses one that does not):
            # root's, so the socket is root's alone unless a test names a group of its own.
            "daemon": {"state_dir": str(self.root / "state"),
                       "socket_group": "root",
                       "runtime_dir": str(self.root / "run"),
                       "profile_dirs": [str(self.root / "profiles")],
                       "log_level": "debug"},
            "sandbox": {"cgroup_parent": self.cgroup_parent, "name_prefix": self.prefix},
            "kill": {"confirm_timeout": "5s"},
            # Off unless a test asks (metrics={"listen": ...}): test daemons never race for 9464.
            "metrics": {"listen": ""},
            # The audit anchors lie outside the state dir, and never in the host's /etc.
            "audit": {"key": str(self.audit_key), "checkpoint_file": str(self.checkpoint_file),
                      "reserve_bytes": 4 << 20},
        }
        tables: dict[str, list[dict[str, Any]]] = {}
        for section, values in self.extra_config.items():
            if isinstance(values, list):
                tables[section] = values
            else:
                sections.setdefault(section, {}).update(values)
        lines = []
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines.extend(f"{k} = {_toml(v)}" for k, v in values.items())
        for section, items in tables.items():
            for item in items:
                lines.append(f"[[{section}]]")
                lines.extend(f"{k} = {_toml(v)}" for k, v in item.items())
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 30.0, ready: bool = True) -> None:
        """`ready`: wait until it answers on its control socket (else return once started)."""
        self.write_config()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [*self.launcher, sys.executable, "-m", "supervisor.daemon", "--config",
             str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            cwd=REPO,
            env=self.env,
        )
        log.close()
        if not ready:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.logs()}")
            # A daemon handing over at a restart may still answer on the same socket path
            # ("shutting_down") while this one starts: only an answer of a serving daemon
            # counts.
            if self.socket.exists():
                with contextlib.suppress(Exception):
                    if self.client.health()["status"] != "shutting_down":
                        return
            time.sleep(0.05)
        raise RuntimeError(f"daemon not ready after {timeout}s:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_errors(self, limit: int = 6000) -> str:
        """The daemon log's error lines and tracebacks (the last `limit` characters)."""
        kept: list[str] = []
        in_traceback = False
        for line in self.logs().splitlines():
            if " ERROR " in line or line.startswith("Traceback"):
                in_traceback = line.startswith("Traceback")
                kept.append(line)
            elif in_traceback and (line.startswith((" ", "\t")) or ":" in line):
                kept.append(line)
                in_traceback = line.startswith((" ", "\t"))
            else:
                in_traceback = False
        return "\n".join(kept)[-limit:]

    def agentctl(self, *args: str, input_text: str | None = None, timeout: float = 120,
                 user: int | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "AGENT_SUPERVISOR_SOCKET": str(self.socket)}
        result = subprocess.run(
            [sys.executable, "-m", "supervisor.cli", *args], env=env, capture_output=True,
            text=True, timeout=timeout, input=input_text, user=user,
            cwd=str(self.root) if user is None else "/",
        )
        if "internal_error" in result.stderr:
            # The daemon keeps an internal error's traceback in its log, not in its answer:
            # brought into the result, so the failing assertion shows the cause.
            result.stderr += "\n-- the daemon's log, its errors:\n" + self.log_errors()
        if check and result.returncode != 0:
            raise AssertionError(f"agentctl {' '.join(args)} -> {result.returncode}\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    def check_config(self) -> subprocess.CompletedProcess[str]:
        """agent-supervisord --check-config on this daemon's file."""
        return subprocess.run([sys.executable, "-m", "supervisor.daemon", "--config",
                               str(self.config_path), "--check-config"], capture_output=True,
                              text=True, timeout=60)

    def agentctl_json(self, *args: str) -> Any:
        """agentctl with --json among its own options (before any `--` and agent command)."""
        split = args.index("--") if "--" in args else len(args)
        result = self.agentctl(*args[:split], "--json", *args[split:], check=True)
        return json.loads(result.stdout)

    def cgroup_dir(self) -> Path:
        return unified_root() / self.cgroup_parent.strip("/")

    def run_cgroups(self) -> list[Path]:
        parent = self.cgroup_dir()
        return sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []

    def cgroups(self) -> list[Cgroup]:
        parent = self.cgroup_parent.strip("/")
        return [Cgroup(f"{parent}/{p.name}") for p in self.run_cgroups()]

    def agent_pids(self) -> list[int]:
        return [pid for cgroup in self.cgroups() for pid in cgroup.pids()]

    def netns_left(self) -> list[str]:
        netns_dir = Path("/run/netns")
        if not netns_dir.is_dir():
            return []
        return sorted(p.name for p in netns_dir.iterdir() if p.name.startswith(self.prefix + "-"))

    def residue(self) -> dict[str, Any]:
        """Everything of this daemon's runs still on the host; {} when clean."""
        left: dict[str, Any] = {}
        if cgroups := self.run_cgroups():
            left["cgroups"] = [str(c) for c in cgroups]
        if netns := self.netns_left():
            left["netns"] = netns
        bundles = self.root / "run" / "bundles"
        if bundles.is_dir() and (items := sorted(p.name for p in bundles.iterdir())):
            left["bundles"] = items
        if tables := nft.tables_with_prefix(self.prefix):
            left["nft_tables"] = tables
        workspaces = self.root / "run" / "workspaces"
        if workspaces.is_dir() and (items := sorted(p.name for p in workspaces.iterdir())):
            left["workspace_mounts"] = items
        if containers := self.containers():
            left["containers"] = containers
        return left

    def clean(self, timeout: float = 30.0) -> dict[str, Any]:
        """The residue once the runs' cleanup has had `timeout` to finish ({} when clean): a
        kill answers before runtime state and bundles go (issue 12), so a test that checks the
        host right after a kill waits for that cleanup, and still sees what never went."""
        deadline = time.monotonic() + timeout
        while (left := self.residue()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def settled(self, agent: str, guard: float = 300.0) -> dict[str, Any]:
        """The residue once the agent's last run has been cleaned up ({} when clean): waits
        for the daemon's "run <id> cleaned up" line (the cleanup follows a kill's answer,
        issue 12), which only a hang keeps from coming within `guard` seconds."""
        run_id = self.client.agent(agent)["run"]["id"]
        wait_for(lambda: f"run {run_id} cleaned up" in self.logs(), guard, interval=0.1,
                 what=f"the cleanup of {agent}'s run {run_id}")
        return self.residue()

    def cleanup_audited(self, agent: str, guard: float = 300.0) -> dict[str, Any]:
        """The audit row of the runtime cleanup after `agent`'s kill: written once the run's
        runtime state is gone, after the kill's answer (issue 12), so a test that counts audit
        rows right after a kill waits for it first (only a hang keeps it past `guard`)."""
        def row() -> dict[str, Any] | None:
            rows = [r for r in self.client.audit(limit=10_000)["entries"]
                    if r["target"] == agent]
            return rows[-1] if rows and rows[-1]["verb"] == "cleanup" else None

        found: dict[str, Any] = wait_for(row, timeout=guard, interval=0.1,
                                         what=f"the cleanup row after the kill of {agent}")
        return found

    def containers(self) -> list[str]:
        """The docker containers this daemon's runs carry the label of (running or not)."""
        socket = self.extra_config.get("docker", {})
        base_url = socket.get("socket", DOCKER_SOCKET) if isinstance(socket, dict) else ""
        if not docker_reachable(base_url):
            return []
        filters = json.dumps({"label": [f"io.agent-supervisor.prefix={self.prefix}"]})
        found = engine_request("GET", f"/containers/json?all=1&filters={quote(filters)}",
                               base_url)
        return sorted(str(c["Names"][0]).lstrip("/") for c in found)

    def audit_rows(self, verb: str, limit: int = 1000) -> list[dict[str, Any]]:
        """The audit rows of `verb`, oldest first, among the last `limit`."""
        entries = self.client.audit(limit=limit)["entries"]
        return [e for e in entries if e["verb"] == verb]

    def finish(self) -> None:
        """Stop, print the log's tail (shown when the test failed), and assert the host holds
        nothing of this daemon's once its runs' cleanup had time to end."""
        self.stop()
        print(self.logs()[-20000:])
        residue = self.clean()
        self.cleanup_host()
        assert residue == {}, f"{residue}\n{self.logs()[-6000:]}"

    def cleanup_host(self) -> None:
        """Remove the cgroup parent this daemon used (it must already be empty), and its
        gateway worker's cgroup if a daemon that died without stopping left it."""
        with contextlib.suppress(OSError):
            Cgroup(self.cgroup_parent).remove()
        # The gateway worker's and the watchdog's own cgroups, once their processes are gone.
        for beside in ("-gateway", "-watchdog"):
            Cgroup(self.cgroup_parent.rstrip("/") + beside).remove(strict=False)


def _toml(value: Any) -> str:
    """A TOML value: JSON's scalars and arrays are TOML too; tables are written inline."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def new_daemon(tmp_root: Path, **extra: dict[str, Any] | list[dict[str, Any]]) -> Daemon:
    tag = secrets.token_hex(3)
    root = tmp_root / f"d{tag}"
    (root / "profiles").mkdir(parents=True)
    root.chmod(0o755)
    SESSION_CGROUP_PARENTS.add(f"{TEST_CGROUP_ROOT}/{tag}")
    return Daemon(root=root, config_path=root / "daemon.toml", prefix=f"ast{tag}",
                  cgroup_parent=f"{TEST_CGROUP_ROOT}/{tag}", extra_config=dict(extra))


@contextlib.contextmanager
def running_daemon(tmp_root: Path, **extra: dict[str, Any] | list[dict[str, Any]]
                   ) -> Iterator[Daemon]:
    daemon = new_daemon(tmp_root, **extra)
    daemon.start()
    try:
        yield daemon
    finally:
        code = daemon.stop()
        residue = daemon.residue()
        if residue and daemon.agent_pids():
            # Runs no daemon holds: a test that failed between a handover and the next start.
            # A daemon adopts them and its stop kills them (else the watchdog would, at the
            # end of its window, minutes on, and leave their network and cgroups). What was
            # left still fails the test.
            with contextlib.suppress(Exception):
                daemon.start()
                daemon.stop()
        daemon.cleanup_host()
        if code not in (0, None, -9):
            print(daemon.logs())
        assert not residue, f"the daemon left things behind: {residue}"


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
