"""The judgement of one MCP message against a run's MCP policy: which methods pass, which tools
exist for the agent, whether a call's arguments satisfy the tool's CEL rule, whether a budget
is spent, and whether an operator must approve. Pure over the policy and the run's counters;
no I/O, no privilege.

Every failure to judge is a denial: a rule that errors, returns a non-boolean, or meets
arguments it cannot read refuses the call (`policy_error`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from supervisor.mcp.messages import Message
from supervisor.models.mcp import McpPolicy, McpServer, ToolRule

Outcome = Literal["allow", "deny", "unknown_tool", "hold"]
_NO_RULE = ToolRule()


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str = ""  # a stable snake_case word (denials and holds)
    rule: str = ""  # which part of the policy decided, e.g. "code.tools.run_sql.require"
    message: str = ""
    retryable: bool = False
    as_tool_error: bool = False
    cost: float = 0.0


@dataclass
class Counters:
    """One run's MCP calls, bounded by the number of tools its policy names plus one."""

    calls: int = 0
    cost: float = 0.0
    per_server: dict[str, int] = field(default_factory=dict)
    per_tool: dict[str, int] = field(default_factory=dict)  # "server/tool" of rules only

    def copy(self) -> Counters:
        return Counters(self.calls, self.cost, dict(self.per_server), dict(self.per_tool))

    def count(self, server: str, tool: str, cost: float, named: bool) -> None:
        self.calls += 1
        self.cost += cost
        self.per_server[server] = self.per_server.get(server, 0) + 1
        if named:
            key = f"{server}/{tool}"
            self.per_tool[key] = self.per_tool.get(key, 0) + 1


def judge_method(policy: McpPolicy, message: Message) -> Verdict:
    """A message other than a tool call: responses to the server's requests pass; a method
    the policy does not list is refused."""
    if message.method is None or message.method in policy.methods:
        return Verdict("allow")
    return Verdict("deny", "method_not_allowed", "mcp.methods",
                   f"the method {message.method[:128]!r} is not allowed through the gateway")


def judge_call(policy: McpPolicy, server: McpServer, tool: str, arguments: dict[str, Any],
               counters: Counters) -> Verdict:
    """A tools/call, in order: the tool's name (a denied tool does not exist), the argument
    rule, the budgets, then approval."""
    as_error = server.refuse_as_tool_error
    if not server.permits(tool):
        return Verdict("unknown_tool", "tool_denied", f"{server.name}.allow/deny",
                       f"the tool {tool[:128]!r} is not allowed")
    rule = server.tools.get(tool, _NO_RULE)
    as_error = rule.as_tool_error or as_error
    where = f"{server.name}.tools.{tool}"
    if rule.require is not None:
        try:
            result = rule.program().execute({"args": arguments, "tool": tool})
        except Exception as exc:  # the interpreter's errors have no common base
            return Verdict("deny", "policy_error", f"{where}.require",
                           f"the rule could not be judged on these arguments: "
                           f"{type(exc).__name__}: {str(exc)[:200]}", as_tool_error=as_error)
        if result is not True:
            reason = "argument_denied" if result is False else "policy_error"
            return Verdict("deny", reason, f"{where}.require",
                           f"the arguments do not satisfy the rule: {rule.require[:300]}",
                           as_tool_error=as_error)
    budget = _spent(policy, server, tool, rule, counters)
    if budget is not None:
        return Verdict("deny", "budget_exhausted", budget[0], budget[1], as_tool_error=as_error)
    if rule.approval:
        return Verdict("hold", "approval_required", f"{where}.approval",
                       f"{server.name}/{tool} needs an operator's approval",
                       as_tool_error=as_error, cost=rule.cost)
    return Verdict("allow", rule=where if tool in server.tools else f"{server.name}.allow",
                   cost=rule.cost, as_tool_error=as_error)


def _spent(policy: McpPolicy, server: McpServer, tool: str, rule: ToolRule,
           counters: Counters) -> tuple[str, str] | None:
    """The first budget one more call would pass: (rule, message), or None."""
    used = counters.per_tool.get(f"{server.name}/{tool}", 0)
    if rule.max_calls is not None and used >= rule.max_calls:
        return (f"{server.name}.tools.{tool}.max_calls",
                f"{server.name}/{tool} may be called {rule.max_calls} times per run")
    if server.max_calls is not None and counters.per_server.get(server.name, 0) >= \
            server.max_calls:
        return (f"{server.name}.max_calls",
                f"the tools of {server.name} may be called {server.max_calls} times per run")
    if policy.max_calls is not None and counters.calls >= policy.max_calls:
        return ("mcp.max_calls", f"this run may make {policy.max_calls} tool calls")
    if policy.max_cost is not None and counters.cost + rule.cost > policy.max_cost + 1e-12:
        return ("mcp.max_cost", f"this run's tool calls may cost {policy.max_cost:g}; "
                f"{counters.cost:g} is spent and this call costs {rule.cost:g}")
    return None


def visible_tools(server: McpServer, tools: list[Any]) -> list[Any]:
    """A tools/list result's tools, without those the agent may not call (entries that are
    not objects with a string name are dropped too: nothing unjudged reaches the agent)."""
    return [tool for tool in tools if isinstance(tool, dict)
            and isinstance(tool.get("name"), str) and server.permits(tool["name"])]
