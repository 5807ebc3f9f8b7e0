"""The MCP policy engine (supervisor/mcp/policy.py), the JSON-RPC reading that comes before it
(supervisor/mcp/messages.py) and the policy model, on the worked example of docs/mcp.md (the
shipped profile mcp-coding-agent). Pure; no privilege."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from supervisor.mcp import messages
from supervisor.mcp.messages import MessageRefused
from supervisor.mcp.policy import Counters, judge_call, judge_method, visible_tools
from supervisor.models.mcp import McpPolicy, McpServer
from supervisor.models.network import NetworkPolicy
from supervisor.profiles import load_profile


def example() -> tuple[McpPolicy, McpServer]:
    policy = load_profile("mcp-coding-agent", []).network.gateway.mcp
    server = policy.server("code")
    assert server is not None
    return policy, server


def call(tool: str, args: dict[str, Any], counters: Counters | None = None) -> Any:
    policy, server = example()
    return judge_call(policy, server, tool, args, counters or Counters())


def test_worked_example_allows_reads_and_select() -> None:
    assert call("read_file", {"path": "/workspace/src/main.py"}).outcome == "allow"
    assert call("search", {"query": "def main"}).outcome == "allow"
    verdict = call("run_sql", {"query": "SELECT name FROM users WHERE id = 4"})
    assert (verdict.outcome, verdict.cost) == ("allow", 0.01)


@pytest.mark.parametrize("query", [
    "DELETE FROM users", "SELECT 1; DROP TABLE users", "select 1 -- ; drop",
    "UPDATE t SET a = 1", "/* x */ SELECT 1", "SELECT 1 /* ; */",
])
def test_worked_example_denies_anything_but_one_select(query: str) -> None:
    verdict = call("run_sql", {"query": query})
    assert verdict.outcome == "deny"
    assert verdict.reason == "argument_denied"
    assert verdict.rule == "code.tools.run_sql.require"
    assert verdict.as_tool_error  # the model is told through a tool result


def test_rule_that_cannot_be_judged_denies() -> None:
    # A missing argument, a wrong type: the interpreter raises; the gateway refuses.
    for args in ({}, {"query": 5}, {"query": ["SELECT 1"]}):
        verdict = call("run_sql", args)
        assert (verdict.outcome, verdict.reason) == ("deny", "policy_error"), args


def test_non_boolean_rule_result_denies() -> None:
    server = McpServer(name="s", url="https://s.example/mcp", allow=["t"],
                       tools={"t": {"require": "args.x"}})  # type: ignore[dict-item]
    policy = McpPolicy(servers=[server])
    assert judge_call(policy, server, "t", {"x": True}, Counters()).outcome == "allow"
    for value in (1, "true", None, [True]):
        verdict = judge_call(policy, server, "t", {"x": value}, Counters())
        assert (verdict.outcome, verdict.reason) == ("deny", "policy_error"), value


def test_read_file_outside_the_workspace_is_denied() -> None:
    for path in ("/etc/passwd", "/workspace/../etc/passwd", "workspace/x"):
        assert call("read_file", {"path": path}).reason == "argument_denied", path


def test_unlisted_and_denied_tools_are_unknown() -> None:
    verdict = call("exec_shell", {"cmd": "id"})
    assert (verdict.outcome, verdict.reason) == ("unknown_tool", "tool_denied")
    server = McpServer(name="s", url="https://s.example/mcp", allow=["*"], deny=["admin_*"])
    policy = McpPolicy(servers=[server])
    assert judge_call(policy, server, "admin_reset", {}, Counters()).outcome == "unknown_tool"
    assert judge_call(policy, server, "list", {}, Counters()).outcome == "allow"
    listed = [{"name": "list"}, {"name": "admin_reset"}, {"name": 3}, "x", {"title": "t"}]
    assert visible_tools(server, listed) == [{"name": "list"}]


def test_drop_table_is_held_then_capped() -> None:
    policy, server = example()
    counters = Counters()
    verdict = judge_call(policy, server, "drop_table", {"table": "t"}, counters)
    assert (verdict.outcome, verdict.rule) == ("hold", "code.tools.drop_table.approval")
    for _ in range(3):
        counters.count("code", "drop_table", 0.0, True)
    verdict = judge_call(policy, server, "drop_table", {"table": "t"}, counters)
    assert (verdict.outcome, verdict.reason, verdict.rule) == (
        "deny", "budget_exhausted", "code.tools.drop_table.max_calls")


def test_run_budgets_of_calls_and_cost() -> None:
    policy, server = example()
    counters = Counters(calls=2000)
    verdict = judge_call(policy, server, "search", {"query": "x"}, counters)
    assert (verdict.reason, verdict.rule) == ("budget_exhausted", "mcp.max_calls")
    counters = Counters(calls=1, cost=4.995)
    verdict = judge_call(policy, server, "run_sql", {"query": "SELECT 1"}, counters)
    assert (verdict.reason, verdict.rule) == ("budget_exhausted", "mcp.max_cost")
    # Free tools still go when the cost budget is spent.
    assert judge_call(policy, server, "search", {"query": "x"}, counters).outcome == "allow"


def test_counters_stay_bounded_by_the_policy() -> None:
    counters = Counters()
    for i in range(1000):
        counters.count("code", f"tool{i}", 0.0, named=False)
    assert counters.calls == 1000 and counters.per_tool == {}


def test_methods_outside_the_list_are_refused() -> None:
    policy, _ = example()
    for method in ("resources/read", "sampling/createMessage", "tools/call2", "x"):
        message = messages.parse(json.dumps(
            {"jsonrpc": "2.0", "id": 1, "method": method}).encode(), 8)[0][0]
        verdict = judge_method(policy, message)
        assert (verdict.outcome, verdict.reason) == ("deny", "method_not_allowed"), method
    response = messages.parse(b'{"jsonrpc":"2.0","id":"s1","result":{}}', 8)[0][0]
    assert judge_method(policy, response).outcome == "allow"


def test_profile_with_a_bad_rule_is_refused() -> None:
    with pytest.raises(ValidationError, match="not a CEL expression"):
        McpServer(name="s", url="https://s.example/mcp",
                  tools={"t": {"require": "args.("}})  # type: ignore[dict-item]
    for bad in ({"url": "http://s.example/mcp", "secret": "file:x"},  # secret in clear
                {"url": "https://127.0.0.1/mcp"}, {"url": "https://[::1]:8/mcp"}):
        with pytest.raises(ValidationError):
            McpServer.model_validate({"name": "s", **bad})
    with pytest.raises(ValidationError, match="not an MCP method"):
        McpPolicy(methods=["tools/call", "shell/exec"])
    with pytest.raises(ValidationError, match="mode is 'none'"):
        NetworkPolicy.model_validate({"gateway": {"mcp": {"servers": [
            {"name": "s", "url": "https://s.example/mcp"}]}}})


# ----------------------------------------------------------------------------- messages


@pytest.mark.parametrize("body, reason", [
    (b"", "unparseable"), (b"{", "unparseable"), (b"\xff\xfe", "unparseable"),
    (b"NaN", "unparseable"), (b'{"jsonrpc":"2.0","id":1,"method":"ping","x":Infinity}',
                              "unparseable"),
    (b"[]", "invalid_message"), (b"3", "invalid_message"),
    (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', "invalid_message"),
    (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', "invalid_message"),
    (b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', "invalid_message"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":[]}', "invalid_message"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","extra":1}', "invalid_message"),
    (b'{"jsonrpc":"2.0","method":"tools/call","params":{"name":"x"}}', "invalid_message"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}', "invalid_message"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":[1]}}',
     "invalid_message"),
    (b'{"jsonrpc":"2.0","id":1}', "invalid_message"),
    (b'{"jsonrpc":"2.0","id":1,"result":1,"error":{}}', "invalid_message"),
    (b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":1,"method":"ping"}]',
     "invalid_message"),
    (b"[" + b",".join([b'{"jsonrpc":"2.0","method":"ping"}'] * 9) + b"]", "batch_too_large"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":'
     + b'{"a":' * 40 + b"1" + b"}" * 40 + b"}}", "unparseable"),
    (b"[" * 100000 + b"]" * 100000, "unparseable"),
])
def test_unjudgeable_bodies_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(MessageRefused) as refused:
        messages.parse(body, 8)
    assert refused.value.reason == reason


def test_batch_and_tool_call_are_read() -> None:
    batch, is_batch = messages.parse(json.dumps([
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
         "params": {"name": "run_sql", "arguments": {"query": "SELECT 1"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
    ]).encode(), 8)
    assert is_batch
    assert (batch[0].tool, batch[0].arguments, batch[0].is_request) == (
        "run_sql", {"query": "SELECT 1"}, True)
    assert (batch[1].tool, batch[1].id, batch[1].is_request) == (None, None, False)


def test_argument_digest_is_canonical() -> None:
    a = messages.canonical_digest({"b": [1, {"y": 2, "x": "é"}], "a": None})
    b = messages.canonical_digest(json.loads('{"a": null, "b": [1, {"x": "é", "y": 2}]}'))
    assert a == b and len(a) == 64
    assert a != messages.canonical_digest({"a": None, "b": [1, {"x": "e", "y": 2}]})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=20).map(lambda v: json.dumps(v).encode()))
def test_any_body_is_read_or_refused_never_raises_otherwise(body: bytes) -> None:
    try:
        batch, _ = messages.parse(body, 8)
    except MessageRefused as refused:
        assert refused.reason in ("unparseable", "invalid_message", "batch_too_large")
        return
    policy, server = example()
    for message in batch:
        verdict = judge_method(policy, message)
        if verdict.outcome == "allow" and message.tool is not None:
            verdict = judge_call(policy, server, message.tool, message.arguments, Counters())
        assert verdict.outcome in ("allow", "deny", "unknown_tool", "hold")
