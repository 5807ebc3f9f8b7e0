"""A webhook receiver for tests: a real aiohttp server on 127.0.0.1 that records every POST,
answers 503 to the first `fail_first` of them and 200 after, and checks each signature with its
own HMAC computation (not supervisor.events.sign). No privilege."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Received:
    event_id: str
    event_type: str
    timestamp: str
    body: bytes
    status: int  # what the receiver answered
    signature_ok: bool
    content_type: str

    @property
    def payload(self) -> Any:
        return json.loads(self.body)


def signature_ok(secret: bytes, timestamp: str, body: bytes, header: str) -> bool:
    expected = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(f"sha256={expected}", header)


@dataclass
class Receiver:
    secret: bytes
    fail_first: int = 0
    port: int = 0
    received: list[Received] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if self.port == 0:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        timestamp = request.headers.get("X-Agent-Supervisor-Timestamp", "")
        status = 503 if len(self.received) < self.fail_first else 200
        self.received.append(Received(
            event_id=request.headers.get("X-Agent-Supervisor-Id", ""),
            event_type=request.headers.get("X-Agent-Supervisor-Event", ""),
            timestamp=timestamp, body=body, status=status,
            signature_ok=signature_ok(self.secret, timestamp, body,
                                      request.headers.get("X-Agent-Supervisor-Signature", "")),
            content_type=request.headers.get("Content-Type", ""),
        ))
        if status != 200:
            return web.Response(status=status, text="receiver is warming up")
        return web.Response(status=200, text="ok")

    def accepted(self) -> list[Received]:
        return [r for r in list(self.received) if r.status == 200]


class ThreadedReceiver:
    """The Receiver in a thread of its own, for tests whose sender is another process. Stopping
    closes the port (connections are refused); starting again binds the same port."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="webhook-receiver",
                                        daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.receiver.start(), loop).result(10)

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.receiver.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = self._thread = None


def outbox_rows(db_path: Path) -> list[dict[str, Any]]:
    """Every row of the daemon's webhook outbox, in insertion order (read-only)."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM webhook_outbox ORDER BY id")]
    finally:
        db.close()


def check_deliveries(rows: list[dict[str, Any]], received: list[Received]) -> None:
    """The receiver's side of the guarantees, for one endpoint: every outbox event arrived with
    2xx exactly once by id (nothing else did), each signed validly, and no event of an agent was
    even attempted before all earlier events of that agent had been acknowledged."""
    assert all(r.signature_ok for r in received), [r for r in received if not r.signature_ok]
    assert all(r.content_type == "application/json" for r in received)
    accepted = [r.event_id for r in received if r.status == 200]
    assert len(accepted) == len(set(accepted)), "an event was acknowledged twice"
    assert set(accepted) == {row["event_id"] for row in rows}
    for r in received:
        assert r.payload["id"] == r.event_id and r.payload["type"] == r.event_type
    seq_of = {row["event_id"]: row["audit_seq"] for row in rows}
    agent_of = {row["event_id"]: row["agent"] for row in rows}
    acknowledged: set[str] = set()
    for r in received:
        earlier = {e for e, seq in seq_of.items()
                   if agent_of[e] == agent_of[r.event_id] and seq < seq_of[r.event_id]}
        missing = earlier - acknowledged
        assert not missing, f"{r.event_type} {r.event_id} sent before {missing} was delivered"
        if r.status == 200:
            acknowledged.add(r.event_id)
