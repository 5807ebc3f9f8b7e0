"""The console's side of the control socket: every request goes to the daemon over the Unix
socket as the process that runs the console, so SO_PEERCRED names the operator who started it
and the daemon's roles apply unchanged. State-changing requests try the owners' socket first,
as agentctl does, so a flood of the control socket cannot queue in front of them. Bounded: at
most `limit` requests in flight."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from supervisor.api.client import owner_socket_of

# The owners' socket refuses a connection it will not serve before reading a byte (absent, not
# ours, not an owner): such a request was not acted on and goes to the control socket instead.
_NOT_ON_OWNER_SOCKET = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError,
                        aiohttp.ClientOSError)
# Reads the daemon may take long over (verify, drills) get their own, longer budget.
READ_TIMEOUT = 30.0
SLOW_TIMEOUT = 300.0


class Reply:
    """The daemon's answer as status and decoded JSON (errors keep the daemon's body)."""

    __slots__ = ("body", "status")

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body

    @property
    def ok(self) -> bool:
        return self.status < 400


def unavailable(message: str, socket_path: str) -> Reply:
    return Reply(503, {"error": {"code": "daemon_unavailable", "message": message,
                                 "detail": {"socket": socket_path,
                                            "hint": "is agent-supervisord running, and may "
                                                    "your user open its socket?"}}})


class Upstream:
    def __init__(self, socket_path: str, limit: int = 8) -> None:
        self.socket_path = socket_path
        self.owner_socket_path = str(owner_socket_of(Path(socket_path)))
        self._slots = asyncio.Semaphore(limit)
        self._session: aiohttp.ClientSession | None = None
        self._owner_session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self.socket_path, limit=0))
        self._owner_session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self.owner_socket_path, limit=0))

    async def close(self) -> None:
        for session in (self._session, self._owner_session):
            if session is not None:
                await session.close()

    async def call(self, method: str, path: str, body: Any = None, slow: bool = False
                   ) -> Reply:
        assert self._session is not None and self._owner_session is not None, "start() first"
        timeout = aiohttp.ClientTimeout(total=SLOW_TIMEOUT if slow else READ_TIMEOUT)
        async with self._slots:
            if method not in ("GET", "HEAD"):
                try:
                    return _decode(*await _send(self._owner_session, method, path, body,
                                                timeout))
                except _NOT_ON_OWNER_SOCKET:
                    pass
            try:
                status, raw = await _send(self._session, method, path, body, timeout)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                return unavailable(f"cannot talk to the daemon at {self.socket_path}: "
                                   f"{exc or type(exc).__name__}", self.socket_path)
        return _decode(status, raw)


async def _send(session: aiohttp.ClientSession, method: str, path: str, body: Any,
                timeout: aiohttp.ClientTimeout) -> tuple[int, bytes]:
    async with session.request(method, f"http://localhost{path}", json=body, timeout=timeout,
                               headers={"Accept": "application/json"}) as resp:
        return resp.status, await resp.read()


def _decode(status: int, raw: bytes) -> Reply:
    try:
        decoded = json.loads(raw) if raw else None
    except ValueError:
        return Reply(502, {"error": {"code": "bad_gateway", "message":
                                     f"the daemon answered {status} with non-JSON",
                                     "detail": {"hint": "is that socket agent-supervisord's?"}}})
    return Reply(status, decoded)
