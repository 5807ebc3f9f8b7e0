"""The egress policy models: allow-list entries (wildcards, ports, addresses refused), credential
routes, approval rules, budgets, the breaker's bounds and NetworkPolicy's consistency. Pure
pydantic; no I/O, no privilege."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from supervisor.models.egress import (
    AllowEntry,
    ApprovalRule,
    Breaker,
    Budget,
    Budgets,
    GatewayPolicy,
    Route,
    is_ip_literal,
)
from supervisor.models.network import NetworkPolicy


def route(**overrides: object) -> Route:
    fields: dict[str, object] = {"name": "llm", "host": "llm.gateway",
                                 "upstream": "https://api.example.com/v1", "secret": "env:KEY"}
    fields.update(overrides)
    return Route.model_validate(fields)


# ----------------------------------------------------------------------------- is_ip_literal


@pytest.mark.parametrize("host", [
    "127.0.0.1", "10.1.2.3", "[::1]", "::1", "[fe80::1]", "::ffff:127.0.0.1", "2130706433",
    "0x7f.1", "0X7F.0.0.1", "127.1", "0177.0.0.1", "0x7f000001", "127.0.0.1.", "1",
])
def test_ip_literals_in_any_notation_are_recognised(host: str) -> None:
    assert is_ip_literal(host)


@pytest.mark.parametrize("host", [
    "example.com", "pkg.upstream.test", "1.example.com", "0x7f.example", "localhost",
    "api-1.internal", "a1b2", "",
])
def test_names_are_not_ip_literals(host: str) -> None:
    assert not is_ip_literal(host)


# ----------------------------------------------------------------------------- AllowEntry


def test_allow_entry_parses_host_and_port_and_lowercases() -> None:
    assert AllowEntry.parse("PyPI.org:443") == AllowEntry(host="pypi.org", port=443)
    assert AllowEntry.parse("  files.example.com:8443 ") == AllowEntry(host="files.example.com",
                                                                       port=8443)
    assert str(AllowEntry.parse("*.Example.com:443")) == "*.example.com:443"


def test_allow_entry_without_port_defaults_to_443() -> None:
    assert AllowEntry.parse("example.com") == AllowEntry(host="example.com", port=443)


@pytest.mark.parametrize("text", [
    "127.0.0.1:443", "[::1]:443", "2130706433:443", "0x7f.1:443", "*.127.0.0.1:443",
    "10.0.0.1", "example.com:0", "example.com:65536", "example.com:https", "example.com:-1",
    "exa mple.com:443", "*example.com:443", "a.*.example.com:443", "*:443", "example.com:",
    "http://example.com:443", "-bad.example.com:443",
])
def test_allow_entry_refuses_addresses_and_bad_ports(text: str) -> None:
    with pytest.raises(ValueError) as info:
        AllowEntry.parse(text)
    assert repr(text) in str(info.value)


def test_allow_entry_matches_exact_name_and_port_only() -> None:
    entry = AllowEntry.parse("pypi.org:443")
    assert entry.matches("pypi.org", 443)
    assert entry.matches("PYPI.ORG", 443)
    assert entry.matches("pypi.org.", 443)  # the fully-qualified spelling
    assert not entry.matches("pypi.org", 80)
    assert not entry.matches("files.pypi.org", 443)
    assert not entry.matches("evilpypi.org", 443)
    assert not entry.matches("pypi.org.evil.com", 443)


def test_wildcard_matches_subdomains_but_not_the_domain_itself() -> None:
    entry = AllowEntry.parse("*.example.com:443")
    assert entry.matches("a.example.com", 443)
    assert entry.matches("a.b.example.com", 443)
    assert entry.matches("A.Example.COM.", 443)
    assert not entry.matches("example.com", 443)
    assert not entry.matches("example.com.", 443)
    assert not entry.matches("badexample.com", 443)
    assert not entry.matches("a.example.com", 8443)
    assert not entry.matches("a.example.com.evil", 443)


def test_gateway_policy_parses_allow_strings_and_answers_allowed() -> None:
    policy = GatewayPolicy.model_validate({"allow": ["pypi.org:443", "*.pythonhosted.org:443",
                                                     {"host": "git.example.com", "port": 22}]})
    assert policy.allow[0] == AllowEntry(host="pypi.org", port=443)
    assert policy.allowed("files.pythonhosted.org", 443) == AllowEntry(
        host="*.pythonhosted.org", port=443)
    assert policy.allowed("git.example.com", 22) is not None
    assert policy.allowed("pypi.org", 80) is None
    assert policy.allowed("pythonhosted.org", 443) is None
    assert policy.allowed("127.0.0.1", 443) is None


def test_gateway_policy_refuses_an_address_in_its_allow_list() -> None:
    with pytest.raises(ValidationError, match="not an address"):
        GatewayPolicy.model_validate({"allow": ["169.254.169.254:80"]})


# ----------------------------------------------------------------------------- Route


def test_route_defaults_and_header_value() -> None:
    r = route()
    assert (r.header, r.format) == ("Authorization", "Bearer {secret}")
    assert r.header_value("s3cr3t") == "Bearer s3cr3t"
    custom = route(header="x-api-key", format="{secret}")
    assert custom.header_value("abc") == "abc"
    # The format is not str.format: braces elsewhere stay as they are.
    assert route(format="Key {secret} {other}").header_value("v") == "Key v {other}"


def test_route_host_is_lowercased() -> None:
    assert route(host="LLM.Gateway").host == "llm.gateway"


@pytest.mark.parametrize("host", ["*.llm.gateway", "127.0.0.1", "2130706433", "[::1]",
                                  "llm gateway", "", "llm.gateway:80"])
def test_route_host_must_be_a_plain_name(host: str) -> None:
    with pytest.raises(ValidationError, match="plain DNS name"):
        route(host=host)


@pytest.mark.parametrize("upstream", ["http://api.example.com", "api.example.com",
                                      "https://", "https://api.example.com/v1?x=1",
                                      "https://api.example.com/#frag", "https://a b.com/"])
def test_route_upstream_must_be_https(upstream: str) -> None:
    with pytest.raises(ValidationError):
        route(upstream=upstream)


@pytest.mark.parametrize("secret", ["KEY", "vault:KEY", "file:", "env:", "file:../etc/shadow",
                                    "file:a/b", "env:A B", "file:" + "x" * 129])
def test_route_secret_must_be_a_file_or_env_reference(secret: str) -> None:
    with pytest.raises(ValidationError, match="file:NAME"):
        route(secret=secret)


@pytest.mark.parametrize("secret", ["file:openai.key", "env:OPENAI_API_KEY", "file:a-b_c.1"])
def test_route_secret_references_accepted(secret: str) -> None:
    assert route(secret=secret).secret == secret


@pytest.mark.parametrize("header", ["Bad Header", "X-Key:", "", "X\r\nInjected", "x" * 65])
def test_route_header_must_be_a_header_name(header: str) -> None:
    with pytest.raises(ValidationError):
        route(header=header)


@pytest.mark.parametrize("fmt", ["Bearer", "Bearer {secret}\r\nX-Evil: 1", "{secret}\n"])
def test_route_format_needs_the_secret_and_no_line_breaks(fmt: str) -> None:
    with pytest.raises(ValidationError, match="secret"):
        route(format=fmt)


def test_route_name_pattern_and_prices() -> None:
    with pytest.raises(ValidationError):
        route(name="LLM")
    with pytest.raises(ValidationError):
        route(name="-llm")
    with pytest.raises(ValidationError):
        route(price_per_call=-0.01)
    with pytest.raises(ValidationError):
        route(price_per_token=-1)
    assert route(price_per_call=0.5, price_per_token=1e-6).price_per_token == 1e-6


def test_route_names_and_hosts_must_be_unique() -> None:
    with pytest.raises(ValidationError, match="names must be unique"):
        GatewayPolicy(routes=[route(), route(host="other.gateway")])
    with pytest.raises(ValidationError, match="hosts must be unique"):
        GatewayPolicy(routes=[route(), route(name="other")])


def test_route_for_matches_case_and_trailing_dot() -> None:
    policy = GatewayPolicy(routes=[route()])
    assert policy.route_for("LLM.gateway.") is policy.routes[0]
    assert policy.route_for("llm.gateway") is policy.routes[0]
    assert policy.route_for("x.llm.gateway") is None


def test_models_are_strict_and_frozen() -> None:
    with pytest.raises(ValidationError):
        Route.model_validate({"name": "llm", "host": "llm.gateway",
                              "upstream": "https://a.example", "secret": "env:K", "extra": 1})
    r = route()
    with pytest.raises(ValidationError):
        r.host = "other.gateway"


# ----------------------------------------------------------------------------- ApprovalRule


def test_approval_rule_parse_forms() -> None:
    assert ApprovalRule.parse("POST /v1/refunds*") == ApprovalRule(method="POST",
                                                                   path="/v1/refunds*")
    assert ApprovalRule.parse("* *") == ApprovalRule(method="*")
    assert ApprovalRule.parse("delete") == ApprovalRule(method="DELETE")
    assert ApprovalRule.parse("CONNECT Pkg.Example.com") == ApprovalRule(
        method="CONNECT", host="pkg.example.com", path="*")
    assert ApprovalRule.parse("POST api.example.com/v1/charges/*") == ApprovalRule(
        method="POST", host="api.example.com", path="/v1/charges/*")


@pytest.mark.parametrize("text", ["P /x", "POST1 /x", "/v1/refunds", "", "VERYLONGMETHOD /"])
def test_approval_rule_refuses_a_bad_method(text: str) -> None:
    with pytest.raises(ValueError, match="HTTP method"):
        ApprovalRule.parse(text)


def test_approval_rule_str_round_trips() -> None:
    for text in ("POST /v1/refunds*", "* *", "CONNECT pkg.example.com",
                 "POST api.example.com/v1/charges/*"):
        assert str(ApprovalRule.parse(text)) == text
        assert ApprovalRule.parse(str(ApprovalRule.parse(text))) == ApprovalRule.parse(text)


def test_approval_rule_matches() -> None:
    refunds = ApprovalRule.parse("POST /v1/refunds*")
    assert refunds.matches("post", "llm.gateway", "/v1/refunds/42")
    assert not refunds.matches("GET", "llm.gateway", "/v1/refunds/42")
    assert not refunds.matches("POST", "llm.gateway", "/v1/charges")
    anything = ApprovalRule.parse("* *")
    assert anything.matches("CONNECT", "pkg.example.com", "")
    hosted = ApprovalRule.parse("CONNECT *.example.com")
    assert hosted.matches("CONNECT", "Pkg.Example.com", "")
    assert not hosted.matches("CONNECT", "example.org", "")
    # Rules judge the gateway's normalised path (lower-case: an upstream may fold case, so
    # /V1/refunds must be held like /v1/refunds), and read their own glob the same way.
    assert ApprovalRule.parse("GET /Admin").matches("GET", "h", "/admin")
    assert ApprovalRule.parse("POST /v1//refunds/").matches("POST", "h", "/v1/refunds")
    assert ApprovalRule.parse("POST /v1/refunds/*").matches("POST", "h", "/v1/refunds")


def test_gateway_policy_approval_rule_first_match() -> None:
    policy = GatewayPolicy.model_validate({"approvals": ["POST /v1/refunds*", "* *"]})
    assert str(policy.approval_rule("POST", "h", "/v1/refunds")) == "POST /v1/refunds*"
    assert str(policy.approval_rule("GET", "h", "/")) == "* *"
    assert GatewayPolicy().approval_rule("GET", "h", "/") is None


# ----------------------------------------------------------------------------- budgets, breaker


def test_budget_bounds_and_sizes() -> None:
    assert Budget.model_validate({"bytes": "1MiB"}).bytes == 1024 * 1024
    with pytest.raises(ValidationError):
        Budget(requests=0)
    with pytest.raises(ValidationError):
        Budget(spend=0)
    assert Budgets().action == "pause"
    with pytest.raises(ValidationError):
        Budgets.model_validate({"action": "explode"})


def test_breaker_bounds_and_durations() -> None:
    assert Breaker.model_validate({"window": "1m"}).window == 60.0
    for bad in ({"max_error_rate": 0}, {"max_error_rate": 1.5}, {"baseline_factor": 1},
                {"min_requests": 0}, {"max_rate": 0}, {"baseline_windows": 0}):
        with pytest.raises(ValidationError):
            Breaker.model_validate(bad)
    assert Breaker(max_rate=None).max_rate is None


def test_gateway_policy_durations() -> None:
    policy = GatewayPolicy.model_validate({"token_ttl": "2h", "approval_timeout": "30s"})
    assert (policy.token_ttl, policy.approval_timeout) == (7200.0, 30.0)


# ----------------------------------------------------------------------------- NetworkPolicy


def test_network_policy_defaults_to_none() -> None:
    assert NetworkPolicy().mode == "none"
    assert NetworkPolicy(mode="gateway").gateway == GatewayPolicy()


def test_network_policy_none_with_allow_or_routes_is_refused() -> None:
    with pytest.raises(ValidationError, match='mode = "gateway"'):
        NetworkPolicy.model_validate({"gateway": {"allow": ["pypi.org:443"]}})
    with pytest.raises(ValidationError, match='mode = "gateway"'):
        NetworkPolicy(gateway=GatewayPolicy(routes=[route()]))


def test_network_policy_gateway_round_trips_through_json() -> None:
    policy = NetworkPolicy.model_validate({
        "mode": "gateway",
        "gateway": {"allow": ["*.example.com:443"], "routes": [route().model_dump()],
                    "approvals": ["POST /v1/refunds*"],
                    "budget": {"run": {"requests": 10, "bytes": "1KiB"}}}})
    again = NetworkPolicy.model_validate_json(policy.model_dump_json())
    assert again == policy
    assert again.gateway.budget.run.bytes == 1024
    with pytest.raises(ValidationError):
        NetworkPolicy.model_validate({"mode": "bridge"})
