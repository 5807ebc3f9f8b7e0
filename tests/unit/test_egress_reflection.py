"""Finding a route's secret in what an upstream returns (supervisor/egress/reflection.py):
each known encoding at every alignment, streamed bodies split at every chunk boundary, and no
false alarm on ordinary or random data. No I/O, no privilege."""

from __future__ import annotations

import base64
import json
import os
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.egress.reflection import Reflection, SecretReflected

SECRET = "sk-live-route-secret-9f8e7d6c5b4a"
HEADER = f"Bearer {SECRET}"


def _document(prefix: bytes) -> bytes:
    return prefix + json.dumps({"headers": {"Authorization": HEADER}}).encode() + b"\n}"


ENCODINGS = {
    "raw": lambda b: b,
    "upper": lambda b: b.upper(),
    "b64": base64.b64encode,
    "b64url": base64.urlsafe_b64encode,
    "hex": lambda b: b.hex().encode(),
    "HEX": lambda b: b.hex().upper().encode(),
    "percent-all": lambda b: "".join(f"%{c:02X}" for c in b).encode(),
    "quote": lambda b: urllib.parse.quote(b).encode(),
    "json-in-json": lambda b: json.dumps({"echo": b.decode()}).encode(),
}


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("offset", range(6))
def test_each_encoding_at_each_alignment_is_found(encoding: str, offset: int) -> None:
    reflection = Reflection([SECRET])
    assert reflection.found_in(ENCODINGS[encoding](_document(b"p" * offset)))


def test_a_secret_with_characters_that_get_escaped() -> None:
    secret = "a/b+c=d&e f\"g\\h-0123456789"
    reflection = Reflection([secret])
    for form in (json.dumps(secret), urllib.parse.quote(secret, safe=""),
                 urllib.parse.quote_plus(secret), json.dumps(secret).replace("/", "\\/")):
        assert reflection.found_in(form.encode()), form


def test_no_false_alarm_on_ordinary_or_random_data() -> None:
    reflection = Reflection([SECRET])
    assert not reflection.found_in(json.dumps({"id": "chat-1", "usage": {"total_tokens": 9}}))
    assert not reflection.found_in(os.urandom(1 << 20))
    assert not reflection.found_in(base64.b64encode(os.urandom(1 << 19)))
    assert not reflection.found_in(SECRET[:-1])  # a fragment is not the secret


@settings(max_examples=300, deadline=None, database=None)
@given(st.integers(0, 7), st.lists(st.integers(1, 97), min_size=1, max_size=40),
       st.sampled_from(sorted(ENCODINGS)))
def test_a_streamed_reflection_is_stopped_before_any_byte_of_it_leaves(
        offset: int, sizes: list[int], encoding: str) -> None:
    body = ENCODINGS[encoding](_document(b"q" * offset))
    guard = Reflection([SECRET]).guard()
    sent = b""
    position = 0
    with pytest.raises(SecretReflected):
        while True:
            size = sizes[len(sent) % len(sizes)] if position < len(body) else 0
            chunk = body[position:position + size] if size else b""
            position += len(chunk)
            if not chunk:
                sent += guard.finish()
                break
            sent += guard.feed(chunk)
    assert not Reflection([SECRET]).found_in(sent)
    assert SECRET.encode() not in sent


@settings(max_examples=200, deadline=None, database=None)
@given(st.binary(max_size=4000), st.lists(st.integers(1, 300), min_size=1, max_size=20))
def test_a_clean_stream_passes_whole_and_in_order(body: bytes, sizes: list[int]) -> None:
    guard = Reflection([SECRET]).guard()
    out, position, i = b"", 0, 0
    while position < len(body):
        chunk = body[position:position + sizes[i % len(sizes)]]
        position += len(chunk)
        i += 1
        out += guard.feed(chunk)
    out += guard.finish()
    assert out == body


def _passed_on(body: bytes, sizes: list[int]) -> bytes:
    """What a guard lets out of `body` fed in chunks of `sizes` (cycled), the bytes a found
    reflection still lets through (SecretReflected.before) included."""
    guard = Reflection([SECRET]).guard()
    out, position, i = b"", 0, 0
    try:
        while position < len(body):
            chunk = body[position:position + sizes[i % len(sizes)]]
            position += len(chunk)
            i += 1
            out += guard.feed(chunk)
    except SecretReflected as found:
        return out + found.before
    raise AssertionError("the reflection was not found")


@settings(max_examples=300, deadline=None, database=None)
@given(st.integers(0, 3000), st.lists(st.integers(1, 4000), min_size=1, max_size=20),
       st.sampled_from(sorted(ENCODINGS)))
def test_what_leaves_ahead_of_a_reflection_does_not_depend_on_chunking(
        pad: int, sizes: list[int], encoding: str) -> None:
    """A loaded host reads a stream in fewer, larger chunks; what leaves before the cut is the
    same as when it comes one byte at a time, and holds no form of the secret."""
    body = b"x" * pad + ENCODINGS[encoding](_document(b""))
    one_by_one = _passed_on(body, [1])
    assert _passed_on(body, sizes) == one_by_one
    assert _passed_on(body, [len(body)]) == one_by_one  # all of it in one chunk
    assert body.startswith(one_by_one) and not Reflection([SECRET]).found_in(one_by_one)
    reflection = Reflection([SECRET])
    end = reflection.first_end(body)
    assert end is not None and len(one_by_one) == max(0, end - reflection.longest)
