"""The console's side of the control socket: every request goes to the daemon over the Unix
socket as the process that runs the console, so SO_PEERCRED names the operator who started it
and the daemon's roles apply unchanged. Bounded: at most `limit` requests in flight."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

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
        self._slots = asyncio.Semaphore(limit)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.UnixConnector(path=self.socket_path, limit=0)
        self._session = aiohttp.ClientSession(connector=connector)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, method: str, path: str, body: Any = None, slow: bool = False
                   ) -> Reply:
        assert self._session is not None, "Upstream.start() first"
        timeout = aiohttp.ClientTimeout(total=SLOW_TIMEOUT if slow else READ_TIMEOUT)
        async with self._slots:
            try:
                async with self._session.request(
                        method, f"http://localhost{path}", json=body, timeout=timeout,
                        headers={"Accept": "application/json"}) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                return unavailable(f"cannot talk to the daemon at {self.socket_path}: "
                                   f"{exc or type(exc).__name__}", self.socket_path)
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            return Reply(502, {"error": {"code": "bad_gateway", "message":
                                         f"the daemon answered {status} with non-JSON",
                                         "detail": {}}})
        return Reply(status, decoded)
