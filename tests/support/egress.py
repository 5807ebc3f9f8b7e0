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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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
        """predicate()'s first true value, awaited while `agent`'s run lives: fails at once,
        with the agent's output, if the run ends first (RESULT_GUARD stops only a hang)."""

        def seen() -> T | None:
            if value := predicate():
                return value
            run = self.daemon.client.agent(agent)["run"]
            if run is None or run["ended_at"] is not None:
                if value := predicate():  # just before the run ended
                    return value
                output = self.daemon.agentctl("logs", agent).stdout[-4000:]
                raise AssertionError(f"{agent}'s run ended before {what}; its output:\n"
                                     f"{output}")
            return None

        found: T = wait_for(seen, RESULT_GUARD, interval=0.2, what=what)
        return found

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
