"""What the daemon hands the egress gateway for one run, and an operator's answer to a held
request. Plain data, importable without the HTTP stack; no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from supervisor.egress.accounting import Usage

if TYPE_CHECKING:  # the policy's models load with the first gateway run (models/network.py)
    from supervisor.models.egress import GatewayPolicy


@dataclass(frozen=True)
class Decision:
    """An operator's answer to a held egress request."""
    approved: bool
    approval_id: str
    by: str = ""
    reason: str = ""


@dataclass
class RunGrant:
    """What the daemon hands the gateway for one run. `secrets` maps route names to values and
    lives only in this process's memory."""

    run_id: str
    agent: str
    token: str
    expires_at: float
    policy: GatewayPolicy
    host_ip: str
    port: int
    secrets: dict[str, str]
    agent_usage: Usage = field(default_factory=Usage)  # earlier runs of the same agent


@dataclass(frozen=True)
class Carried:
    """What a run's gate had counted and decided before a restart (supervisor/daemon/
    handover.py), for the gateway worker of the daemon that adopts the run: its usage so far
    (the run's budgets go on counting from it), an open breaker (it stays open: only a human
    closes it), whether its budget has fired already (it fires once per run), and a pause.
    No secret: those are read again from the adopting daemon's configuration."""

    usage: Usage = field(default_factory=Usage)
    breaker: str | None = None
    budget_fired: bool = False
    suspended: bool = False
    mcp: McpCarried | None = None  # a run with MCP servers


# Bounds of a carried MCP state (it comes from a record an agent's calls filled): the call
# counters name servers and tools of the run's policy, the sessions are the gateway's own
# per-run cap (supervisor/mcp/gateway.py), the bridges at most one per stdio server.
MCP_CARRIED_KEYS = 512
MCP_CARRIED_SESSIONS = 64
MCP_CARRIED_NAME = 300
MCP_CARRIED_BRIDGES = 8
MCP_MAX_ID = 1 << 62  # a JSON-RPC id the bridge numbers from, well inside a JSON integer


@dataclass(frozen=True)
class McpCarried:
    """A run's MCP state in the gateway at a restart (supervisor/mcp/gateway.py `carry`): the
    call counters its budgets judge by, the remote sessions it opened (id, server), and for
    each stdio server the next request id its bridge gives (a late answer to a call cancelled
    at the restart must not match a new call's id)."""

    calls: int = 0
    cost: float = 0.0
    per_server: dict[str, int] = field(default_factory=dict)
    per_tool: dict[str, int] = field(default_factory=dict)
    sessions: list[tuple[str, str]] = field(default_factory=list)
    next_ids: dict[str, int] = field(default_factory=dict)


# The grant as the daemon sends it to the gateway's process (supervisor/egress/ipc.py frames);
# here, not in the worker's module, so the daemon need not import the worker's process code.
def grant_to_wire(grant: RunGrant) -> dict[str, Any]:
    return {"run_id": grant.run_id, "agent": grant.agent, "token": grant.token,
            "expires_at": grant.expires_at, "policy": grant.policy.model_dump(mode="json"),
            "host_ip": grant.host_ip, "port": grant.port, "secrets": grant.secrets,
            "agent_usage": grant.agent_usage.as_dict()}


def grant_from_wire(data: dict[str, Any]) -> RunGrant:
    from supervisor.models.egress import GatewayPolicy

    return RunGrant(run_id=str(data["run_id"]), agent=str(data["agent"]),
                    token=str(data["token"]), expires_at=float(data["expires_at"]),
                    policy=GatewayPolicy.model_validate(data["policy"]),
                    host_ip=str(data["host_ip"]), port=int(data["port"]),
                    secrets={str(k): str(v) for k, v in data["secrets"].items()},
                    agent_usage=Usage(**data["agent_usage"]))


def carried_to_wire(carried: Carried) -> dict[str, Any]:
    return {"usage": carried.usage.as_dict(), "breaker": carried.breaker,
            "budget_fired": carried.budget_fired, "suspended": carried.suspended,
            **({"mcp": mcp_carried_to_wire(carried.mcp)} if carried.mcp is not None else {})}


def mcp_carried_to_wire(carried: McpCarried) -> dict[str, Any]:
    return {"calls": carried.calls, "cost": carried.cost, "per_server": carried.per_server,
            "per_tool": carried.per_tool, "sessions": [list(s) for s in carried.sessions],
            "next_ids": carried.next_ids}


def _count(value: Any, what: str, top: int = MCP_MAX_ID) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
        raise ValueError(f"the carried {what} is not a count")
    return value


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MCP_CARRIED_NAME:
        raise ValueError(f"a carried {what} is not a name of at most {MCP_CARRIED_NAME} "
                         f"characters")
    return value


def _counts(value: Any, what: str, most: int) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > most:
        raise ValueError(f"the carried {what} are not at most {most} counts")
    return {_name(k, what): _count(v, what) for k, v in value.items()}


def mcp_carried_from_wire(data: Any) -> McpCarried:
    """ValueError unless `data` is what `mcp_carried_to_wire` makes, within its bounds."""
    if not isinstance(data, dict):
        raise ValueError("the carried MCP state is not an object")
    cost = data.get("cost")
    if isinstance(cost, bool) or not isinstance(cost, int | float) or not 0 <= cost < 1e300:
        raise ValueError("the carried MCP cost is not a non-negative number")
    sessions = data.get("sessions")
    if not isinstance(sessions, list) or len(sessions) > MCP_CARRIED_SESSIONS:
        raise ValueError(f"the carried MCP sessions are not at most {MCP_CARRIED_SESSIONS}")
    pairs: list[tuple[str, str]] = []
    for session in sessions:
        if not isinstance(session, list) or len(session) != 2:
            raise ValueError("a carried MCP session is not [id, server]")
        pairs.append((_name(session[0], "session id"), _name(session[1], "server")))
    next_ids = _counts(data.get("next_ids"), "next request ids", MCP_CARRIED_BRIDGES)
    if any(ident < 1 for ident in next_ids.values()):
        raise ValueError("a carried next request id is below 1")
    return McpCarried(calls=_count(data.get("calls"), "call count"), cost=float(cost),
                      per_server=_counts(data.get("per_server"), "server calls",
                                         MCP_CARRIED_KEYS),
                      per_tool=_counts(data.get("per_tool"), "tool calls", MCP_CARRIED_KEYS),
                      sessions=pairs, next_ids=next_ids)


def carried_from_wire(data: dict[str, Any]) -> Carried:
    """ValueError (or TypeError, KeyError) unless `data` is what `carried_to_wire` makes."""
    usage = data["usage"]
    counts = {key: usage[key] for key in ("requests", "bytes", "tokens", "denied", "errors")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
               for v in counts.values()):
        raise ValueError("a carried count is not a non-negative integer")
    spend = usage["spend"]
    if isinstance(spend, bool) or not isinstance(spend, int | float) or not 0 <= spend < 1e300:
        raise ValueError("the carried spend is not a non-negative number")
    breaker = data["breaker"]
    if breaker is not None and not isinstance(breaker, str):
        raise ValueError("the carried breaker is not a reason")
    if not isinstance(data["budget_fired"], bool) or not isinstance(data["suspended"], bool):
        raise ValueError("a carried flag is not a boolean")
    mcp = data.get("mcp")
    return Carried(usage=Usage(spend=float(spend), **counts),
                   breaker=None if breaker is None else breaker[:500],
                   budget_fired=data["budget_fired"], suspended=data["suspended"],
                   mcp=None if mcp is None else mcp_carried_from_wire(mcp))
