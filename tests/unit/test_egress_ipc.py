"""The daemon ↔ gateway worker channel (supervisor/egress/ipc.py): frames round-trip, split and
coalesced reads decode the same, and what must not be acted on is refused: an oversized frame
(judged on its header, before its body arrives), bytes that are not JSON, JSON that is not an
object with an op; a peer that stops reading is seen, never waited for. No privilege."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from supervisor.egress import ipc


def test_frames_round_trip_whole_split_and_coalesced() -> None:
    messages = [{"op": "open", "grant": {"secrets": {"llm": "sk-" + "x" * 5000}}},
                {"op": "revoke", "run": "r1"}, {"op": "ping", "id": 3, "text": "é ✓"}]
    stream = b"".join(ipc.encode(m, ipc.TO_WORKER_LIMIT) for m in messages)
    assert ipc.FrameBuffer(ipc.TO_WORKER_LIMIT).feed(stream) == messages
    byte_by_byte = ipc.FrameBuffer(ipc.TO_WORKER_LIMIT)
    decoded: list[dict[str, Any]] = []
    for i in range(len(stream)):
        decoded += byte_by_byte.feed(stream[i:i + 1])
    assert decoded == messages and byte_by_byte.pending == 0


def test_an_oversized_frame_is_refused_on_its_header_alone() -> None:
    frames = ipc.FrameBuffer(1024)
    with pytest.raises(ipc.FrameTooLarge) as caught:
        frames.feed(ipc.HEADER.pack(1025))  # no body sent: nothing of it is waited for
    assert caught.value.code == "frame_too_large"
    huge = ipc.HEADER.pack(2**32 - 1) + b"{"
    with pytest.raises(ipc.FrameTooLarge):
        ipc.FrameBuffer(ipc.TO_DAEMON_LIMIT).feed(huge)


def test_the_sender_refuses_to_make_a_frame_the_peer_would_refuse() -> None:
    with pytest.raises(ipc.FrameTooLarge):
        ipc.encode({"op": "open", "blob": "x" * 2048}, 1024)
    exact = ipc.encode({"op": "a"}, 1024)
    assert ipc.FrameBuffer(len(exact) - ipc.HEADER.size).feed(exact) == [{"op": "a"}]
    with pytest.raises(ipc.FrameTooLarge):
        ipc.FrameBuffer(len(exact) - ipc.HEADER.size - 1).feed(exact)


def test_good_frames_before_a_bad_one_in_the_same_read_come_first_then_the_error() -> None:
    frames = ipc.FrameBuffer(64)
    data = ipc.encode({"op": "a"}, 64) + ipc.HEADER.pack(3) + b"{x}" + ipc.encode({"op": "b"}, 64)
    assert frames.feed(data) == [{"op": "a"}]
    assert frames.failed
    with pytest.raises(ipc.MalformedFrame):
        frames.feed(ipc.encode({"op": "c"}, 64))


@pytest.mark.parametrize("payload", [
    b"\xff\xfe not utf-8", b"{not json", b"[1, 2, 3]", b'"op"', b"{}", b'{"op": 7}',
    b'{"op": null}', b"NaN", b"",
])
def test_malformed_frames_are_refused(payload: bytes) -> None:
    with pytest.raises(ipc.MalformedFrame) as caught:
        ipc.FrameBuffer(1024).feed(ipc.HEADER.pack(len(payload)) + payload)
    assert caught.value.code == "frame_malformed"


def test_messages_without_an_op_or_with_non_finite_numbers_are_not_sent() -> None:
    with pytest.raises(ipc.MalformedFrame):
        ipc.encode({"run": "r1"}, 1024)
    with pytest.raises(ValueError):
        ipc.encode({"op": "usage", "spend": float("nan")}, 1024)


def test_a_frame_after_a_bad_one_is_never_delivered() -> None:
    """The stream cannot be resynchronised: the protocol reports the loss once and stops."""
    async def scenario() -> tuple[list[dict[str, Any]], list[str]]:
        received: list[dict[str, Any]] = []
        lost: list[str] = []
        protocol = ipc.FrameProtocol(64, 1024, received.append, lost.append)
        ours, theirs = socket.socketpair()
        loop = asyncio.get_running_loop()
        await loop.create_unix_connection(lambda: protocol, sock=ours)
        theirs.sendall(ipc.encode({"op": "first"}, 64) + ipc.HEADER.pack(65) + b"x" * 65
                       + ipc.encode({"op": "after"}, 64))
        for _ in range(100):
            if lost:
                break
            await asyncio.sleep(0.01)
        theirs.close()
        await asyncio.sleep(0.01)
        return received, lost

    received, lost = asyncio.run(scenario())
    assert received == [{"op": "first"}]
    assert len(lost) == 1 and lost[0].startswith("frame_too_large")


def test_a_peer_that_stops_reading_is_seen_not_waited_for() -> None:
    async def scenario() -> tuple[int, bool]:
        protocol = ipc.FrameProtocol(1024, 256 * 1024, lambda m: None, lambda r: None)
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        loop = asyncio.get_running_loop()
        await loop.create_unix_connection(lambda: protocol, sock=ours)
        frame = ipc.encode({"op": "revoke", "run": "r" * 1000}, 4096)
        sent = 0
        while protocol.send(frame):  # never blocks; the bound ends it
            sent += 1
            assert sent < 10_000
        refused_while_open = protocol.open
        theirs.close()
        return sent, refused_while_open

    sent, still_open = asyncio.run(scenario())
    assert sent > 0 and still_open
