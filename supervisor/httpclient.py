"""Outbound HTTP connections that close deterministically (the gateway's upstreams, webhooks),
and bodies read up to a cap (the egress and MCP gateways).

CPython before 3.12.8 never finishes closing a TLS transport whose peer does not answer the
close (python/cpython#118960): its socket stays open until the garbage collector finds it, in
a daemon that runs for months, or is dropped with the loop at shutdown. aiohttp's
`enable_cleanup_closed` aborts such transports after two seconds and at the connector's close;
on interpreters with the fix aiohttp refuses the option, so it is set only where it is needed.
No privilege."""

from __future__ import annotations

import sys
from typing import Any

import aiohttp

TLS_CLOSE_NEEDS_CLEANUP = sys.version_info < (3, 12, 8) or (3, 13, 0) <= sys.version_info < (
    3, 13, 1)


def tcp_connector(**options: Any) -> aiohttp.TCPConnector:
    """An `aiohttp.TCPConnector` with `options`, aborting TLS connections a peer leaves half
    closed."""
    return aiohttp.TCPConnector(enable_cleanup_closed=TLS_CLOSE_NEEDS_CLEANUP, **options)


async def read_capped(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The whole body, or its first `limit` + 1 bytes when it is longer (then refused)."""
    chunks, size = [], 0
    async for chunk in content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(chunks)
