"""The gateway's end of a stdio MCP server: the server's stdin and stdout are one end of a Unix
socketpair (the daemon started the server in its sandbox with the other end, and passed this
one to the gateway worker), carrying newline-delimited JSON-RPC as the official SDK's stdio
transport frames it. Runs in the gateway's loop (the gateway worker process, unprivileged).

The agent still speaks streamable HTTP to `http://mcp.gateway/<server>`: each POST's messages,
judged already (supervisor/mcp/gateway.py), are written to the server one per line; requests
get ids of the bridge's own (so no agent, and no two requests, can mix up whose answer is
whose), and the POST is answered with the server's responses as JSON once all have come. What
the server sends on its own is not passed on: its requests to the client (sampling,
elicitation, roots) are answered at once with "method not found", its notifications dropped.

Bounded: one line from the server (`max_line`; longer and the server is cut off), the
requests waiting for an answer (`max_pending`; more are refused, retryable), and the bytes
queued for the server's stdin (a server that stops reading makes callers wait, and a caller
that hangs up or is cut by a kill takes its request with it: `notifications/cancelled` goes
to the server).

A restart (supervisor/daemon/handover.py) replaces the gateway worker, not the server: `hand_over`
answers each request still waiting with a JSON-RPC error the agent can retry on
(`supervisor_restarting`), never with what the server answers to the cancellation, tells the
server they are cancelled, refuses every later call the same way without writing it to the
server (a POST judged before the restart began may reach the bridge only now), and lets go
of the socket
without closing the server's stdin (the daemon holds another copy for the next worker). The
next worker's bridge numbers its requests on from `next_id`, so an answer the server sends late
to a cancelled request names an id nobody waits for and is dropped."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_PENDING = 64  # requests of one server waiting for their answer
_WRITE_HIGH_WATER = 4 * 1024 * 1024
_HANDOVER_DRAIN = 2.0  # seconds a handover waits for the cancellations to reach the server
RESTARTING = "supervisor_restarting"  # the reason an in-flight call fails with at a restart


class StdioUnavailable(Exception):
    """The server cannot take the call: it has exited, broke its framing, or is busy."""

    def __init__(self, reason: str, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.reason, self.message, self.retryable = reason, message, retryable


class StdioBridge:
    def __init__(self, name: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, start_id: int = 1) -> None:
        self.name = name
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.ids = itertools.count(start_id)
        self.next_id = start_id  # the first id not yet given to a request
        self.closed: str | None = None  # why, once the server can no longer be reached
        self.handing_over = False  # `hand_over` began: every call is a restart's from then
        self.dropped = 0  # what the server sent that nobody asked for
        self._reading: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, name: str, sock: socket.socket, max_line: int,
                   start_id: int = 1) -> StdioBridge:
        reader, writer = await asyncio.open_connection(sock=sock, limit=max_line)
        writer.transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        bridge = cls(name, reader, writer, start_id)
        bridge._reading = asyncio.get_running_loop().create_task(bridge._read())
        return bridge

    async def exchange(self, messages: list[dict[str, Any]],
                       before_write: Callable[[], None] | None = None
                       ) -> list[dict[str, Any]]:
        """Send the messages of one POST; the responses to its requests (in order), with the
        agent's ids back in them. Cancelled (the agent hung up, the run was cut): the
        server is told its requests are cancelled. `before_write` is called once the call is
        taken, right before it is written (the gateway charges the run's budgets there): not
        when it is refused (restarting, busy, stopped)."""
        if self.handing_over:
            # A POST judged before the restart began (its body still coming, or held for an
            # approval) gets here while the handover drains or after it: written to the
            # server now, its answer would reach nobody.
            raise self._restarting("the supervisor is restarting; call again in a moment: "
                                   "the server is still running")
        if self.closed is not None:
            raise StdioUnavailable("upstream_unreachable",
                                   f"MCP server {self.name} is not running: {self.closed}")
        requests = [m for m in messages if "method" in m and "id" in m]
        if len(self.pending) + len(requests) > MAX_PENDING:
            raise StdioUnavailable("server_busy", f"MCP server {self.name} has "
                                   f"{len(self.pending)} calls waiting; at most {MAX_PENDING}",
                                   retryable=True)
        if before_write is not None:
            before_write()
        loop = asyncio.get_running_loop()
        waiting: list[tuple[Any, int, asyncio.Future[dict[str, Any]]]] = []
        lines = []
        for message in messages:
            if "method" not in message:
                continue  # an answer to a server request the bridge never passed on
            if "id" in message:
                ident = next(self.ids)
                self.next_id = ident + 1
                future: asyncio.Future[dict[str, Any]] = loop.create_future()
                self.pending[ident] = future
                waiting.append((message["id"], ident, future))
                message = {**message, "id": ident}
            elif message["method"] == "notifications/cancelled":
                # It names the agent's id, not the server's: the server's request is
                # cancelled when the POST that carried it ends (below).
                continue
            lines.append(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        try:
            self.writer.write(b"".join(lines))
            await self.writer.drain()
            answers = []
            for agent_id, _ident, future in waiting:
                answer = await future
                answers.append({**answer, "id": agent_id})
            return answers
        except asyncio.CancelledError:
            # (the future awaited when the task was cancelled is cancelled with it)
            self._cancel([ident for _, ident, future in waiting
                          if future.cancelled() or not future.done()])
            raise
        except (ConnectionError, OSError) as exc:
            self._close(f"{type(exc).__name__}: {exc}")
            raise StdioUnavailable("upstream_unreachable", f"MCP server {self.name}: "
                                   f"{type(exc).__name__}") from None
        finally:
            for _, ident, future in waiting:
                self.pending.pop(ident, None)
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved: the first failure is what was raised

    def _cancel(self, idents: list[int]) -> None:
        if self.closed is not None or not idents:
            return
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            self.writer.write(b"".join(json.dumps(
                {"jsonrpc": "2.0", "method": "notifications/cancelled",
                 "params": {"requestId": ident, "reason": "the agent's request ended"}},
                separators=(",", ":")).encode() + b"\n" for ident in idents))

    async def _read(self) -> None:
        reason = "it closed its stdout (exited)"
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    break
                self._received(line)
        except (ValueError, asyncio.LimitOverrunError):
            reason = "it sent a line longer than the gateway reads"
        except (ConnectionError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        self._close(reason)

    def _received(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            self.dropped += 1  # a stray line (a server's print): not JSON-RPC, not an answer
            return
        if not isinstance(message, dict):
            self.dropped += 1
            return
        ident = message.get("id")
        if "method" in message:
            if ident is not None:  # a request of the server's: nobody here can answer it
                with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                    self.writer.write(json.dumps(
                        {"jsonrpc": "2.0", "id": ident, "error": {
                            "code": -32601, "message": "the supervisor's gateway does not "
                            "pass server requests on"}}, separators=(",", ":")).encode() + b"\n")
            self.dropped += 1
            return
        future = self.pending.get(ident) if isinstance(ident, int) else None
        if future is None or future.done() or ("result" in message) == ("error" in message):
            self.dropped += 1
            return
        future.set_result(message)

    def _close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
            log.info("MCP stdio server %s: %s", self.name, reason)
        for future in self.pending.values():
            if not future.done():
                future.set_exception(StdioUnavailable(
                    "upstream_unreachable", f"MCP server {self.name} stopped: {reason}"))
        self.writer.transport.abort()

    async def hand_over(self) -> None:
        """A restart: every request still waiting is cancelled at the server and failed with
        `supervisor_restarting` (its POST answers the agent with that JSON-RPC error; the
        server's own answer to the cancellation is dropped); then this bridge lets go of the
        socket. The server keeps running: its stdin stays
        open through the daemon's copy of this end, for the next worker's bridge."""
        self.handing_over = True  # no call is written to the server from here (`exchange`)
        waiting = [ident for ident, future in self.pending.items() if not future.done()]
        self._cancel(waiting)
        # Failed before anything is awaited: the server answers a cancellation (the SDK's
        # server with the error "Request cancelled"), and an answer read while the
        # cancellations drain would otherwise reach the agent in place of this one.
        for ident in waiting:
            self.pending[ident].set_exception(self._restarting(
                f"the supervisor restarted while this call to MCP server {self.name} was in "
                f"flight; the server was told to cancel it. Call again: the server is still "
                f"running"))
        if self.closed is None:
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                await asyncio.wait_for(self.writer.drain(), _HANDOVER_DRAIN)
        self.closed = "the supervisor is restarting"
        self.writer.transport.abort()
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading

    @staticmethod
    def _restarting(message: str) -> StdioUnavailable:
        return StdioUnavailable(RESTARTING, message, retryable=True)

    async def close(self) -> None:
        self._close("the run ended")
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
