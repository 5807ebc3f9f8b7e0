"""Outbound TLS connections close deterministically: a peer that stops reading mid-stream
(and so never answers the close) leaves no socket behind once the session is closed, on the
real TLS stack over loopback. Without the cleanup this is the ResourceWarning that once
failed CI from the MCP gateway's test teardown. No privilege."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import aiohttp

from supervisor.httpclient import TLS_CLOSE_NEEDS_CLEANUP, tcp_connector
from tests.support.upstream import make_ca


def _stalling_tls_server(tmp_path: Path) -> tuple[int, ssl.SSLContext, threading.Event]:
    """One connection: answers a request with the head of an endless event stream, then
    neither reads nor writes until released."""
    ca = make_ca(tmp_path, ("upstream.test",))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(ca.cert_pem, ca.key_pem)
    listener = socket.create_server(("127.0.0.1", 0))
    release = threading.Event()

    def serve() -> None:
        with listener, contextlib.suppress(OSError):  # the client's failures are its own
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(65536)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                release.wait(30)

    threading.Thread(target=serve, daemon=True).start()
    client_ctx = ssl.create_default_context(cafile=str(ca.ca_pem))
    return listener.getsockname()[1], client_ctx, release


def _leaks_after_half_closed_stream(tmp_path: Path,
                                    connector: Callable[..., aiohttp.TCPConnector]) -> list[str]:
    """The ResourceWarnings left once a session released a stream its peer stalls on."""
    port, client_ctx, release = _stalling_tls_server(tmp_path)

    async def read_a_little() -> None:
        async with aiohttp.ClientSession(connector=connector(ssl=client_ctx)) as session, \
                session.get(f"https://127.0.0.1:{port}/events",
                            server_hostname="upstream.test") as reply:
            assert await reply.content.readany() == b"hello"
            # Released mid-stream: the connection is closed; the peer never answers.

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(read_a_little())
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
        release.set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_half_closed_tls_stream_leaves_no_socket(tmp_path: Path) -> None:
    assert _leaks_after_half_closed_stream(tmp_path, tcp_connector) == []


def test_the_plain_connector_leaks_where_the_cleanup_is_needed(tmp_path: Path) -> None:
    """The control: the same exchange with aiohttp's default connector leaks the socket on
    this interpreter, so the test above can fail."""
    leaked = _leaks_after_half_closed_stream(tmp_path, aiohttp.TCPConnector)
    assert bool(leaked) == TLS_CLOSE_NEEDS_CLEANUP
    assert not leaked or any("unclosed" in message for message in leaked)
