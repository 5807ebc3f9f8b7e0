"""How the gateway reads a plain-HTTP request's target: one normalised form of the path that
approval rules judge, the path that is sent (which an upstream can only read as that same
form), and a refusal for whatever has no single meaning: encoded slashes or backslashes, dot
segments, matrix parameters, non-ASCII or control bytes, double encoding, fragments, and
method overrides (headers, the query, and form bodies as they stream). Pure; no I/O, no
privilege."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Header and query names that make frameworks (Rails, Laravel, Express method-override, Spring,
# Google APIs) treat a request as another method. An approval rule judges the method on the
# request line, so these are refused rather than reinterpreted.
OVERRIDE_HEADERS = frozenset(("x-http-method-override", "x-http-method", "x-method-override"))
OVERRIDE_PARAMS = frozenset(("_method", "x-http-method-override", "x-http-method",
                             "x-method-override", "_http_method"))

_ABSOLUTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*")
_VISIBLE = re.compile(r"^[\x21-\x7e]*$")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Decoded, these bytes would change how the path splits or would be decoded again.
_NEVER_DECODED = frozenset(b"/\\%;?#")
MAX_TARGET = 8192


class TargetRefused(ValueError):
    """The target has no single meaning; `reason` says which rule it broke."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MethodOverride(TargetRefused):
    """A header or query parameter asks the upstream to treat the request as another method."""


@dataclass(frozen=True)
class Target:
    path: str  # what is sent: the agent's escapes kept, empty segments collapsed
    query: str  # as the agent wrote it, without the "?"
    judged: str  # what rules see: decoded, lower-case, no empty segments, no trailing slash

    @property
    def raw_path_qs(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


def normalise(raw: str) -> Target:
    """The request line's target (origin form `/p?q` or absolute form `http://h/p?q`)."""
    if len(raw) > MAX_TARGET:
        raise TargetRefused(f"the target is longer than {MAX_TARGET} characters")
    if not _VISIBLE.match(raw):
        raise TargetRefused("the target holds a space, a control or a non-ASCII character")
    if not raw.startswith("/"):
        authority = _ABSOLUTE.match(raw)
        if authority is None:
            raise TargetRefused("the target is neither a path nor an absolute http URL")
        raw = raw[authority.end():] or "/"
        if not raw.startswith(("/", "?")):
            raise TargetRefused("the target is neither a path nor an absolute http URL")
        if raw.startswith("?"):
            raw = "/" + raw
    if "#" in raw:
        raise TargetRefused("a request target has no fragment")
    path, _, query = raw.partition("?")
    if "\\" in path:
        raise TargetRefused("backslashes in a path are read as slashes by some servers")
    if ";" in path:
        raise TargetRefused("matrix parameters (';') in a path are read differently by "
                            "different servers")
    if _ESCAPE.search(raw):
        raise TargetRefused("a '%' that does not start a percent-escape")
    segments = [s for s in path.split("/") if s]
    decoded = [_decode_segment(s) for s in segments]
    if any(s in (".", "..") for s in decoded):
        raise TargetRefused("dot segments ('.', '..'), written or percent-encoded, are not "
                            "allowed")
    _check_query(query)
    sent = "/" + "/".join(segments)
    if path.endswith("/") and segments:
        sent += "/"
    judged = ("/" + "/".join(decoded)).lower()
    return Target(path=sent, query=query, judged=judged)


def _decode_segment(segment: str) -> str:
    out = bytearray()
    i = 0
    raw = segment.encode("ascii")
    while i < len(raw):
        if raw[i] == 0x25:  # "%"
            byte = int(raw[i + 1:i + 3], 16)
            if byte in _NEVER_DECODED:
                raise TargetRefused(f"an encoded {chr(byte)!r} (%{byte:02X}) in a path: "
                                    f"encoded slashes, backslashes, semicolons and double "
                                    f"encoding have no single meaning")
            if not 0x20 < byte < 0x7f:
                raise TargetRefused(f"an encoded byte %{byte:02X} that is not visible ASCII")
            out.append(byte)
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("ascii")


def _check_query(query: str) -> None:
    for part in re.split(r"[&;]", query):
        name = part.partition("=")[0].replace("+", " ")
        name = re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), name)
        if name.strip().lower() in OVERRIDE_PARAMS:
            raise MethodOverride(f"query parameter {name.strip()!r}")


_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
# A form field naming the method: `_method=` in a urlencoded body, `name="_method"` in a
# multipart part (Rails, Laravel and Symfony read either as the request's method).
_FORM_OVERRIDE = re.compile(
    rb"(?:[&;]|^)[ +]*(?:_|%5f)(?:http_)?method[ +]*(?:=|&|;|$)"
    rb"|name\s*=\s*\"?(?:_|%5f)(?:http_)?method\b", re.IGNORECASE | re.MULTILINE)


class FormOverrideScanner:
    """Finds a method-override field in a form body as it streams, across chunk boundaries
    (the chunk that completes the field is found before it is passed on)."""

    TAIL = 64

    def __init__(self) -> None:
        self._tail = b"&"

    def found_in(self, chunk: bytes) -> bool:
        data = self._tail + chunk
        self._tail = data[-self.TAIL:]
        return _FORM_OVERRIDE.search(data) is not None


def form_scanner(content_type: str) -> FormOverrideScanner | None:
    """A scanner for bodies of the form content types; None for others (a JSON body that
    mentions `_method` is data, not a form field)."""
    if content_type.split(";")[0].strip().lower() in _FORM_TYPES:
        return FormOverrideScanner()
    return None


def override_in(headers: list[str]) -> str | None:
    """The first method-override header among `headers` (names), or None."""
    for name in headers:
        if name.lower() in OVERRIDE_HEADERS:
            return name
    return None

