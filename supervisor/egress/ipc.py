"""The channel between the daemon and the gateway worker: length-prefixed JSON frames over a
Unix socketpair, bounded both ways. No I/O of its own beyond the transport it is given; no
privilege.

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON holding one object
with a string `op`. A frame that announces more than the reader's limit, or that is not such
an object, is refused before anything of it is acted on; the stream cannot be resynchronised
after that, so the peer treats the channel (and the worker behind it) as broken. Writes never
block: a peer that stops reading is seen when the transport's buffer passes its bound."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct(">I")
# Daemon → worker carries grants (policy and secrets, each secret ≤ 16 KiB); worker → daemon
# carries events whose details the worker truncates. Both far above what either sends.
TO_WORKER_LIMIT = 4 * 1024 * 1024
TO_DAEMON_LIMIT = 1024 * 1024
# Bytes a side may have queued for its peer before the peer counts as not reading.
WRITE_BUFFER_LIMIT = 8 * 1024 * 1024

Message = dict[str, Any]


class FrameError(Exception):
    """A frame that must not be acted on; `code` is stable for logs and the audit row."""

    code = "frame_invalid"


class FrameTooLarge(FrameError):
    code = "frame_too_large"


class MalformedFrame(FrameError):
    code = "frame_malformed"


def encode(message: Message, limit: int) -> bytes:
    """One frame; FrameTooLarge when it would exceed what the peer accepts."""
    if not isinstance(message.get("op"), str):
        raise MalformedFrame("a message needs a string 'op'")
    payload = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    if len(payload) > limit:
        raise FrameTooLarge(f"a {message['op']!r} message of {len(payload)} bytes is over "
                            f"the channel's limit of {limit}")
    return HEADER.pack(len(payload)) + payload


def decode(payload: bytes) -> Message:
    try:
        message = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedFrame(f"not JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise MalformedFrame("a frame must hold a JSON object with a string 'op'")
    return message


class FrameBuffer:
    """Incremental decoder: bytes in, whole messages out. Holds at most one frame's worth."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._error: FrameError | None = None

    def feed(self, data: bytes) -> list[Message]:
        """The whole messages `data` completes. The first bad frame raises; whole messages
        before it in the same read are returned first, and the error comes with the next
        call (after a bad frame nothing more is ever decoded)."""
        if self._error is not None:
            raise self._error
        self._buffer += data
        messages: list[Message] = []
        try:
            while len(self._buffer) >= HEADER.size:
                (length,) = HEADER.unpack_from(self._buffer)
                if length > self.limit:
                    # Judged on the header alone: nothing of an oversized frame is buffered.
                    raise FrameTooLarge(f"a frame announces {length} bytes; the limit is "
                                        f"{self.limit}")
                if len(self._buffer) < HEADER.size + length:
                    break
                payload = bytes(self._buffer[HEADER.size:HEADER.size + length])
                del self._buffer[:HEADER.size + length]
                messages.append(decode(payload))
        except FrameError as exc:
            self._error = exc
            self._buffer.clear()
            if not messages:
                raise
        return messages

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def pending(self) -> int:
        return len(self._buffer)


class FrameProtocol(asyncio.Protocol):
    """Either end of the channel on an asyncio transport. Messages go to `on_message` in the
    loop's thread; the first framing error or the end of the stream goes to `on_lost` once."""

    def __init__(self, read_limit: int, write_limit: int,
                 on_message: Callable[[Message], None],
                 on_lost: Callable[[str], None]) -> None:
        self.frames = FrameBuffer(read_limit)
        self.write_limit = write_limit
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._lost:
            return
        try:
            messages = self.frames.feed(data)
        except FrameError as exc:
            self._fail(f"{exc.code}: {exc}")
            return
        for message in messages:
            if not self.open:  # an earlier message's handler closed the channel
                return
            self.on_message(message)
        if self.frames.failed:
            try:
                self.frames.feed(b"")
            except FrameError as exc:
                self._fail(f"{exc.code}: {exc}")

    def eof_received(self) -> bool:
        self._fail("the peer closed the channel")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"the channel broke: {exc}" if exc else "the channel closed")

    def _fail(self, reason: str) -> None:
        if self._lost:
            return
        self._lost = True
        if self.transport is not None:
            self.transport.abort()
        self.on_lost(reason)

    @property
    def open(self) -> bool:
        return not self._lost and self.transport is not None

    def send(self, frame: bytes) -> bool:
        """Queue one encoded frame; False (nothing queued) when the channel is closed or the
        peer has left more than `write_limit` bytes unread."""
        if not self.open:
            return False
        assert self.transport is not None
        if self.transport.get_write_buffer_size() + len(frame) > self.write_limit:
            return False
        self.transport.write(frame)
        return True
