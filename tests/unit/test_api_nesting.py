"""The control API's JSON nesting judge (supervisor/api/server.py), which runs on the event
loop before a body is parsed: right on valid JSON, strings taken as text, and one linear pass
per level on hostile input. No privilege."""

from __future__ import annotations

import json

import pytest

from supervisor.api.bodies import JSON_DEPTH_MAX, nesting_exceeds


def nested(depth: int) -> bytes:
    """Valid JSON `depth` levels deep, arrays and objects in turn."""
    opens = "".join("[" if level % 2 else '{"k": ' for level in range(depth))
    closes = "".join("]" if level % 2 else "}" for level in reversed(range(depth)))
    return (opens + "1" + closes).encode()


@pytest.mark.parametrize("depth", [0, 1, 5, JSON_DEPTH_MAX])
def test_json_up_to_the_limit_passes(depth: int) -> None:
    body = nested(depth)
    json.loads(body)
    assert not nesting_exceeds(body)


@pytest.mark.parametrize("depth", [JSON_DEPTH_MAX + 1, 100, 5000])
def test_deeper_json_is_refused(depth: int) -> None:
    assert nesting_exceeds(nested(depth))


def test_brackets_in_strings_are_text() -> None:
    body = json.dumps({"a": "[" * 100, "b": ["{" * 100, "\\\"[[[", "]]]"]}).encode()
    assert not nesting_exceeds(body)


@pytest.mark.parametrize("body", [
    b"[" * 10_000,  # never closed
    b"]" * 50 + b"[" * 50,
    b'"' + b'\\"' * 50_000 + b"[" * 40,  # an unterminated string full of escaped quotes
    b"[" * 40 + b'"\\' * 50_000,  # ends in a lone backslash
    b"[]" * 50_000 + b"[" * 40,
])
def test_hostile_text_is_judged_without_error(body: bytes) -> None:
    assert nesting_exceeds(body) in (True, False)
    if body.count(b"[") - body.count(b"]") > JSON_DEPTH_MAX and b'"' not in body:
        assert nesting_exceeds(body)
