"""The model calls one run made through the gateway's credential routes, one entry each (when,
method, route, path, status, bytes, tokens, duration), for the CI report. Bounded per run
whatever the agent sends: at most MAX_CALLS entries (the rest counted), paths clipped, and the
usage scan of a streamed reply keeps at most one line of MAX_LINE bytes. Pure state; no I/O, no
privilege."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from supervisor.egress.accounting import clip

MAX_CALLS = 200
MAX_LINE = 64 * 1024  # a server-sent event line longer than this is not read for usage
_TOKEN_KEYS = ("input_tokens", "output_tokens", "prompt_tokens", "completion_tokens",
               "total_tokens")


@dataclass
class CallLog:
    """A run's calls in the order they ended. The query string is never kept (it can carry
    what an agent was told to put there); the path is clipped like every agent-chosen string."""

    cap: int = MAX_CALLS
    entries: list[dict[str, Any]] = field(default_factory=list)
    unrecorded: int = 0

    def record(self, *, started: float, method: str, route: str, path: str,
               status: int | None, request_bytes: int, reply_bytes: int,
               tokens: int | None, duration_ms: float, error: str | None = None) -> None:
        if len(self.entries) >= self.cap:
            self.unrecorded += 1
            return
        entry: dict[str, Any] = {
            "ts": round(started, 3), "method": method[:16], "route": clip(route, 64),
            "path": clip(urlsplit(path).path), "status": status,
            "request_bytes": request_bytes, "reply_bytes": reply_bytes, "tokens": tokens,
            "duration_ms": round(duration_ms, 1)}
        if error is not None:
            entry["error"] = error
        self.entries.append(entry)

    def as_dict(self) -> dict[str, Any]:
        return {"calls": list(self.entries), "unrecorded": self.unrecorded}


def usage_tokens(usage: dict[str, Any]) -> int | None:
    """Tokens in one `usage` object: its total if given, else input + output (Anthropic's and
    OpenAI's names both)."""
    def number(key: str) -> int | None:
        value = usage.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    total = number("total_tokens")
    if total is not None:
        return total
    parts = [number(k) for k in ("input_tokens", "output_tokens", "prompt_tokens",
                                 "completion_tokens")]
    counted = [p for p in parts if p is not None]
    return sum(counted) if counted else None


class StreamUsage:
    """The usage a server-sent event stream reports, read as its chunks pass: Anthropic sends
    `usage` in message_start and a cumulative one in message_delta, OpenAI's Responses API in
    response.completed (under `response`), Chat Completions in its last chunk. For each token
    field the last value seen is kept, so cumulative counts are not added twice."""

    def __init__(self) -> None:
        self._line = bytearray()
        self._skipping = False  # inside a line already longer than MAX_LINE
        self.seen: dict[str, int] = {}

    def feed(self, chunk: bytes) -> None:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                self._keep(chunk[start:])
                return
            self._keep(chunk[start:end])
            if not self._skipping:
                self._read(bytes(self._line))
            self._line.clear()
            self._skipping = False
            start = end + 1

    def _keep(self, part: bytes) -> None:
        if self._skipping:
            return
        if len(self._line) + len(part) > MAX_LINE:
            self._line.clear()
            self._skipping = True
            return
        self._line += part

    def _read(self, line: bytes) -> None:
        if not line.startswith(b"data:") or b'"usage"' not in line:
            return
        try:
            event = json.loads(line[5:])
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        for holder in (event, event.get("message"), event.get("response")):
            usage = holder.get("usage") if isinstance(holder, dict) else None
            if isinstance(usage, dict):
                for key in _TOKEN_KEYS:
                    value = usage.get(key)
                    if isinstance(value, int) and not isinstance(value, bool):
                        self.seen[key] = value

    def tokens(self) -> int | None:
        return usage_tokens(self.seen) if self.seen else None


@dataclass
class CallMeter:
    """What one call carried, filled in as its bodies pass through the gateway."""

    started: float = field(default_factory=time.time)
    clock: float = field(default_factory=time.monotonic)
    request_bytes: int = 0
    reply_bytes: int = 0
    tokens: int | None = None
    stream: StreamUsage | None = None

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.clock) * 1000
