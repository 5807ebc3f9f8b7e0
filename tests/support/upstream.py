"""Real HTTPS upstreams on loopback for the egress gateway's tests and benchmark: a test CA
made with `cryptography`, a server certificate for the test names, and an aiohttp server in a
thread of its own (TlsServer, which the fake vendor APIs share) that records what it was
sent."""

from __future__ import annotations

import asyncio
import base64
import datetime
import gzip
import json
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NAMES = ("api.upstream.test", "pkg.upstream.test", "other.upstream.test", "code.mcp.test")


@dataclass
class TestCA:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path


def make_ca(directory: Path, names: tuple[str, ...] = NAMES) -> TestCA:
    """A CA and a server certificate for `names` (and 127.0.0.1), written as PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent-supervisor test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alt = [x509.DNSName(n) for n in names]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    paths = TestCA(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths.ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key_pem.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    paths.ca_pem.chmod(0o644)
    return paths


@dataclass
class TlsServer:
    """An aiohttp app over TLS (the test CA's server certificate) on 127.0.0.1, in a thread
    and loop of its own: the serving half of Upstream and of the fake vendor APIs
    (tests/support/fake_api.py). A subclass supplies `_handle` and records into `seen`;
    replies still going when it stops end then, not at the interpreter's exit."""

    ca: TestCA
    port: int = field(default=0, kw_only=True)
    seen: list[dict[str, Any]] = field(default_factory=list, kw_only=True)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, kw_only=True, repr=False)
    _thread: threading.Thread | None = field(default=None, kw_only=True, repr=False)
    _runner: web.AppRunner | None = field(default=None, kw_only=True, repr=False)

    NAME: ClassVar[str] = "test upstream"  # for the thread's name and the start-up error
    MAX_BODY: ClassVar[int] = 1 << 20  # aiohttp's client_max_size

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
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True,
                                        name=self.NAME.lower().replace(" ", "-"))
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"the {self.NAME} did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def _serve(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.ca.cert_pem), str(self.ca.key_pem))
        app = web.Application(client_max_size=self.MAX_BODY)
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


@dataclass
class Upstream(TlsServer):
    """An HTTPS server on 127.0.0.1 that answers:
    /v1/chat   JSON with a `usage` block (total_tokens = ?tokens=N, default 100)
    /fail      500
    /slow      waits ?s=N seconds
    /reflect   the request's headers, the way ?as= says: json (body), header (a response
               header), reason (the status line), b64 / b64url / hex / url (the JSON
               encoded so), stream (the JSON one byte per write, or ?chunk=N bytes a write);
               ?pad=N puts N bytes first
               gzip (the JSON compressed, Content-Encoding: gzip)
    /upload    reads the body in chunks, noting each chunk's size in `uploads` as it comes
    /drip      ?n=N chunks of 1 KiB, one per ?every=S seconds (a long streamed reply)
    anything else: 200 with the request's method and path."""

    uploads: list[int] = field(default_factory=list, kw_only=True)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        endpoint = request.path.rsplit("/", 1)[-1]  # routes may add a base path
        if endpoint == "upload":
            return await self._upload(request)
        if endpoint == "drip":
            return await self._drip(request)
        if endpoint == "reflect":
            return await self._reflect(request)
        if endpoint == "events":
            return await self._events(request)
        body = await request.read()
        self.seen.append({"method": request.method, "path": request.path_qs,
                          "headers": dict(request.headers), "body": body.decode(errors="replace")})
        if request.path == "/v1/chat":
            tokens = int(request.query.get("tokens", "100"))
            return web.json_response({"id": "chat-1", "choices": [{"text": "ok"}],
                                      "usage": {"total_tokens": tokens}})
        if request.path == "/fail":
            return web.json_response({"error": "upstream failure"}, status=500)
        if request.path == "/slow":
            await asyncio.sleep(float(request.query.get("s", "5")))
        return web.Response(text=json.dumps({"method": request.method, "path": request.path_qs}),
                            content_type="application/json")

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            self.uploads.append(len(chunk))
        self.seen.append({"method": request.method, "path": request.path_qs,
                          "headers": dict(request.headers), "body": f"<{total} bytes>"})
        return web.json_response({"received": total})

    async def _drip(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(int(request.query.get("n", "600"))):
            await response.write(b"d" * 1024)
            await asyncio.sleep(float(request.query.get("every", "0.1")))
        await response.write_eof()
        return response

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """A model reply as Anthropic streams it: usage in message_start (input) and a
        cumulative one in message_delta (output), written a few bytes at a time so events
        straddle chunks."""
        body = await request.read()
        self.seen.append({"method": request.method, "path": request.path_qs,
                          "headers": dict(request.headers), "body": body.decode(errors="replace")})
        events = [("message_start", {"type": "message_start", "message": {
                      "id": "msg_1", "usage": {"input_tokens": 120, "output_tokens": 1}}}),
                  ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": "ok"}}),
                  ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 30}}),
                  ("message_stop", {"type": "message_stop"})]
        stream = b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                          for name, data in events)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(0, len(stream), 7):
            await response.write(stream[i:i + 7])
        await response.write_eof()
        return response

    async def _reflect(self, request: web.Request) -> web.StreamResponse:
        self.seen.append({"method": request.method, "path": request.path_qs,
                          "headers": dict(request.headers), "body": ""})
        pad = b"x" * int(request.query.get("pad", "0"))
        echo = pad + json.dumps({"headers": dict(request.headers)}).encode()
        how = request.query.get("as", "json")
        encoders = {"b64": base64.b64encode, "b64url": base64.urlsafe_b64encode,
                    "hex": lambda b: b.hex().encode(),
                    "url": lambda b: "".join(f"%{c:02X}" for c in b).encode()}
        if how in encoders:
            return web.Response(body=encoders[how](echo), content_type="text/plain")
        if how == "header":
            auth = request.headers.get("Authorization") or request.headers.get("X-Api-Key", "")
            return web.Response(text="ok", headers={"X-Echo": f"you sent {auth}"})
        if how == "reason":
            auth = request.headers.get("Authorization") or request.headers.get("X-Api-Key", "")
            return web.Response(text="ok", reason=auth[:200])
        if how == "gzip":
            return web.Response(body=gzip.compress(echo), content_type="application/json",
                                headers={"Content-Encoding": "gzip"})
        if how == "stream":  # as server-sent events come: no length, not JSON
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            step = int(request.query.get("chunk", "1"))
            for i in range(0, len(echo), step):
                await response.write(echo[i:i + step])
            await response.write_eof()
            return response
        return web.Response(body=echo, content_type="application/json")

    def headers_seen(self, name: str) -> list[str]:
        return [h[name] for r in self.seen for h in [r["headers"]] if name in h]
