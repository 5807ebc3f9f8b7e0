"""Keeps a route's secret out of everything the gateway hands back to the agent. An upstream
that reflects request headers (an echo endpoint, a debug error page, TRACE) would otherwise
return the secret the gateway injected. This module knows the forms such a reflection takes
and finds them in header values and bodies, streamed bodies across chunk boundaries included.
Pure; no I/O, no privilege.

The forms, each matched in any letter case: the secret as sent; percent-encoded (the
reserved characters, or every byte); as a JSON string (escaped slashes too); hex; base64 and
base64url at each of the three byte alignments (the characters that depend only on the
secret's bytes, so base64 of a whole reflected header block or JSON document is caught too).
What this cannot see: a secret compressed (the gateway asks upstreams for identity encoding
and refuses any other), encrypted, split, or transformed by code of the upstream's own.
Routes are meant for APIs, not for echo services."""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from collections.abc import Iterable

_MIN_DERIVED = 12  # shorter derived forms would match ordinary text by chance


class SecretReflected(Exception):
    """The upstream's reply holds the route's secret in one of the known forms. `before` is
    what a streamed body may still pass on ahead of it (see StreamGuard.feed)."""

    def __init__(self, before: bytes = b"") -> None:
        super().__init__("the route's secret is in the reply")
        self.before = before


def _base64_cores(secret: bytes) -> list[bytes]:
    """For each alignment of `secret` inside a longer base64 stream, the encoded characters
    that depend on the secret's bytes alone."""
    cores = []
    for offset in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * offset + secret)
            first = -(-8 * offset // 6)  # ceil: the first character with no prefix bits
            last = 8 * (offset + len(secret)) // 6  # exclusive: no bits past the secret
            cores.append(encoded[first:last])
    return cores


def forms(secret: str) -> set[bytes]:
    raw = secret.encode()
    found = {raw}
    derived = {
        urllib.parse.quote(secret, safe="").encode(),
        urllib.parse.quote_plus(secret, safe="").encode(),
        "".join(f"%{byte:02X}" for byte in raw).encode(),  # every byte escaped
        json.dumps(secret)[1:-1].encode(),
        json.dumps(secret)[1:-1].replace("/", "\\/").encode(),
        raw.hex().encode(),
        *_base64_cores(raw),
    }
    found |= {form for form in derived if len(form) >= _MIN_DERIVED}
    return found


class Reflection:
    """The forms of one or more secrets, compiled once per route."""

    def __init__(self, secrets: Iterable[str]) -> None:
        patterns = sorted({f for s in secrets if s for f in forms(s)}, key=len, reverse=True)
        if not patterns:
            raise ValueError("a reflection guard needs a non-empty secret")
        self.longest = max(len(p) for p in patterns)
        self._pattern = re.compile(b"|".join(re.escape(p) for p in patterns), re.IGNORECASE)
        self._each = [re.compile(re.escape(p), re.IGNORECASE) for p in patterns]

    def found_in(self, data: bytes | str) -> bool:
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        return self._pattern.search(data) is not None

    def first_end(self, data: bytes) -> int | None:
        """Where the earliest-ending form in `data` ends (the leftmost match of the whole
        pattern may end later), or None."""
        ends = [m.end() for p in self._each if (m := p.search(data)) is not None]
        return min(ends, default=None)

    def guard(self) -> StreamGuard:
        return StreamGuard(self)


class StreamGuard:
    """Scans a body as it streams. `feed` returns what may be passed on and holds back the
    last `longest - 1` bytes, so a form split across chunks is seen whole before any of it
    leaves; no byte of a found form is ever returned.

    When a form is found, SecretReflected.before holds the rest of what the body would have
    passed on had it come one byte at a time (up to `longest` bytes before the form's end),
    so what leaves ahead of a reflection does not depend on how the upstream's bytes were
    split into chunks (a loaded host reads fewer, larger chunks)."""

    def __init__(self, reflection: Reflection) -> None:
        self.reflection = reflection
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk
        end = self.reflection.first_end(data) if self.reflection.found_in(data) else None
        if end is not None:
            self._held = b""
            raise SecretReflected(data[:max(0, end - self.reflection.longest)])
        keep = self.reflection.longest - 1
        if len(data) <= keep:
            self._held = data
            return b""
        self._held = data[-keep:] if keep else b""
        return data[:len(data) - keep]

    def finish(self) -> bytes:
        data, self._held = self._held, b""
        return data
