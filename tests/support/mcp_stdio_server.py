"""A real stdio MCP server for the gateway's tests: the official SDK's FastMCP, run with
transport="stdio" (newline-delimited JSON-RPC on stdin and stdout). Started as
`python -P mcp_stdio_server.py` (-P: this directory holds tests/support/mcp.py, which would
hide the SDK) by tests/unit/test_mcp_stdio.py, or by the supervisor in the server's own
sandbox (tests/e2e/test_mcp_stdio.py). Its tools report what the server can see (its uid,
the secrets it was given, the network it can reach), so a test can prove what its sandbox
gives it; `slow` blocks until it is cancelled or killed."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the SDK's settings model warns on import
    from mcp.server.fastmcp import FastMCP

    server = FastMCP("files", log_level="WARNING")

SECRET_ENV = "FILES_TOKEN"
SECRET_FILE = "/run/secrets/db.key"


def _digest(value: str | None) -> str | None:
    return None if value is None else hashlib.sha256(value.encode()).hexdigest()


@server.tool()
def echo(text: str) -> str:
    return f"echo: {text}"


@server.tool()
def exec_shell(command: str) -> str:
    return "ran it"


@server.tool()
def whoami() -> dict[str, object]:
    """What the sandbox gave the server: its ids and the digests of its secrets (never the
    secrets themselves, which the test compares by digest)."""
    try:
        with open(SECRET_FILE) as handle:
            secret_file: str | None = handle.read()
    except OSError as exc:
        secret_file = f"unreadable: {type(exc).__name__}"
    return {"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(),
            "env_secret": _digest(os.environ.get(SECRET_ENV)),
            "file_secret": _digest(secret_file),
            "interfaces": sorted(name for _, name in socket.if_nameindex())}


@server.tool()
def connect(host: str, port: int) -> str:
    """Try a TCP connection from the server's sandbox; the error's name when refused."""
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "connected"
    except OSError as exc:
        return type(exc).__name__


@server.tool()
async def slow(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "finished"


if __name__ == "__main__":
    server.run(transport="stdio")
