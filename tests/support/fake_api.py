"""The serving half every fake vendor API shares (tests/support/anthropic_fake.py,
openai_fake.py): an aiohttp app over TLS with the test CA on loopback, in a thread and loop of
its own, recording nothing itself; each fake supplies `_handle` and its wire format."""

from __future__ import annotations

import asyncio
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web

from tests.support.upstream import TestCA


@dataclass
class FakeVendorAPI:
    ca: TestCA
    script: Any
    final_text: str = "All tests pass."
    port: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None

    NAME = "vendor"  # which API, for the thread's name and the start-up error

    def start(self) -> Self:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self._serve())
            ready.set()
            loop.run_forever()
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"fake-{self.NAME.lower()}-api",
                                        daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"the fake {self.NAME} API did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def _serve(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.ca.cert_pem), str(self.ca.key_pem))
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=context)
        await site.start()
        server = site._server
        assert server is not None and hasattr(server, "sockets")
        self.port = server.sockets[0].getsockname()[1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError
