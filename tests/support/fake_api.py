"""What every fake vendor API shares (tests/support/anthropic_fake.py, openai_fake.py): the
serving half of tests/support/upstream.py (TlsServer: an aiohttp app over TLS with the test
CA on loopback, in a thread and loop of its own), a script of steps and the session's final
text; each fake supplies `_handle` and its wire format."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.support.upstream import TlsServer


@dataclass
class FakeVendorAPI(TlsServer):
    script: Any
    final_text: str = "All tests pass."

    NAME = "fake vendor API"
    MAX_BODY = 64 << 20

    async def _record(self, request: web.Request) -> tuple[dict[str, Any], list[str]]:
        """The request's JSON body ({} when empty or not JSON) and the names of the tools it
        offers, recorded in `seen` with its method, path, headers (lower-cased) and raw text."""
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            body = {}
        tools = sorted(str(t.get("name", "")) for t in body.get("tools") or []
                       if isinstance(t, dict))
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.seen.append({"method": request.method, "path": request.path_qs,
                          "headers": headers, "tools": tools,
                          "raw": raw.decode(errors="replace")})
        return body, tools
