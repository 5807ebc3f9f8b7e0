"""A real MCP tool server (the official SDK's FastMCP) for the MCP gateway's tests and benchmark:
streamable HTTP over TLS (the test CA of tests/support/upstream.py) on loopback, served by
uvicorn in a thread of its own. It records the credential each request carried and offers
the worked example's tools (docs/mcp.md) plus one the policy never allows and one that
blocks until the test releases it (a call in flight when the agent is killed)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from mcp.server.fastmcp import FastMCP
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.support.upstream import TestCA

MCP_NAME = "code.mcp.test"  # pinned to 127.0.0.1 in the gateway's [egress] hosts
TOKEN = "mcp-server-secret-5e4d3c2b1a"


@dataclass
class ServerLog:
    """What the server saw (written from its thread; read after the calls returned)."""

    authorizations: list[str] = field(default_factory=list)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    deleted_sessions: int = 0
    slow_started: threading.Event = field(default_factory=threading.Event)
    slow_cancelled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


def build(log: ServerLog, *, json_response: bool = False) -> FastMCP:
    with warnings.catch_warnings():
        # The SDK's settings model trips pydantic-settings' forward-reference warning; the
        # field (lifespan) is not read from settings here.
        warnings.filterwarnings("ignore", message=".*incomplete definition.*")
        server = FastMCP("code", host="127.0.0.1", json_response=json_response,
                         log_level="WARNING",
                         transport_security=TransportSecuritySettings(
                             allowed_hosts=[f"{MCP_NAME}:*", "127.0.0.1:*"],
                             allowed_origins=[]))

    @server.tool()
    def read_file(path: str) -> str:
        log.calls.append(("read_file", {"path": path}))
        return f"contents of {path}"

    @server.tool()
    def search(query: str) -> str:
        log.calls.append(("search", {"query": query}))
        return f"3 matches for {query}"

    @server.tool()
    def run_sql(query: str) -> str:
        log.calls.append(("run_sql", {"query": query}))
        return "1 row"

    @server.tool()
    def drop_table(table: str) -> str:
        log.calls.append(("drop_table", {"table": table}))
        return f"dropped {table}"

    @server.tool()
    def exec_shell(command: str) -> str:
        log.calls.append(("exec_shell", {"command": command}))
        return "ran it"

    @server.tool()
    async def slow(seconds: float) -> str:
        log.calls.append(("slow", {"seconds": seconds}))
        log.slow_started.set()
        try:
            deadline = time.monotonic() + seconds
            while not log.release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            log.slow_cancelled.set()
            raise
        return "slept"

    return server


class _Recorder:
    """ASGI middleware: the credential of every request, checked when the server has one."""

    def __init__(self, app: ASGIApp, log: ServerLog, token: str | None) -> None:
        self.app, self.log, self.token = app, log, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            auth = headers.get("authorization", "")
            self.log.authorizations.append(auth)
            if scope["method"] == "DELETE":
                self.log.deleted_sessions += 1
            if self.token is not None and auth != f"Bearer {self.token}":
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": b'{"error":"no token"}'})
                return
        await self.app(scope, receive, send)


class McpUpstream:
    """The server on 127.0.0.1:<port>, reached as https://code.mcp.test:<port>/mcp."""

    def __init__(self, ca: TestCA, *, token: str | None = TOKEN,
                 json_response: bool = False) -> None:
        self.log = ServerLog()
        self.token = token
        app = build(self.log, json_response=json_response).streamable_http_app()
        # proto named: asyncio sets TCP_NODELAY on accepted connections only when the socket
        # says IPPROTO_TCP (uvicorn does not set it), and without it each reply's body waits
        # behind its head for the client's delayed ACK (~40 ms per call).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"https://{MCP_NAME}:{self.port}/mcp"
        config = uvicorn.Config(_Recorder(app, self.log, token), log_level="warning",
                                ssl_certfile=str(ca.cert_pem), ssl_keyfile=str(ca.key_pem),
                                lifespan="on", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self._sock = sock
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name="mcp-upstream", daemon=True)

    def start(self) -> McpUpstream:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the MCP test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.log.release.set()
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self._sock.close()


def main() -> None:
    """`python -m tests.support.mcp CA_DIR PORT_FILE [--json]`: serve until killed (for the
    benchmark, which keeps the server out of its own process)."""
    import sys
    from pathlib import Path

    directory, port_file = Path(sys.argv[1]), Path(sys.argv[2])
    ca = TestCA(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    upstream = McpUpstream(ca, json_response="--json" in sys.argv[3:]).start()
    port_file.write_text(str(upstream.port))
    upstream.thread.join()


if __name__ == "__main__":
    main()
