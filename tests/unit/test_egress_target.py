"""The gateway's reading of a route's request target (supervisor/egress/target.py) and the
approval rules that judge it: every spelling an upstream could read as a held path is either
judged as that path or refused, and a property test (hypothesis) checks that over generated
targets. No I/O, no privilege."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.egress.target import (
    MethodOverride,
    TargetRefused,
    form_scanner,
    normalise,
    override_in,
)
from supervisor.models.egress import ApprovalRule

REFUNDS = ApprovalRule.parse("POST /v1/refunds")

# The spellings that slipped past the rules (issue 11), and more of the same kind.
HELD = ["/v1/refunds", "//v1/refunds", "/v1//refunds", "/v1/refunds/", "/V1/refunds",
        "/V1/REFUNDS", "/v1/refunds//", "///v1///refunds", "/v1/r%65funds", "/v1/%52efunds",
        "http://llm.gateway/v1/refunds", "HTTP://llm.gateway//v1/refunds/?x=1",
        "/v1/refunds?x=1", "/v1/refunds?", "/%76%31/refunds"]
REFUSED = ["/v1/refunds%2f", "/v1/refunds%2F", "/v1%2frefunds", "/v1/refunds;x=1",
           "/v1;/refunds", "/v1/refunds%3bx=1", "/v1/./refunds", "/v1/x/../refunds",
           "/v1/%2e/refunds", "/v1/x/%2E%2E/refunds", "/v1/.%2e/refunds", "/v1\\refunds",
           "/v1%5crefunds", "/v1/refunds%252f", "/v1/%25%32%66", "/v1/ref\u00fcnds",
           "/v1/ref%C3%BCnds", "/v1/refunds%00", "/v1/refunds%0a", "/v1/ref unds",
           "/v1/refunds#x", "/v1/refunds%", "/v1/refunds%zz", "*", "llm.gateway:80",
           "/v1/refunds\t", "/" + "a" * 9000]


@pytest.mark.parametrize("raw", HELD)
def test_every_spelling_of_a_held_path_is_judged_as_it(raw: str) -> None:
    target = normalise(raw)
    assert target.judged == "/v1/refunds"
    assert REFUNDS.matches("POST", "llm.gateway", target.judged)
    # What is sent has no empty segment and reads back as the same judged form.
    assert "//" not in target.path
    assert normalise(target.raw_path_qs).judged == target.judged


@pytest.mark.parametrize("raw", REFUSED)
def test_what_has_no_single_meaning_is_refused(raw: str) -> None:
    with pytest.raises(TargetRefused):
        normalise(raw)


@pytest.mark.parametrize("query", ["_method=POST", "a=1&_method=DELETE", "_METHOD=x",
                                   "%5Fmethod=POST", "a=1;_method=x", "x-http-method-override=P",
                                   "X-Method-Override=PUT", "_method"])
def test_method_override_in_the_query_is_refused(query: str) -> None:
    with pytest.raises(MethodOverride):
        normalise(f"/v1/items?{query}")


def test_method_override_headers_are_found_in_any_case() -> None:
    for name in ("X-HTTP-Method-Override", "x-http-method", "X-Method-Override"):
        assert override_in(["Host", name]) == name
    assert override_in(["Host", "X-Method", "Method-Override"]) is None


def test_the_sent_path_keeps_the_agents_escapes_and_trailing_slash() -> None:
    target = normalise("http://h//v1/r%65funds//x/?a=%20b")
    assert (target.path, target.query, target.judged) == ("/v1/r%65funds/x/", "a=%20b",
                                                          "/v1/refunds/x")


def test_rules_read_their_own_glob_the_normalised_way() -> None:
    rule = ApprovalRule.parse("POST /V1//Refunds/*")
    assert rule.matches("POST", "h", normalise("/v1/refunds/42").judged)
    assert rule.matches("POST", "h", normalise("/v1/refunds/").judged)
    assert not rule.matches("POST", "h", normalise("/v1/refundsx").judged)
    assert ApprovalRule.parse("POST llm.gateway/v1/refunds").matches(
        "POST", "LLM.Gateway.", "/v1/refunds")


_PATH_CHARS = string.ascii_letters + string.digits + "/%.;\\-_~!$&'()*+,=:@?#" + "\u00e9\x00 "
_ESCAPES = st.sampled_from(["%2f", "%2F", "%2e", "%2E", "%25", "%5c", "%3b", "%72", "%65",
                            "%56", "%00", "%c3%bc", "%"])


@settings(max_examples=1500, deadline=None, database=None)
@given(st.lists(st.one_of(st.text(_PATH_CHARS, max_size=6), _ESCAPES,
                          st.sampled_from(["v1", "V1", "refunds", "REFUNDS", "/", "//",
                                           ".", ".."])), max_size=12))
def test_no_generated_target_reaches_refunds_unjudged(parts: list[str]) -> None:
    """Whatever the agent writes: either refused, or judged as what an upstream would read.
    The model of the upstream: decode each escape once, fold case, drop empty segments and
    a trailing slash (the most lenient server). If that reads as /v1/refunds..., the judged
    form must say so too."""
    raw = "/" + "".join(parts)
    try:
        target = normalise(raw)
    except TargetRefused:
        return
    sent = target.path
    upstream_view = "/" + "/".join(s for s in _decode_once(sent).lower().split("/") if s)
    assert upstream_view == target.judged
    if upstream_view.startswith("/v1/refunds"):
        assert target.judged.startswith("/v1/refunds")
    assert all(ord(c) < 0x7f and c not in "\\;#" for c in sent)


def _decode_once(path: str) -> str:
    out, i = [], 0
    while i < len(path):
        if path[i] == "%":
            out.append(chr(int(path[i + 1:i + 3], 16)))
            i += 3
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


@pytest.mark.parametrize("body", [
    b"_method=DELETE", b"a=1&_method=DELETE", b"a=1;_METHOD=put", b"a=1&%5Fmethod=x",
    b"a=1&+_method+=x", b"a=1&_http_method=PUT",
    b'--b\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--b--'])
def test_a_form_field_overriding_the_method_is_found_at_every_split(body: bytes) -> None:
    for split in range(1, len(body)):
        scanner = form_scanner("application/x-www-form-urlencoded; charset=utf-8")
        assert scanner is not None
        assert scanner.found_in(body[:split]) or scanner.found_in(body[split:]), split


@pytest.mark.parametrize("body", [b"a=my_method=1", b"amount=10&method=card", b"x=_method",
                                  b"payment_method=card"])
def test_ordinary_form_fields_pass(body: bytes) -> None:
    scanner = form_scanner("multipart/form-data; boundary=b")
    assert scanner is not None and not scanner.found_in(body)


def test_only_form_bodies_are_scanned() -> None:
    assert form_scanner("application/json") is None
    assert form_scanner("text/plain") is None
