"""A real daemon with the egress gateway configured for tests: a test CA, HTTPS upstreams on
loopback, a secrets directory, gateway profiles, and a workspace holding the agent's scripts.
Needs root."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import secrets
import socket
import ssl
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from supervisor.sandbox.cgroups import Cgroup
from tests.support.daemon import (
    Daemon,
    engine_request,
    running_daemon,
    runtime_config,
    wait_for,
)
from tests.support.upstream import TestCA, Upstream, make_ca

T = TypeVar("T")

AGENT_UID = 4242  # the workspace owner; the agent writes it as this uid
# GatewayRig.result's wait ends when the agent writes its result or its run ends without it;
# this bound only stops a hang (an agent's Python and SDK imports take minutes of wall time
# when the suite's load leaves each process a few percent of a core).
RESULT_GUARD = 900.0
# A paused agent is frozen: a result it has not written by PAUSED_GUARD into its pause (what it
# sent before the freeze has arrived long before) never comes until someone resumes it.
PAUSED_GUARD = 30.0

# A credential route to the test upstream, for GatewayRig.profile: the agent calls
# http://llm.gateway/..., the upstream sees "Authorization: Bearer <the rig's secret>".
LLM_ROUTE = """
[[network.gateway.routes]]
name = "llm"
host = "llm.gateway"
upstream = "https://api.upstream.test:{PORT}"
secret = "file:llm-key"
header = "Authorization"
format = "Bearer {secret}"
price_per_token = 0.01
"""


@dataclass
class GatewayRig:
    daemon: Daemon
    upstream: Upstream
    ca: TestCA
    secret: str
    workspace: Path
    port: int  # the gateway's port on each run's host address
    # Each agent's run, as `until` last saw it: judged by its cgroup while no daemon runs.
    run_ids: dict[str, str] = field(default_factory=dict)

    def profile(self, name: str, gateway: str) -> str:
        """Write profile `name` with network mode gateway and the given [network.gateway]
        TOML body (routes, allow, budget, breaker, approvals)."""
        text = f'[network]\nmode = "gateway"\n\n{textwrap.dedent(gateway)}'
        (self.daemon.root / "profiles" / f"{name}.toml").write_text(
            text.replace("{PORT}", str(self.upstream.port)))
        return name

    def script(self, name: str, body: str) -> str:
        path = self.workspace / name
        path.write_text(textwrap.dedent(body))
        os.chown(path, AGENT_UID, AGENT_UID)
        return f"/workspace/{name}"

    def read(self, name: str) -> Any:
        return json.loads((self.workspace / name).read_text())

    def exists(self, name: str) -> bool:
        return (self.workspace / name).exists()

    def result(self, name: str, agent: str, what: str) -> Any:
        """The JSON result file `name` once `agent` has written it (`until`)."""
        self.until(lambda: self.exists(name), agent, f"{what} ({name})")
        return self.read(name)

    def until(self, predicate: Callable[[], T], agent: str, what: str) -> T:
        """predicate()'s first true value, awaited while `agent`'s run lives. Fails with the
        `diagnosis` at once if the run ends first (between a handover and the next start,
        when no daemon answers: if the run's cgroup empties), once the agent has stayed
        paused PAUSED_GUARD (frozen, it does nothing more), and at RESULT_GUARD, which stops
        only a hang."""
        paused_since: float | None = None

        def seen() -> T | None:
            nonlocal paused_since
            if value := predicate():
                return value
            if self._held_by_no_daemon(agent):
                return None
            view = self.daemon.client.agent(agent)
            run = view["run"]
            if run is None or run["ended_at"] is not None:
                if value := predicate():  # just before the run ended
                    return value
                raise AssertionError(f"{agent}'s run ended before {what}\n"
                                     f"{self.diagnosis(agent)}")
            self.run_ids[agent] = run["id"]
            if view["state"] != "paused":
                paused_since = None
            elif paused_since is None:
                paused_since = time.monotonic()
            elif time.monotonic() - paused_since > PAUSED_GUARD:
                raise AssertionError(
                    f"{agent} was paused by {view['last_actor']} ({view['last_reason']}) "
                    f"before {what}, and stayed paused for {PAUSED_GUARD:.0f}s: a frozen "
                    f"agent does nothing more\n{self.diagnosis(agent)}")
            return None

        try:
            found: T = wait_for(seen, RESULT_GUARD, interval=0.2, what=what)
        except AssertionError as exc:
            if str(exc) != f"timed out after {RESULT_GUARD}s waiting for {what}":
                raise  # seen's own failure, which says why already
            raise AssertionError(f"{exc}\n{self.diagnosis(agent)}") from None
        return found

    def _held_by_no_daemon(self, agent: str) -> bool:
        """True while no daemon runs (a handover's window) and `agent`'s run, seen before,
        still has processes in its cgroup; AssertionError once they are gone; False (ask the
        daemon) otherwise."""
        if self.daemon.proc is None or self.daemon.proc.poll() is None:
            return False
        run_id = self.run_ids.get(agent)
        if run_id is None:
            return False
        cgroup = Cgroup(f"{self.daemon.cgroup_parent.strip('/')}/{self.daemon.prefix}-{run_id}")
        if not cgroup.exists():
            return False
        if cgroup.populated():
            return True
        raise AssertionError(f"{agent}'s run {run_id} ended while no daemon held it\n"
                             f"{self.diagnosis(agent)}")

    def diagnosis(self, agent: str) -> str:
        """What `agent`'s run, its processes, its MCP servers and the daemon with its gateway
        worker were doing, for a wait that failed: the run's state, the agent's output, each
        process of the daemon's cgroups (where it sleeps in the kernel), the MCP servers'
        logs and the daemon's log's tail."""
        parts = []
        for args in (("inspect", agent), ("logs", agent)):
            try:
                done = self.daemon.agentctl(*args)
                said = done.stdout if done.returncode == 0 else \
                    f"exit {done.returncode}: {done.stderr}"
            except Exception as exc:  # a daemon that no longer answers is part of the story
                said = f"{type(exc).__name__}: {exc}"
            parts.append(f"agentctl {' '.join(args)}: {said[-4000:]}")
        beside = [Cgroup(self.daemon.cgroup_parent.rstrip("/") + name)
                  for name in ("-gateway", "-watchdog")]
        for cgroup in [*self.daemon.cgroups(), *beside]:
            for pid in cgroup.pids() if cgroup.exists() else []:
                parts.append(f"{cgroup.relative} pid {pid}: {_process(pid)}")
        for log in sorted(self.daemon.root.rglob("*-mcp-*.log")):
            parts.append(f"{log.name}: {log.read_text(errors='replace')[-3000:]}")
        lines = [line[:300] for line in self.daemon.logs().splitlines()
                 if "DEBUG pyroute2" not in line]
        parts.append("daemon log (with its gateway worker's):\n" + "\n".join(lines[-80:]))
        return "\n".join(parts)

    def touch(self, name: str) -> None:
        path = self.workspace / name
        path.write_text("go\n")
        os.chown(path, AGENT_UID, AGENT_UID)

    def proxy_env(self, agent: str) -> dict[str, str]:
        """The proxy environment the daemon gave the agent's current run (from the run's OCI
        bundle, root-only, or the engine's record of the container), so a test on the host
        can act with its token."""
        view = self.daemon.agentctl_json("inspect", agent)
        container = f"{self.daemon.prefix}-{view['run']['id']}"
        bundle = self.daemon.root / "run" / "bundles" / container
        if (bundle / "config.json").exists():
            env = json.loads((bundle / "config.json").read_text())["process"]["env"]
        else:
            env = engine_request("GET", f"/containers/{container}/json")["Config"]["Env"]
        return dict(item.split("=", 1) for item in env)


def _process(pid: int) -> str:
    """A process's command line, state and kernel wait channel (gone: said so)."""
    try:
        proc = Path(f"/proc/{pid}")
        argv = proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ")
        state = next(line for line in proc.joinpath("status").read_text().splitlines()
                     if line.startswith("State:"))
        return f"{argv.decode(errors='replace')[:200]} ({state}, " \
               f"wchan {proc.joinpath('wchan').read_text()})"
    except (OSError, StopIteration):
        return "gone"


def gateway_parts(agent_env: dict[str, str]) -> tuple[str, int, str]:
    """(gateway address, port, Proxy-Authorization value) from an HTTP_PROXY setting."""
    proxy = agent_env["HTTP_PROXY"].removeprefix("http://")
    creds, _, address = proxy.rpartition("@")
    host, _, port = address.partition(":")
    return host, int(port), "Basic " + base64.b64encode(creds.encode()).decode()


def host_request(agent_env: dict[str, str], request: bytes, timeout: float = 5.0) -> bytes:
    """Send one raw request to the run's gateway from the host, with the run's token."""
    host, port, auth = gateway_parts(agent_env)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request.replace(b"\r\n\r\n", f"\r\nProxy-Authorization: {auth}\r\n\r\n"
                                     .encode(), 1))
        chunks = []
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def open_tunnel(agent_env: dict[str, str], target: str, ca: TestCA,
                timeout: float = 5.0) -> ssl.SSLSocket:
    """A CONNECT tunnel through the run's gateway, with TLS to `target` inside it."""
    host, port, auth = gateway_parts(agent_env)
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
                 f"Proxy-Authorization: {auth}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"gateway closed the CONNECT: {head!r}")
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(head.decode(errors="replace"))
    context = ssl.create_default_context(cafile=str(ca.ca_pem))
    return context.wrap_socket(sock, server_hostname=target.rsplit(":", 1)[0])


@contextlib.contextmanager
def gateway_rig(tmp_root: Path, runtime: str = "runc", daemon_config: dict[str, Any] | None = None,
                **egress: Any) -> Iterator[GatewayRig]:
    """`daemon_config`: more sections for the daemon's config (roles, [daemon] socket_group)."""
    ca = make_ca(tmp_root / "ca")
    upstream = Upstream(ca).start()
    secret_dir = tmp_root / "secrets"
    secret_dir.mkdir(mode=0o700)
    secret = f"sk-test-{secrets.token_hex(16)}"
    key = secret_dir / "llm-key"
    key.write_text(secret + "\n")
    key.chmod(0o600)
    workspace = tmp_root / "workspace"
    workspace.mkdir()
    os.chown(workspace, AGENT_UID, AGENT_UID)
    ca_copy = workspace / "ca.pem"
    ca_copy.write_bytes(ca.ca_pem.read_bytes())
    os.chown(ca_copy, AGENT_UID, AGENT_UID)
    port = random.randint(20000, 29999)
    config = {
        # A pool of the test's own, so concurrent test daemons never share addresses.
        "pool": f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24",
        "port": port, "secrets_dir": str(secret_dir), "ca_file": str(ca.ca_pem),
        "hosts": {name: "127.0.0.1" for name in
                  ("api.upstream.test", "pkg.upstream.test", "other.upstream.test")},
        **egress,
    }
    try:
        with running_daemon(tmp_root, egress=config, **runtime_config(runtime),
                            **(daemon_config or {})) as daemon:
            yield GatewayRig(daemon, upstream, ca, secret, workspace, port)
    finally:
        upstream.stop()
