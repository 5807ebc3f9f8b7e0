"""A local fake of Anthropic's Messages API (POST /v1/messages, server-sent events) for running a
real agent CLI against: HTTPS on loopback with the test CA, in a thread of its own. It scripts a
short coding session as tool_use turns (read a file, edit it, run the tests, finish) and records
every request, so a test can check what the CLI sent and which key reached the upstream."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.support.fake_api import FakeVendorAPI

# One tool call per turn; the step is the number of tool results the CLI has sent back.
Script = list[tuple[str, dict[str, Any]]]


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def _tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [block for message in messages if message.get("role") == "user"
            and isinstance(message.get("content"), list)
            for block in message["content"] if block.get("type") == "tool_result"]


@dataclass
class FakeMessagesAPI(FakeVendorAPI):
    script: Script

    NAME = "fake Messages API"

    def session_requests(self) -> list[dict[str, Any]]:
        """The requests of the scripted session (the ones offering the editing tools)."""
        return [seen for seen in self.seen if seen.get("tools")]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body, tools = await self._record(request)
        if request.method != "POST" or request.path != "/v1/messages":
            return web.json_response({"type": "error", "error": {
                "type": "not_found_error", "message": f"{request.path} is not faked"}},
                status=404)
        step = len(_tool_results(body.get("messages") or []))
        if "Edit" in tools and step < len(self.script):
            name, arguments = self.script[step]
            block: dict[str, Any] = {"type": "tool_use", "id": f"toolu_{step:04d}",
                                     "name": name, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(arguments)}
            stop = "tool_use"
        else:  # the session's last turn, and every side request (titles, summaries)
            block = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": self.final_text if "Edit" in tools else "ok"}
            stop = "end_turn"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        model = body.get("model", "claude-fake")
        await response.write(_event("message_start", {"type": "message_start", "message": {
            "id": f"msg_{len(self.seen):04d}", "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 120, "output_tokens": 1}}}))
        await response.write(_event("content_block_start", {
            "type": "content_block_start", "index": 0, "content_block": block}))
        await response.write(_event("content_block_delta", {
            "type": "content_block_delta", "index": 0, "delta": delta}))
        await response.write(_event("content_block_stop", {"type": "content_block_stop",
                                                           "index": 0}))
        await response.write(_event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": 30}}))
        await response.write(_event("message_stop", {"type": "message_stop"}))
        await response.write_eof()
        return response
