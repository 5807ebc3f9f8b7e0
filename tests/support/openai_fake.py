"""A local fake of OpenAI's Responses API (POST /v1/responses, server-sent events) for running
Codex CLI against: HTTPS on loopback with the test CA, in a thread of its own. It scripts a
short coding session as `exec_command` function calls (read a file, edit it, run the tests,
finish), each reply carrying `usage`, and records every request, so a test can check what the
CLI sent and which key reached the upstream."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.support.fake_api import FakeVendorAPI

# One shell command per turn; the step is the number of tool outputs the CLI has sent back.
Script = list[str]
INPUT_TOKENS, OUTPUT_TOKENS = 200, 40


def _event(data: dict[str, Any]) -> bytes:
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()


def tool_outputs(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for item in body.get("input") or []
            if isinstance(item, dict) and item.get("type") == "function_call_output"]


@dataclass
class FakeResponsesAPI(FakeVendorAPI):
    script: Script

    NAME = "fake Responses API"

    def session_requests(self) -> list[dict[str, Any]]:
        """The requests of the scripted session (the ones offering exec_command)."""
        return [seen for seen in self.seen if "exec_command" in seen.get("tools", [])]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body, tools = await self._record(request)
        if request.method != "POST" or request.path != "/v1/responses":
            return web.json_response({"error": {"type": "not_found", "message":
                                                f"{request.path} is not faked"}}, status=404)
        step = len(tool_outputs(body))
        if "exec_command" in tools and step < len(self.script):
            item: dict[str, Any] = {
                "type": "function_call", "id": f"fc_{step:04d}", "call_id": f"call_{step:04d}",
                "name": "exec_command", "status": "completed",
                "arguments": json.dumps({"cmd": self.script[step]})}
        else:  # the session's last turn, and any side request
            item = {"type": "message", "id": f"msg_{len(self.seen):04d}", "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "annotations": [],
                                 "text": self.final_text if "exec_command" in tools else "ok"}]}
        response_id = f"resp_{len(self.seen):04d}"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(_event({"type": "response.created", "response": {
            "id": response_id, "object": "response", "status": "in_progress"}}))
        await response.write(_event({"type": "response.output_item.done", "output_index": 0,
                                     "item": item}))
        await response.write(_event({"type": "response.completed", "response": {
            "id": response_id, "object": "response", "status": "completed",
            "usage": {"input_tokens": INPUT_TOKENS,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": OUTPUT_TOKENS,
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS}}}))
        await response.write_eof()
        return response
