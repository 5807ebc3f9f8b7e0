"""The gateway's per-run call list (supervisor/egress/calls.py): bounded whatever the agent
sends, query strings dropped, and the token usage of streamed replies read across chunk
boundaries in Anthropic's and OpenAI's shapes. Pure state; no privilege."""

from __future__ import annotations

import json
from typing import Any

from supervisor.egress.calls import MAX_LINE, CallLog, StreamUsage, usage_tokens


def entry(log: CallLog, path: str = "/v1/messages") -> None:
    log.record(started=1.0, method="POST", route="anthropic", path=path, status=200,
               request_bytes=10, reply_bytes=20, tokens=5, duration_ms=1.25)


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"event: x\ndata: " + json.dumps(e).encode() + b"\n\n" for e in events)


def test_the_log_keeps_its_cap_and_counts_the_rest() -> None:
    log = CallLog(cap=3)
    for _ in range(5):
        entry(log)
    assert len(log.as_dict()["calls"]) == 3
    assert log.as_dict()["unrecorded"] == 2


def test_the_query_string_is_never_kept_and_long_paths_are_clipped() -> None:
    log = CallLog()
    entry(log, "/v1/messages?key=secret-ish&beta=true")
    entry(log, "/" + "a" * 5000)
    first, second = log.as_dict()["calls"]
    assert first["path"] == "/v1/messages"
    assert "secret-ish" not in json.dumps(first)
    assert len(second["path"]) <= 200 and second["path"].endswith("\u2026")
    assert first == {"ts": 1.0, "method": "POST", "route": "anthropic",
                     "path": "/v1/messages", "status": 200, "request_bytes": 10,
                     "reply_bytes": 20, "tokens": 5, "duration_ms": 1.2}


def test_anthropic_stream_usage_read_byte_by_byte_is_input_plus_final_output() -> None:
    stream = sse({"type": "message_start", "message": {"usage": {"input_tokens": 120,
                                                                   "output_tokens": 1}}},
                 {"type": "message_delta", "usage": {"output_tokens": 10}},
                 {"type": "message_delta", "usage": {"output_tokens": 30}},
                 {"type": "message_stop"})
    usage = StreamUsage()
    for i in range(len(stream)):
        usage.feed(stream[i:i + 1])
    assert usage.tokens() == 150


def test_openai_responses_and_chat_completions_usage() -> None:
    responses = StreamUsage()
    responses.feed(sse({"type": "response.created", "response": {"usage": None}},
                       {"type": "response.completed", "response": {
                           "usage": {"input_tokens": 40, "output_tokens": 2,
                                     "total_tokens": 42}}}))
    assert responses.tokens() == 42
    chat = StreamUsage()
    chat.feed(sse({"choices": [{"delta": {"content": "hi"}}]},
                  {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}))
    chat.feed(b"data: [DONE]\n\n")
    assert chat.tokens() == 12


def test_no_usage_is_none_and_a_line_past_the_limit_is_skipped_not_kept() -> None:
    usage = StreamUsage()
    usage.feed(b"data: {\"text\": \"no usage here\"}\n\n")
    assert usage.tokens() is None
    # An agent-facing upstream that never ends a line: memory stays at one capped line.
    usage.feed(b"data: {\"usage\": {\"input_tokens\": 999}, \"pad\": \"")
    for _ in range(3):
        usage.feed(b"x" * MAX_LINE)
        assert len(usage._line) <= MAX_LINE
    usage.feed(b"\"}\n" + sse({"usage": {"input_tokens": 5, "output_tokens": 6}}))
    assert usage.tokens() == 11
    garbage = StreamUsage()
    garbage.feed(b"data: {\"usage\": not json\ndata: [1, 2]\ndata: {\"usage\": 3}\n")
    assert garbage.tokens() is None


def test_usage_tokens_prefers_the_total_and_ignores_booleans() -> None:
    assert usage_tokens({"total_tokens": 7, "input_tokens": 100}) == 7
    assert usage_tokens({"input_tokens": 3, "output_tokens": True}) == 3
    assert usage_tokens({}) is None
