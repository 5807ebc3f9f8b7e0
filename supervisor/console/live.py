"""What the console's pages see change: one poller reads agents, approvals and the audit tail
from the daemon and fans the changes out to the browsers' server-sent-event streams. Bounded:
a capped number of streams, each with a capped queue (a stream that falls behind is closed and
its browser reconnects to a fresh snapshot), and a capped audit tail. No privilege."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from supervisor.console.upstream import Reply, Upstream
from supervisor.errors import SupervisorError

if TYPE_CHECKING:
    from supervisor.console.fleet_view import FleetView

AUDIT_KEEP = 200
AUDIT_PAGE = 1000
# Catching up on a long audit log takes a few pages per tick, so one tick stays short.
AUDIT_PAGES_PER_TICK = 20
AGENT_PAGES_MAX = 50
# The fleet store is read less often than the local daemon: every FLEET_EVERY polls.
FLEET_EVERY = 5


class Stream:
    """One browser's event stream: a bounded queue of (event, json) pairs; None means the
    stream fell behind and must be closed so the browser starts over from a snapshot."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(size)

    def offer(self, item: tuple[str, str]) -> bool:
        try:
            self.queue.put_nowait(item)
            return True
        except asyncio.QueueFull:
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)
            return False


class Live:
    def __init__(self, upstream: Upstream, period: float = 1.0, max_streams: int = 8,
                 queue_size: int = 64, fleet: FleetView | None = None) -> None:
        self.upstream = upstream
        self.fleet_view = fleet
        self.fleet: dict[str, Any] = {"hosts": [], "holds": [], "error": None}
        self.period = period
        self.max_streams = max_streams
        self.queue_size = queue_size
        self.streams: set[Stream] = set()
        self.agents: dict[str, Any] = {"agents": [], "error": None}
        self.approvals: dict[str, Any] = {"approvals": [], "error": None}
        self.audit: deque[dict[str, Any]] = deque(maxlen=AUDIT_KEEP)
        self.audit_error: dict[str, Any] | None = None
        self.health: dict[str, Any] = {}
        self._audit_seq = 0
        self._cpu: dict[str, tuple[int, float]] = {}
        self._last_sent: dict[str, str] = {}
        self._poke = asyncio.Event()
        self._wanted = asyncio.Event()
        self.polls = 0

    def subscribe(self) -> Stream | None:
        if len(self.streams) >= self.max_streams:
            return None
        stream = Stream(self.queue_size)
        for event, data in self.snapshot():
            stream.offer((event, data))
        self.streams.add(stream)
        self._wanted.set()
        self.poke()
        return stream

    def unsubscribe(self, stream: Stream) -> None:
        self.streams.discard(stream)
        if not self.streams:
            self._wanted.clear()

    def close(self) -> None:
        """End every stream (the server is stopping): each handler sees None and returns."""
        for stream in list(self.streams):
            while not stream.queue.empty():
                stream.queue.get_nowait()
            stream.queue.put_nowait(None)
        self.streams.clear()

    def poke(self) -> None:
        """Poll now rather than at the next tick (after an action, so its effect shows)."""
        self._poke.set()

    def snapshot(self) -> list[tuple[str, str]]:
        snapshot = [("health", json.dumps(self.health)), ("agents", json.dumps(self.agents)),
                    ("approvals", json.dumps(self.approvals)),
                    ("audit", json.dumps({"entries": list(self.audit), "reset": True,
                                          "error": self.audit_error}))]
        if self.fleet_view is not None:
            snapshot.append(("fleet", json.dumps(self.fleet)))
        return snapshot

    def _publish(self, event: str, payload: dict[str, Any], dedupe: bool = True) -> None:
        data = json.dumps(payload)
        if dedupe:
            if self._last_sent.get(event) == data:
                return
            self._last_sent[event] = data
        for stream in list(self.streams):
            if not stream.offer((event, data)):
                self.streams.discard(stream)

    async def run(self) -> None:
        while True:
            await self._wanted.wait()
            self._poke.clear()
            await self.poll_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.period)

    async def poll_once(self) -> None:
        health, agents, approvals = await asyncio.gather(
            self.upstream.call("GET", "/v1/health"), self._read_agents(),
            self.upstream.call("GET", "/v1/approvals"))
        self.health = health.body if health.ok else {"error": _error_of(health)}
        self._publish("health", self.health)
        self.agents = agents
        self._publish("agents", agents)
        self.approvals = ({"approvals": approvals.body.get("approvals", []), "error": None}
                          if approvals.ok else {"approvals": [], "error": _error_of(approvals)})
        self._publish("approvals", self.approvals)
        await self._read_audit()
        if self.fleet_view is not None and self.polls % FLEET_EVERY == 0:
            await self._read_fleet(self.fleet_view)
        self.polls += 1

    async def _read_fleet(self, view: FleetView) -> None:
        try:
            self.fleet = await asyncio.to_thread(view.read)
        except SupervisorError as exc:
            self.fleet = {"hosts": [], "holds": [], "error": exc.to_body()["error"]}
        except OSError as exc:
            self.fleet = {"hosts": [], "holds": [], "error": {
                "code": "fleet_unavailable", "message": f"cannot read the fleet store: {exc}",
                "detail": {"hint": "check AGENT_SUPERVISOR_FLEET_* (docs/fleet.md)"}}}
        self._publish("fleet", self.fleet)

    async def _read_agents(self) -> dict[str, Any]:
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(AGENT_PAGES_MAX):
            path = "/v1/agents" + (f"?cursor={_quote(cursor)}" if cursor else "")
            reply = await self.upstream.call("GET", path)
            if not reply.ok:
                return {"agents": [], "error": _error_of(reply)}
            found.extend(reply.body.get("agents", []))
            cursor = reply.body.get("next_cursor")
            if not cursor:
                break
        now = time.monotonic()
        seen: dict[str, tuple[int, float]] = {}
        for agent in found:
            agent["cpu_percent"] = None
            stats = agent.get("stats") or {}
            run = agent.get("run") or {}
            usec = stats.get("cpu_usec")
            if run.get("id") and isinstance(usec, int):
                key = run["id"]
                before = self._cpu.get(key)
                if before is not None and now > before[1] and usec >= before[0]:
                    agent["cpu_percent"] = round(
                        (usec - before[0]) / ((now - before[1]) * 1e6) * 100, 1)
                seen[key] = (usec, now)
        self._cpu = seen
        return {"agents": found, "error": None}

    async def _read_audit(self) -> None:
        fresh: list[dict[str, Any]] = []
        for _ in range(AUDIT_PAGES_PER_TICK):
            reply = await self.upstream.call(
                "GET", f"/v1/audit?limit={AUDIT_PAGE}&after={self._audit_seq}")
            if not reply.ok:
                error = _error_of(reply)
                if error != self.audit_error:
                    self.audit_error = error
                    self._publish("audit", {"entries": [], "reset": False, "error": error},
                                  dedupe=False)
                return
            entries = reply.body.get("entries", [])
            if not entries:
                break
            self._audit_seq = max(e["seq"] for e in entries)
            fresh.extend(entries[-AUDIT_KEEP:])
            del fresh[:-AUDIT_KEEP]
            if len(entries) < AUDIT_PAGE:
                break
        if self.audit_error is not None:
            self.audit_error = None
            self._publish("audit", {"entries": [], "reset": False, "error": None},
                          dedupe=False)
        if fresh:
            self.audit.extend(fresh)
            self._publish("audit", {"entries": fresh, "reset": False, "error": None},
                          dedupe=False)


def _error_of(reply: Reply) -> dict[str, Any]:
    body = reply.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"]  # type: ignore[no-any-return]
    return {"code": "bad_gateway", "message": f"the daemon answered {reply.status}",
            "detail": {}}


def _quote(part: str) -> str:
    from urllib.parse import quote

    return quote(part, safe="")
