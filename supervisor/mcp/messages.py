"""JSON-RPC 2.0 messages as an MCP client sends them over the streamable HTTP transport: read
strictly (a body the gateway cannot judge is refused whole, never passed on), and the replies
the gateway makes itself. Pure functions; no I/O, no privilege."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

# JSON-RPC's own codes, and the one the gateway uses for its refusals (the range -32000 to
# -32099 is left to implementations).
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
REFUSED = -32001
MAX_DEPTH = 32  # nesting of a message's JSON; deeper is refused before anything reads it


class MessageRefused(Exception):
    """A body the gateway will not pass on; `code` is the JSON-RPC error code of the reply and
    `reason` a stable snake_case word for the audit row."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


@dataclass(frozen=True)
class Message:
    """One JSON-RPC message. `id` is None for a notification; `method` is None for a response
    (the client answering a request of the server's)."""

    raw: dict[str, Any]
    id: str | int | None
    method: str | None

    @property
    def is_request(self) -> bool:
        return self.method is not None and self.id is not None

    @property
    def tool(self) -> str | None:
        if self.method != "tools/call":
            return None
        return str(self.raw["params"]["name"])

    @property
    def arguments(self) -> dict[str, Any]:
        params = self.raw.get("params") or {}
        args = params.get("arguments")
        return args if isinstance(args, dict) else {}


def parse(body: bytes, max_batch: int) -> tuple[list[Message], bool]:
    """The messages of one POST body and whether it was a batch. Raises MessageRefused for
    anything that is not well-formed JSON-RPC 2.0 of the shape MCP uses."""
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise MessageRefused(PARSE_ERROR, "unparseable", "the body nests too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise MessageRefused(PARSE_ERROR, "unparseable",
                             f"the body is not JSON: {str(exc)[:200]}") from None
    if _depth(data) > MAX_DEPTH:
        raise MessageRefused(PARSE_ERROR, "unparseable",
                             f"the body nests deeper than {MAX_DEPTH} levels")
    if isinstance(data, list):
        if not data:
            raise MessageRefused(INVALID_REQUEST, "invalid_message", "an empty batch")
        if len(data) > max_batch:
            raise MessageRefused(INVALID_REQUEST, "batch_too_large",
                                 f"a batch of {len(data)} messages; at most {max_batch}")
        messages = [_message(item) for item in data]
        ids = [m.id for m in messages if m.is_request]
        if len(ids) != len(set(map(repr, ids))):
            raise MessageRefused(INVALID_REQUEST, "invalid_message",
                                 "two requests in one batch share an id")
        return messages, True
    return [_message(data)], False


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            return depth
        nxt: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                nxt.extend(item.values())
            elif isinstance(item, list):
                nxt.extend(item)
        level = nxt
    return depth - 1


def _message(data: Any) -> Message:
    if not isinstance(data, dict) or data.get("jsonrpc") != "2.0":
        raise MessageRefused(INVALID_REQUEST, "invalid_message",
                             "each message must be a JSON-RPC 2.0 object")
    ident = data.get("id")
    if "id" in data and (isinstance(ident, bool) or not isinstance(ident, str | int)):
        raise MessageRefused(INVALID_REQUEST, "invalid_message",
                             "an id must be a string or an integer")
    method = data.get("method")
    if method is None:
        if "id" not in data or ("result" in data) == ("error" in data):
            raise MessageRefused(INVALID_REQUEST, "invalid_message",
                                 "a message without a method must be a response: an id and "
                                 "either result or error")
        return Message(data, ident, None)
    if not isinstance(method, str) or not method or len(method) > 128:
        raise MessageRefused(INVALID_REQUEST, "invalid_message", "a method must be a string")
    params = data.get("params")
    if "params" in data and not isinstance(params, dict):
        raise MessageRefused(INVALID_REQUEST, "invalid_message", "params must be an object")
    if set(data) - {"jsonrpc", "id", "method", "params"}:
        raise MessageRefused(INVALID_REQUEST, "invalid_message",
                             "a request has only jsonrpc, id, method and params")
    if method == "tools/call":
        if "id" not in data:
            raise MessageRefused(INVALID_REQUEST, "invalid_message",
                                 "tools/call must be a request (with an id)")
        name = (params or {}).get("name")
        args = (params or {}).get("arguments")
        if not isinstance(name, str) or not name or len(name) > 256:
            raise MessageRefused(INVALID_PARAMS, "invalid_message",
                                 "tools/call needs a tool name")
        if args is not None and not isinstance(args, dict):
            raise MessageRefused(INVALID_PARAMS, "invalid_message",
                                 "tools/call arguments must be an object")
    return Message(data, ident if "id" in data else None, method)


def canonical_digest(arguments: dict[str, Any]) -> str:
    """sha256 of the arguments in one canonical JSON form (sorted keys, no spaces, UTF-8): the
    audit row names what was called without holding what may be sensitive."""
    text = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def error(ident: str | int | None, code: int, message: str,
          data: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        body["data"] = data
    return {"jsonrpc": "2.0", "id": ident, "error": body}


def tool_error(ident: str | int | None, text: str) -> dict[str, Any]:
    """A refusal as a tool result the model reads (MCP's `isError`), not a protocol error."""
    return {"jsonrpc": "2.0", "id": ident,
            "result": {"content": [{"type": "text", "text": text}], "isError": True}}


def unknown_tool(ident: str | int | None, name: str) -> dict[str, Any]:
    """What a server answers for a tool it does not have (the MCP specification's example):
    a denied tool must look exactly like an absent one."""
    return error(ident, INVALID_PARAMS, f"Unknown tool: {name[:256]}")
