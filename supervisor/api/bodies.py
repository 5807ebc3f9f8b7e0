"""A request body from its bytes to its model, the one way every handler and the owners'
acceptor (api/presignal.py) read it: JSON nesting bounded before parsing, finite numbers only,
then the request model's own validation. No I/O, no privilege."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from supervisor.errors import InvalidJson, InvalidRequest

# Deeper JSON than any request model has is refused before it is parsed.
JSON_DEPTH_MAX = 32
# A string runs to its closing quote or to the end of the text: every quote starts a match
# that succeeds, so an unterminated string costs one pass, never one pass per quote.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.|\\\Z)*(?:"|\Z)', re.DOTALL)
_JSON_INNERMOST = re.compile(rb"\[[^\[\]{}]*\]|\{[^\[\]{}]*\}")
_JSON_OPEN = re.compile(rb"[\[{]")


def nesting_exceeds(raw: bytes, limit: int = JSON_DEPTH_MAX) -> bool:
    """Whether JSON text nests arrays and objects deeper than `limit`, judged without parsing
    it: strings are blanked, then the innermost brackets removed level by level (each pass a
    C-speed regex), so a hostile body costs at most `limit` scans and never a deep recursion."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    text = _JSON_STRING.sub(b"0", raw)
    for _ in range(limit):
        text, removed = _JSON_INNERMOST.subn(b"0", text)
        if not removed:
            break  # balanced: nothing left open; unbalanced: what is left is refused below
    return _JSON_OPEN.search(text) is not None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_body(raw: bytes, model: type[BaseModel]) -> Any:
    """`raw` as an instance of `model`; InvalidJson or InvalidRequest (changing nothing)."""
    if nesting_exceeds(raw):
        raise InvalidJson(f"the request body nests deeper than {JSON_DEPTH_MAX} levels",
                          limit=JSON_DEPTH_MAX)
    try:
        parsed = json.loads(raw, parse_float=_finite_float, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, ...
        raise InvalidJson(f"the request body is not valid JSON: {str(exc)[:200]}") from None
    try:
        return model.model_validate(parsed)
    except ValidationError as exc:
        errors = [{"field": ".".join(str(p) for p in e["loc"]) or "body", "reason": e["msg"]}
                  for e in exc.errors()[:20]]
        first = errors[0]
        raise InvalidRequest(f"{first['field']}: {first['reason']}", field=first["field"],
                             reason=first["reason"], errors=errors) from None
